# data-partition-full: json-file logs of containers (containers/<id>/<id>-json.log), largest
# first.  Prints JSON {"logs": [{"path", "container", "bytes"}], "bytes"}.
find /var/lib/docker/containers -mindepth 2 -maxdepth 2 -type f -name '*-json.log' \
  -exec stat -c '%s %n' {} + 2>/dev/null | sort -rn | awk '
  BEGIN { sep = "" }
  {
    n = split($2, p, "/"); id = p[n - 1]
    if (n != 7 || $2 != "/var/lib/docker/containers/" id "/" id "-json.log") next
    if (length(id) != 64 || id !~ /^[0-9a-f]+$/ || $1 !~ /^[0-9]+$/) next
    items = items sep sprintf("{\"path\": \"%s\", \"container\": \"%s\", \"bytes\": %s}", $2, substr(id, 1, 12), $1)
    sep = ", "; total += $1
  }
  END { printf "{\"logs\": [%s], \"bytes\": %.0f}\n", items, total }'
