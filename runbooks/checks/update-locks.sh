# App update locks as the balena Supervisor sees them, and the device's own override.
#
# Prints one JSON object:
#   {"held": [{"path": str, "owner_uid": int, "flocked": bool}], "override": bool,
#    "override_setting": "NAME=value"|""}
# A lock is held when its file exists: /tmp/balena-supervisor/services/<appId>/<service>/
# updates.lock (or the legacy resin-updates.lock), whoever created it (the Supervisor's own
# locks are owned by uid 65534; an app's by its user) - that is how the Supervisor decides.
# "flocked" adds what the OS's safe_reboot tests: another process holds `flock` on it (an
# existing file is held either way; a file without flock is still held).
# "override" is the device's SUPERVISOR_OVERRIDE_LOCK / RESIN_OVERRIDE_LOCK (with or without a
# BALENA_/RESIN_ prefix) set to 1/true/on in /tmp/balena-supervisor/target-state-config, the
# JSON config the Supervisor last wrote; evidence only - a runbook decides what it means.
# Read-only (flock -n takes the lock for an instant only when nobody holds it).
dir=/tmp/balena-supervisor/services
config=/tmp/balena-supervisor/target-state-config
esc() { tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g'; }

held=$(find "$dir" \( -name updates.lock -o -name resin-updates.lock \) 2>/dev/null | sort |
  while IFS= read -r f; do
    [ -e "$f" ] || continue
    uid=$(stat -c %u "$f" 2>/dev/null | tr -cd '0-9')
    if flock -nx "$f" true 2>/dev/null; then flocked=false; else flocked=true; fi
    printf '%s{"path": "%s", "owner_uid": %d, "flocked": %s}' \
      "${sep:-}" "$(printf '%s' "$f" | esc)" "${uid:--1}" "$flocked"
    sep=", "
  done)

setting=$(grep -oE '"((BALENA|RESIN)_)?(SUPERVISOR_)?OVERRIDE_LOCK"[[:space:]]*:[[:space:]]*"[^"]*"' \
  "$config" 2>/dev/null | head -n 1 | sed -E 's/^"([A-Z_]+)"[[:space:]]*:[[:space:]]*"([^"]*)"$/\1=\2/' | esc)
override=false
case "$(printf '%s' "${setting#*=}" | tr 'A-Z' 'a-z')" in
  1 | true | on | yes) [ -n "$setting" ] && override=true ;;
esac
printf '{"held": [%s], "override": %s, "override_setting": "%s"}\n' "$held" "$override" "$setting"
