# Whether the data partition (/mnt/data) can be written, as the kernel sees it.
#
# Prints one JSON object:
#   {"writable": bool, "mounted": bool, "options": str, "device": str, "errors_count": int,
#    "reason": str}
# Not writable when it is not mounted, mounted "ro", or the ext4 file system is in an error
# state: "emergency_ro" (an ext4 error with errors=remount-ro on kernels >= 6.x keeps the
# mount "rw" and adds emergency_ro), "shutdown", or errors recorded since its last fsck
# (/sys/fs/ext4/<device>/errors_count > 0; -1 when the kernel does not show it).  Each needs
# the file system repaired (fsck, which balenaOS runs at boot), not freeing or restarting.
# Read-only.
esc() { tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g'; }
# The topmost mount on /mnt/data: major:minor and mount + super-block options.
set -- $(awk '{ split($0, half, " - "); split(half[2], rest, " ") }
  $5 == "/mnt/data" { mm = $3; opts = $6 "," rest[3] }
  END { if (mm != "") print mm, opts }' /proc/self/mountinfo)
mm=$1 opts=$2
device="" count=-1
if [ -n "$mm" ]; then
  device=$(basename "$(readlink "/sys/dev/block/$mm" 2>/dev/null)" 2>/dev/null)
  if [ -n "$device" ] && [ -r "/sys/fs/ext4/$device/errors_count" ]; then
    count=$(tr -cd '0-9' < "/sys/fs/ext4/$device/errors_count")
  fi
fi
has() { case ",$opts," in *",$1,"*) return 0 ;; esac; return 1; }
writable=false mounted=true
if [ -z "$mm" ]; then mounted=false reason="not mounted"
elif has ro; then reason="mounted read-only (ro)"
elif has emergency_ro; then reason="ext4 error: the kernel stopped all writes (emergency_ro)"
elif has shutdown; then reason="the file system is shut down"
elif [ "${count:--1}" -gt 0 ]; then reason="ext4 errors recorded since the last fsck: $count"
else writable=true reason="writable"
fi
printf '{"writable": %s, "mounted": %s, "options": "%s", "device": "%s", "errors_count": %d, "reason": "%s"}\n' \
  "$writable" "$mounted" "$(printf '%s' "$opts" | esc)" "$(printf '%s' "$device" | esc)" \
  "${count:--1}" "$reason"
