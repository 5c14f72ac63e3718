# The balena Supervisor as balena's own checks see it (device-diagnostics, meta-balena).
#
# Prints one JSON object:
#   {"unit": ActiveState|"not-found", "sub_state": str, "n_restarts": int, "age_s": int,
#    "container": "balena_supervisor"|"resin_supervisor"|"", "container_state": "running"|
#    "exited"|"missing"|"unknown", "running": bool, "healthy_rc": int, "healthy_code": int,
#    "healthy": bool, "ping": bool}
# - unit: `systemctl is-active balena-supervisor` (its unit on balenaOS), its NRestarts, and
#   age_s, the seconds since systemd last changed its state (-1: never);
# - container: `balena ps` by name, balena_supervisor or (older OS) resin_supervisor; the
#   engine is asked only when its unit is active (a probe must not socket-activate it) and
#   gets 3 s (a healthy one answers in well under 1 s); "unknown" when it does not answer;
# - API: exactly `curl -fsS --max-time 10 http://127.0.0.1:48484/v1/healthy` (no API key; 200
#   healthy, 500 unhealthy): healthy_rc is curl's exit code, healthy_code the HTTP status (0:
#   no answer); ping: GET /ping answered OK.
# Read-only.
cli="${param_engine_cli:-balena}"
engine_unit="${param_engine_unit:-balena.service}"
unit=balena-supervisor.service
api=http://127.0.0.1:48484
word() { tr -cd 'a-z0-9_-' | cut -c1-40; }

load=$(systemctl show -p LoadState --value "$unit" 2>/dev/null | word)
if [ "$load" = loaded ]; then
  active=$(systemctl show -p ActiveState --value "$unit" | word)
  sub=$(systemctl show -p SubState --value "$unit" | word)
  restarts=$(systemctl show -p NRestarts --value "$unit" | tr -cd '0-9')
  changed=$(systemctl show -p StateChangeTimestampMonotonic --value "$unit" | tr -cd '0-9')
  age=$(awk -v m="${changed:-0}" '{ print (m + 0 > 0) ? int($1 - m / 1000000) : -1 }' /proc/uptime)
else
  active=not-found sub="" restarts=0 age=-1
fi

container="" state=unknown
if systemctl is-active -q "$engine_unit" 2>/dev/null &&
  names=$(timeout 3 "$cli" ps -a --format '{{.Names}} {{.State}}' 2>/dev/null); then
  state=missing
  for name in balena_supervisor resin_supervisor; do
    found=$(printf '%s\n' "$names" | awk -v n="$name" '$1 == n {print $2; exit}' | word)
    if [ -n "$found" ]; then
      container=$name
      if [ "$found" = running ]; then state=running; break; fi
      state=exited
    fi
  done
fi

code=$(curl -fsS --max-time 10 -o /dev/null -w '%{http_code}' "$api/v1/healthy" 2>/dev/null)
rc=$?
code=$(printf '%s' "$code" | tr -cd '0-9')
ping=false
[ "$(curl -fsS --max-time 10 "$api/ping" 2>/dev/null)" = OK ] && ping=true

running=false
[ "$state" = running ] && running=true
healthy=false
[ "$rc" -eq 0 ] && healthy=true
printf '{"unit": "%s", "sub_state": "%s", "n_restarts": %d, "age_s": %d, "container": "%s",' \
  "$active" "$sub" "${restarts:-0}" "$age" "$container"
printf ' "container_state": "%s", "running": %s, "healthy_rc": %d, "healthy_code": %d,' \
  "$state" "$running" "$rc" "${code:-0}"
printf ' "healthy": %s, "ping": %s}\n' "$healthy" "$ping"
