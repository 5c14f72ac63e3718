# data-partition-full: where the space on /mnt/data is, largest first (for the plan and the
# not_fixed explanation).  du -x per part; "deleted files held open" are files a process still
# holds after they were deleted (freed only when that process closes them or restarts).
# Prints JSON [{"what", "path", "bytes"}], sorted by bytes, largest first.
d=/var/lib/docker
kb() { du -skx "$@" 2>/dev/null | awk '{s += $1} END {printf "%.0f", s * 1024}'; }
data_dev=$(stat -c %d /mnt/data/ 2>/dev/null)
used=$(df -Pk /mnt/data | awk 'NR == 2 {printf "%.0f", $3 * 1024}')
rw_dirs=""
for f in $d/image/overlay2/layerdb/mounts/*/mount-id $d/image/overlay2/layerdb/mounts/*/init-id; do
  [ -f "$f" ] || continue
  id=$(cat "$f")
  case "$id" in *[!0-9a-f-]* | "") continue ;; esac
  [ -d "$d/overlay2/$id" ] && rw_dirs="$rw_dirs $d/overlay2/$id"
done
docker_all=$(kb $d/)
overlay=$(kb $d/overlay2/)
rw=0
[ -n "$rw_dirs" ] && rw=$(kb $rw_dirs)
volumes=$(kb $d/volumes/)
containers=$(kb $d/containers/)
tmp=$(kb $d/tmp/)
quarantine=0
[ -d $d/orphan-quarantine ] && quarantine=$(kb $d/orphan-quarantine/)
supervisor=0
[ -d /mnt/data/resin-data ] && supervisor=$(kb /mnt/data/resin-data/)
overlay_root=0
[ -d /mnt/data/root-overlay ] && overlay_root=$(kb /mnt/data/root-overlay/)
deleted=$(for fd in /proc/[0-9]*/fd; do stat -L -c '%d %h %i %s' "$fd"/* 2>/dev/null; done \
  | awk -v dev="$data_dev" '$1 == dev && $2 == 0 && !seen[$3]++ {s += $4} END {printf "%.0f", s}')
awk -v used="$used" -v docker_all="$docker_all" -v overlay="$overlay" -v rw="$rw" \
  -v volumes="$volumes" -v containers="$containers" -v tmp="$tmp" -v quarantine="$quarantine" \
  -v supervisor="$supervisor" -v overlay_root="$overlay_root" -v deleted="$deleted" '
  function add(what, path, bytes) { if (bytes < 0) bytes = 0; n++; w[n] = what; p[n] = path; b[n] = bytes }
  BEGIN {
    add("volumes (user data)", "/var/lib/docker/volumes", volumes)
    add("image layers", "/var/lib/docker/overlay2", overlay - rw)
    add("container writable layers", "/var/lib/docker/overlay2", rw)
    add("container logs", "/var/lib/docker/containers", containers)
    add("engine tmp", "/var/lib/docker/tmp", tmp)
    add("orphan quarantine", "/var/lib/docker/orphan-quarantine", quarantine)
    add("other engine data", "/var/lib/docker", docker_all - overlay - volumes - containers - tmp - quarantine)
    add("supervisor data", "/mnt/data/resin-data", supervisor)
    add("root overlay (persistent journal)", "/mnt/data/root-overlay", overlay_root)
    add("deleted files held open", "/proc/*/fd", deleted)
    add("file system overhead and other", "/mnt/data", used - docker_all - supervisor - overlay_root - deleted)
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (b[j] > b[i]) {
      t = b[i]; b[i] = b[j]; b[j] = t; t = w[i]; w[i] = w[j]; w[j] = t; t = p[i]; p[i] = p[j]; p[j] = t
    }
    printf "["
    for (i = 1; i <= n; i++) printf "%s{\"what\": \"%s\", \"path\": \"%s\", \"bytes\": %.0f}", (i > 1 ? ", " : ""), w[i], p[i], b[i]
    printf "]\n"
  }'
