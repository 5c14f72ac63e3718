# orphan-layers.sh: read-only scan for overlay2 layer dirs that no engine metadata names.
#
# Shared by the runbooks orphaned-layers and data-partition-full (a check with
# `run_file: checks/orphan-layers.sh`, `parse: json`) and run again, unchanged, by
# playbooks/quarantine-orphan-layers.yml right before it moves anything.  BALENA.md §3.
#
# CONTRACT (keep it stable; add fields, never change or drop one)
#   input   $param_min_age  whole seconds a dir must have been unchanged to qualify
#                           (unset or empty: 3600; anything else but digits: exit 2)
#   output  one line of JSON on stdout, exit 0:
#     {"root": "/var/lib/docker",
#      "dirs": N,            entries of overlay2/ except "l" (what the engine itself counts)
#      "references": M,      distinct layer dirs named by layerdb/sha256/*/cache-id,
#                            layerdb/mounts/*/mount-id, layerdb/mounts/*/init-id, layerdb/tmp/*/cache-id
#      "missing_refs": K,    references with no overlay2/<id> directory
#      "unexpected": U,      overlay2/ entries that are not a directory named <64 hex>[-init]:
#                            never candidates, never touched
#      "in_flight": bool,    layer creation may be under way (see below); then act on nothing
#      "in_flight_reason": "text",
#      "engine_pid": P, "engine_started": epoch seconds (0: engine not found),
#      "min_age_s": A,
#      "candidates": [{"id": "<overlay2 dir name>", "bytes": int, "age_s": int,
#                      "mounted": bool, "lower": bool, "open": bool}, ...],
#      "qualifying": [same shape],
#      "candidate_bytes": int, "qualifying_bytes": int}
#   candidates  valid-named directories of overlay2/ that no reference names
#   qualifying  candidates with mounted, lower and open all false and age_s >= A
#     bytes     disk usage of the dir tree (hard links counted once)
#     age_s     seconds since anything in the dir tree last changed (newest ctime: extraction
#               cannot backdate it the way it backdates mtimes from tar headers)
#     mounted   the id or its overlay2/l/<short> link appears in /proc/mounts or in any
#               process's /proc/<pid>/mountinfo (container mount namespaces included)
#     lower     another overlay2 dir lists its short link in its `lower` file
#     open      a process has a file, cwd or root inside it
#   in_flight   a docker-untar/docker-applyLayer helper runs, a process holds a file under
#               layerdb/tmp/ open, or a layerdb/tmp/ entry changed since the engine started
#               or less than A seconds ago (transactions die with the engine that began them)
#   exit 3 with a message on stderr when the metadata cannot be read with certainty (a reference
#   file that is empty or not a layer id, layer dirs without a layerdb): the check fails and
#   nothing can qualify.  Names are hex (+ "-init"): the JSON needs no escaping.
#   "in_flight" does not empty "qualifying": a runbook guards on it (the playbook refuses too).
#   Dirs of other names (BuildKit's 25-character snapshot ids) are "unexpected", never touched.
#
# POSIX sh + coreutils or busybox + awk (mawk, gawk, busybox).  Writes nothing anywhere.
# The probe reaches the device through Ansible's argument splitter: this file must contain no
# Jinja delimiter (brace-hash, brace-percent, unbalanced double braces).

set -u
LC_ALL=C
export LC_ALL
root=/var/lib/docker
ov=$root/overlay2
db=$root/image/overlay2/layerdb
NL='
'
min_age=${param_min_age:-3600}
case $min_age in
'' | *[!0-9]*)
	echo "orphan-layers: min_age must be whole seconds, got '$min_age'" >&2
	exit 2
	;;
esac
now=$(date +%s)

fail() {
	echo "orphan-layers: $*" >&2
	exit 3
}

# Length patterns (the shell's length operator starts with a Jinja comment delimiter).
any64=????????????????????????????????????????????????????????????????
any26=??????????????????????????

# is_id NAME: NAME is a layer dir id: 64 lower-case hex digits, optionally followed by -init.
is_id() {
	_h=${1%-init}
	case $_h in $any64) ;; *) return 1 ;; esac
	case $_h in *[!0-9a-f]*) return 1 ;; esac
	return 0
}

# in_set SET WORD: WORD is one of the newline-separated words of SET.
in_set() {
	case "$NL$1$NL" in *"$NL$2$NL"*) return 0 ;; esac
	return 1
}

# tree_stats PATH: "<bytes> <newest ctime>" of a directory tree on one file system.
tree_stats() {
	find "$1" -xdev -exec stat -c '%i %h %b %B %Z' {} + 2>/dev/null | awk '
		$2 > 1 { if ($1 in seen) next; seen[$1] = 1 }
		{ bytes += $3 * $4; if ($5 > newest) newest = $5 }
		END { printf "%.0f %.0f\n", bytes, newest }'
}

# --- the referenced set ------------------------------------------------------------------------
if [ ! -d "$ov" ]; then
	printf '{"root":"%s","dirs":0,"references":0,"missing_refs":0,"unexpected":0,' "$root"
	printf '"in_flight":false,"in_flight_reason":"","engine_pid":0,"engine_started":0,'
	printf '"min_age_s":%s,"candidates":[],"qualifying":[],"candidate_bytes":0,"qualifying_bytes":0}\n' "$min_age"
	exit 0
fi
meta=""
for sub in sha256 mounts tmp; do
	[ -d "$db/$sub" ] && meta="$meta $db/$sub"
done
refs=""
if [ -n "$meta" ]; then
	# Every file's first line must be an id; an empty or malformed file aborts the scan (awk's
	# END sees which of its ARGV files never produced a record).
	# shellcheck disable=SC2086 # $meta: the existing layerdb subdirs, plain paths
	out=$(find $meta -mindepth 2 -maxdepth 2 -type f \
		\( -name cache-id -o -name mount-id -o -name init-id \) -exec awk '
		function valid(s, h) {
			h = s
			if (length(h) == 69 && substr(h, 65) == "-init") h = substr(h, 1, 64)
			return length(h) == 64 && h !~ /[^0-9a-f]/
		}
		FNR == 1 { seen[FILENAME] = 1; if (valid($0)) print $0; else print "!" FILENAME }
		END { for (i = 1; i < ARGC; i++) if (!(ARGV[i] in seen)) print "!" ARGV[i] }
	' {} +) || fail "cannot read the layer metadata under $db"
	bad=$(printf '%s\n' "$out" | grep '^!' | head -n 1)
	[ -z "$bad" ] || fail "reference file ${bad#!} is empty or not a layer id"
	refs=$(printf '%s\n' "$out" | sort -u | grep -v '^$')
fi
references=0
[ -n "$refs" ] && references=$(printf '%s\n' "$refs" | wc -l | tr -d ' ')

# --- the layer dirs ----------------------------------------------------------------------------
dirs=0
unexpected=0
valid_dirs=""
names=$(ls -A "$ov") || fail "cannot list $ov"
IFS=$NL
for name in $names; do
	[ "$name" = l ] && continue
	dirs=$((dirs + 1))
	if is_id "$name" && [ -d "$ov/$name" ] && [ ! -L "$ov/$name" ]; then
		valid_dirs="$valid_dirs$name$NL"
	else
		unexpected=$((unexpected + 1))
	fi
done
unset IFS
if [ "$references" -eq 0 ] && [ "$dirs" -gt 0 ]; then
	fail "$dirs layer dirs but no layer metadata under $db: refusing to call them all orphans"
fi
missing_refs=0
for id in $refs; do
	in_set "$valid_dirs" "$id" || missing_refs=$((missing_refs + 1))
done

# --- what is in use ----------------------------------------------------------------------------
mounts=$(cat /proc/mounts /proc/[0-9]*/mountinfo 2>/dev/null |
	grep -oE '[0-9a-f]{64}(-init)?|/l/[A-Z0-9]{26}' | sort -u)
lowers=$(find "$ov" -mindepth 2 -maxdepth 2 -name lower -type f -exec cat {} + 2>/dev/null |
	grep -oE 'l/[A-Z0-9]{26}' | sed 's#^l/##' | sort -u)
# shellcheck disable=SC2010 # ls -l of /proc links is the portable readlink-many
busy=$(ls -l /proc/[0-9]*/fd/ /proc/[0-9]*/cwd /proc/[0-9]*/root 2>/dev/null |
	grep -oE '/overlay2/[0-9a-f]{64}(-init)?(/|$)|/layerdb/tmp/' | sort -u)

# --- layer creation in flight ------------------------------------------------------------------
engine_pid=0
for pf in /var/run/balena-engine.pid /run/balena-engine.pid /var/run/docker.pid /run/docker.pid; do
	[ -r "$pf" ] || continue
	p=$(cat "$pf" 2>/dev/null)
	case $p in '' | *[!0-9]*) continue ;; esac
	if [ -d "/proc/$p" ]; then
		engine_pid=$p
		break
	fi
done
if [ "$engine_pid" -eq 0 ]; then
	p=$(grep -lxE 'balenad|balena-engine-daemon|balena-engine|dockerd' /proc/[0-9]*/comm 2>/dev/null |
		head -n 1)
	p=${p#/proc/}
	p=${p%/comm}
	case $p in '' | *[!0-9]*) ;; *) engine_pid=$p ;; esac
fi
# The engine's start in wall-clock seconds, to the hundredth where `date` gives nanoseconds:
# now - uptime + the process's start in ticks after boot (btime alone is a whole second off).
# Without nanoseconds it comes out early, which only makes more entries count as in flight.
engine_started=0
engine_started_f=0
if [ "$engine_pid" -gt 0 ]; then
	ticks=$(sed 's/^.*) //' "/proc/$engine_pid/stat" 2>/dev/null | awk '{print $20}')
	hz=$(getconf CLK_TCK 2>/dev/null) || hz=100
	wall=$(date +%s.%N 2>/dev/null)
	case $wall in '' | *[!0-9.]*) wall=$(date +%s) ;; esac
	up=$(awk '{print $1}' /proc/uptime)
	case "$ticks$hz" in
	'' | *[!0-9]*) ;;
	*)
		engine_started_f=$(awk -v w="$wall" -v u="$up" -v t="$ticks" -v h="$hz" \
			'BEGIN { if (h > 0) printf "%.2f\n", w - u + t / h - 0.05; else print 0 }')
		engine_started=${engine_started_f%.*}
		;;
	esac
fi
reason=""
helpers=$(grep -lE '^docker-(untar|applyLayer|tarsplit)' /proc/[0-9]*/cmdline 2>/dev/null |
	sed -n 's#^/proc/\([0-9]*\)/cmdline$#\1#p' | tr '\n' ' ')
[ -n "$helpers" ] && reason="layer extraction running (pid ${helpers% }); "
in_set "$busy" "/layerdb/tmp/" && reason="${reason}a process holds a layer transaction open; "
if [ -d "$db/tmp" ]; then
	for t in "$db"/tmp/* "$db"/tmp/.[!.]*; do
		[ -e "$t" ] || [ -L "$t" ] || continue
		tname=${t##*/}
		case $tname in write-set-*) ;; *) tname="an unexpected entry" ;; esac
		case $tname in *[!a-z0-9-]*) tname="an unexpected entry" ;; esac
		changed=$(tree_stats "$t" | awk '{print $2}')
		changed=${changed:-0}
		if [ "$engine_started" -le 0 ]; then
			reason="${reason}layerdb/tmp has $tname and the engine's start time is unknown; "
		elif awk -v c="$changed" -v s="$engine_started_f" 'BEGIN { exit !(c + 1 > s) }'; then
			# ctime is whole seconds: a change at c happened before c + 1.
			reason="${reason}layerdb/tmp/$tname changed at $changed, engine started $engine_started_f; "
		elif [ $((now - ${changed:-0})) -lt "$min_age" ]; then
			reason="${reason}layerdb/tmp/$tname changed $((now - changed)) s ago; "
		fi
	done
fi
in_flight=false
[ -n "$reason" ] && in_flight=true
reason=${reason%; }

# --- candidates --------------------------------------------------------------------------------
cands=""
quals=""
cand_bytes=0
qual_bytes=0
for id in $valid_dirs; do
	in_set "$refs" "$id" && continue
	set -- $(tree_stats "$ov/$id")
	bytes=${1:-0}
	changed=${2:-0}
	age=$((now - changed))
	[ "$changed" -gt 0 ] && [ "$age" -ge 0 ] || age=0
	short=""
	[ -f "$ov/$id/link" ] && short=$(head -c 64 "$ov/$id/link" 2>/dev/null)
	case $short in *[!A-Z0-9]* | '') short="" ;; $any26) ;; *) short="" ;; esac
	mounted=false
	in_set "$mounts" "$id" && mounted=true
	[ -n "$short" ] && in_set "$mounts" "/l/$short" && mounted=true
	lower=false
	[ -n "$short" ] && in_set "$lowers" "$short" && lower=true
	open=false
	case "$NL$busy$NL" in *"/overlay2/$id/$NL"* | *"/overlay2/$id$NL"*) open=true ;; esac
	entry=$(printf '{"id":"%s","bytes":%s,"age_s":%s,"mounted":%s,"lower":%s,"open":%s}' \
		"$id" "$bytes" "$age" "$mounted" "$lower" "$open")
	cands="$cands,$entry"
	cand_bytes=$((cand_bytes + bytes))
	if [ "$mounted$lower$open" = falsefalsefalse ] && [ "$age" -ge "$min_age" ]; then
		quals="$quals,$entry"
		qual_bytes=$((qual_bytes + bytes))
	fi
done

printf '{"root":"%s","dirs":%s,"references":%s,"missing_refs":%s,"unexpected":%s,' \
	"$root" "$dirs" "$references" "$missing_refs" "$unexpected"
printf '"in_flight":%s,"in_flight_reason":"%s","engine_pid":%s,"engine_started":%s,' \
	"$in_flight" "$reason" "$engine_pid" "$engine_started"
printf '"min_age_s":%s,"candidates":[%s],"qualifying":[%s],' "$min_age" "${cands#,}" "${quals#,}"
printf '"candidate_bytes":%s,"qualifying_bytes":%s}\n' "$cand_bytes" "$qual_bytes"
