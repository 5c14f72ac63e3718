# data-partition-full: dangling images (untagged, used by no container) with their sizes.
# Prints JSON {"ok", "error", "images": [{"id", "bytes"}], "bytes"}; "bytes" of an image is its
# size as the engine reports it (an upper bound of what removing it frees: layers it shares
# with another image stay).  An engine that does not answer gives ok=false and no images.
cli=${param_engine_cli:-balena}
fail() { printf '{"ok": false, "error": "%s", "images": [], "bytes": 0}\n' "$1"; exit 0; }
ids=$(timeout 20 "$cli" images -f dangling=true -q --no-trunc 2>/dev/null) \
  || fail "the engine did not list its images"
containers=$(timeout 20 "$cli" ps -aq --no-trunc 2>/dev/null) \
  || fail "the engine did not list its containers"
used=""
if [ -n "$containers" ]; then
  used=$(timeout 20 "$cli" inspect -f '{{.Image}}' $containers 2>/dev/null) \
    || fail "the engine did not inspect every container"
fi
info=""
if [ -n "$ids" ]; then
  # An image removed meanwhile makes inspect exit non-zero; the others are still printed.
  info=$(timeout 20 "$cli" image inspect -f '{{.Id}} {{.Size}} {{len .RepoTags}}' $ids 2>/dev/null)
fi
printf '%s\n' "$info" | awk -v used="$(printf '%s ' $used)" '
  BEGIN { n = split(used, u, " "); for (i = 1; i <= n; i++) inuse[u[i]] = 1; sep = "" }
  length($1) == 71 && $1 ~ /^sha256:[0-9a-f]+$/ && $2 ~ /^[0-9]+$/ && $3 == "0" && !($1 in inuse) {
    items = items sep sprintf("{\"id\": \"%s\", \"bytes\": %s}", $1, $2); sep = ", "; total += $2
  }
  END { printf "{\"ok\": true, \"error\": \"\", \"images\": [%s], \"bytes\": %.0f}\n", items, total }'
