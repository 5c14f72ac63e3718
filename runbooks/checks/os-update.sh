# A host OS update in progress: one line per sign of it, none when there is none.
#
#   breadcrumb <path>   /mnt/state/rollback-health-breadcrumb or rollback-altboot-breadcrumb:
#                       the device booted a new OS and its rollback checks have not finished
#                       (the Supervisor refuses to reboot while they exist)
#   process <pid> <cmd> the host OS updater (hostapp-update) or the Supervisor updater
#                       (update-balena-supervisor, older update-resin-supervisor) is running
#   unit <name> <state> update-balena-supervisor.service is starting or running
# Acting on the device during an update can leave it on neither OS.  Read-only.  (The patterns
# are bracketed so that they do not match this script's own command line.)
for f in /mnt/state/rollback-health-breadcrumb /mnt/state/rollback-altboot-breadcrumb; do
  [ -e "$f" ] && echo "breadcrumb $f"
done
for p in $(pgrep -f '(^|/)([h]ostapp-update|[u]pdate-balena-supervisor|[u]pdate-resin-supervisor)( |$)'); do
  [ "$p" = "$$" ] && continue
  cmd=$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | tr -d '\000-\037' | sed 's/ *$//' | cut -c1-160)
  [ -n "$cmd" ] && echo "process $p $cmd"
done
state=$(systemctl show -p ActiveState --value update-balena-supervisor.service 2>/dev/null)
case "$state" in
  active | activating | reloading) echo "unit update-balena-supervisor.service $state" ;;
esac
exit 0
