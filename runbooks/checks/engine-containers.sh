# Running containers, and which of them the engine itself starts again after a restart.
#
# Prints one JSON object:
#   {"source": "api"|"disk", "running": [names], "restart_on_boot": [names]}
# "restart_on_boot" are the running containers whose restart policy is "always" or
# "unless-stopped": the engine starts those again when it comes back.  Containers with no
# policy stay stopped after an engine restart unless something (the supervisor) starts them.
#
# From the engine API when its unit is active and it answers within 3 s; otherwise (engine
# hung or down) from the state the engine last wrote to disk (containers/<id>/config.v2.json
# and hostconfig.json), which is what was running when it stopped answering.  Read-only: the
# API is not called when the unit is not active (a socket-activated engine would start).
cli="${param_engine_cli:-balena}"
unit="${param_engine_unit:-balena.service}"
root=/var/lib/docker/containers
list=""
source=disk
if systemctl is-active -q "$unit" && ids=$(timeout 3 "$cli" ps -q 2>/dev/null); then
  source=api
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086 # ids are hex container ids, one per word
    list=$(timeout 10 "$cli" inspect -f '{{.Name}} {{.HostConfig.RestartPolicy.Name}}' $ids) \
      || { echo "inspect of running containers failed" >&2; exit 1; }
  fi
else
  for dir in "$root"/*/; do
    [ -f "$dir/config.v2.json" ] || continue
    grep -q '"Running":true' "$dir/config.v2.json" || continue
    name=$(grep -o '"Name":"/[^"]*"' "$dir/config.v2.json" | head -n 1 | cut -d'"' -f4)
    policy=$(grep -o '"RestartPolicy":{"Name":"[^"]*"' "$dir/hostconfig.json" 2>/dev/null \
      | head -n 1 | cut -d'"' -f6)
    list="$list
$name ${policy:-no}"
  done
fi
printf '%s\n' "$list" | awk -v source="$source" '
  function add(arr, n, v) { return arr (n ? "," : "") "\"" v "\"" }
  {
    name = $1; sub(/^\//, "", name); policy = $2
    if (name !~ /^[A-Za-z0-9][A-Za-z0-9_.-]*$/) next
    running = add(running, nr, name); nr++
    if (policy == "always" || policy == "unless-stopped") { boot = add(boot, nb, name); nb++ }
  }
  END { printf "{\"source\": \"%s\", \"running\": [%s], \"restart_on_boot\": [%s]}\n", source, running, boot }'
