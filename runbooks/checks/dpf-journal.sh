# data-partition-full: systemd journal usage, and how much of it is on the data partition (a
# persistent journal lives in /mnt/data/root-overlay/var/log/journal, bound on /var/log/journal;
# a volatile one is in /run and frees nothing there).
# Prints JSON {"usage", "dirs": [{"path", "bytes"}], "data_bytes"}.
data_dev=$(stat -c %d /mnt/data/ 2>/dev/null)
usage=$(journalctl --disk-usage 2>/dev/null | tr -d '\042\134' | tr '\n' ' ')
seen=" "
for d in /mnt/data/root-overlay/var/log/journal /var/log/journal /run/log/journal; do
  [ -d "$d" ] && [ ! -L "$d" ] || continue
  key=$(stat -c '%d:%i' "$d/") || continue
  case "$seen" in *" $key "*) continue ;; esac
  seen="$seen$key "
  [ "${key%%:*}" = "$data_dev" ] || continue
  printf '%s %s\n' "$(du -skx "$d" 2>/dev/null | awk '{print $1 * 1024}')" "$d"
done | awk -v usage="$usage" '
  BEGIN { sep = "" }
  $1 ~ /^[0-9]+$/ { items = items sep sprintf("{\"path\": \"%s\", \"bytes\": %s}", $2, $1); sep = ", "; total += $1 }
  END { printf "{\"usage\": \"%s\", \"dirs\": [%s], \"data_bytes\": %.0f}\n", usage, items, total }'
