# data-partition-full: files in the engine's tmp dir (/var/lib/docker/tmp: GetImageBlob*,
# import and save temp files), each with its size, age and whether a process holds it open
# (any /proc/<pid>/fd link to the same device:inode).  Names outside [A-Za-z0-9._-] are only
# counted (never listed, never cleaned).
# Prints JSON {"files": [{"path", "bytes", "age_s", "open"}], "bytes", "unlisted"}.
tmp=/var/lib/docker/tmp
open=$(for fd in /proc/[0-9]*/fd; do stat -L -c '%d:%i' "$fd"/* 2>/dev/null; done | sort -u)
unlisted=$(find "$tmp" -mindepth 1 -maxdepth 1 -type f -name '*[!A-Za-z0-9._-]*' \
  -exec echo x \; 2>/dev/null | wc -l)
find "$tmp" -mindepth 1 -maxdepth 1 -type f ! -name '*[!A-Za-z0-9._-]*' \
  -exec stat -c '%d:%i %s %Y %n' {} + 2>/dev/null \
  | awk -v open="$(printf '%s ' $open)" -v now="$(date +%s)" -v unlisted="$unlisted" '
  BEGIN { n = split(open, o, " "); for (i = 1; i <= n; i++) held[o[i]] = 1; sep = "" }
  NF == 4 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ {
    isopen = ($1 in held) ? "true" : "false"
    items = items sep sprintf("{\"path\": \"%s\", \"bytes\": %s, \"age_s\": %d, \"open\": %s}", $4, $2, now - $3, isopen)
    sep = ", "; total += $2
  }
  END { printf "{\"files\": [%s], \"bytes\": %.0f, \"unlisted\": %d}\n", items, total, unlisted + 0 }'
