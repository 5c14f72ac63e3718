# data-partition-full: named volumes (USER DATA) and their sizes, largest first.  Measured for
# the report only: this runbook never changes a volume.
# Prints JSON {"volumes": [{"name", "bytes"}], "bytes"}.
for v in /var/lib/docker/volumes/*/_data; do
  [ -d "$v" ] || continue
  du -skx "$v" 2>/dev/null
done | sort -rn | awk '
  BEGIN { sep = "" }
  {
    n = split($2, p, "/"); name = p[n - 1]
    if (name !~ /^[A-Za-z0-9][A-Za-z0-9_.-]*$/) name = "(unnamed)"
    items = items sep sprintf("{\"name\": \"%s\", \"bytes\": %.0f}", name, $1 * 1024); sep = ", "; total += $1 * 1024
  }
  END { printf "{\"volumes\": [%s], \"bytes\": %.0f}\n", items, total }'
