"""A simulated fleet (tests, benchmarks): local hosts whose device state is a file per host.

Every host connects with the ``sim_device`` connection plugin (``ansible.builtin.local``,
with ``DEVICE`` set to the host's name in each command), so one machine stands in for a
fleet: a host is "sick" while ``ROOT/DEVICE`` holds ``sick``, and the runbook's step writes
``fixed`` there, appending a line to ``ROOT/DEVICE.log`` each time it acts (so a test counts
the fixes a host got).  Marker files beside it slow a probe or a fix down, or break a fix.
Only ``raw`` runs, as on a balenaOS device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent / "ansible_plugins"

RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {{name: sim-fleet, title: A simulated device's state file says sick}}
targets: {{hosts: all}}
params:
  root: {{type: str, default: "{root}"}}
checks:
  - id: state
    run: >-
      slow="$param_root/$DEVICE.probe_slow";
      if [ -f "$slow" ]; then sleep "$(cat "$slow")"; fi;
      cat "$param_root/$DEVICE" 2>/dev/null || echo ok
    parse: str
symptom: "checks.state == 'sick'"
guards:
  - {{id: lock, lock: true}}
  - {{id: cooldown, cooldown: 10m}}
steps:
  - id: heal
    playbook: sim-heal.yml
    plan: "write fixed into the device's state file"
    vars: {{root: "{{{{ params.root }}}}"}}
verify: "checks.state == 'fixed'"
policy: {{serial: {serial}, max_fail_pct: {max_fail_pct}, max_hosts_pct: 100, approval: never}}
"""

PLAYBOOK = """\
- name: Heal a simulated device
  hosts: all
  gather_facts: false
  tasks:
    - name: Count the fix, wait a little, write the state
      ansible.builtin.raw: >-
        echo "$$" >> "{{ root }}/$DEVICE.log";
        if [ -f "{{ root }}/$DEVICE.slow" ]; then sleep "$(cat "{{ root }}/$DEVICE.slow")"; fi;
        if [ -f "{{ root }}/$DEVICE.broken" ]; then exit 1; fi;
        echo fixed > "{{ root }}/$DEVICE";
        after="{{ root }}/$DEVICE.slow_after";
        if [ -f "$after" ]; then sleep "$(cat "$after")"; fi
"""


@dataclass(frozen=True)
class SimFleet:
    """A project folder (runbooks, playbooks, inventory) and its devices' state folder."""

    project: Path
    root: Path
    names: tuple[str, ...]

    @property
    def inventory(self) -> Path:
        """The fleet's inventory."""
        return self.project / "inventory.yml"

    @property
    def env(self) -> dict[str, str]:
        """What a process running the fleet's playbooks needs in its environment."""
        return {
            "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS / "connection"),
            "REMEDIATE_RUNBOOKS": str(self.project / "runbooks"),
            "REMEDIATE_PLAYBOOKS": str(self.project / "playbooks"),
        }

    def make_sick(self, names: Iterable[str]) -> None:
        """Give these devices the symptom."""
        for name in names:
            (self.root / name).write_text("sick\n")

    def slow(self, names: Iterable[str], seconds: float) -> None:
        """Make the fix of these devices take ``seconds``."""
        for name in names:
            (self.root / f"{name}.slow").write_text(f"{seconds}\n")

    def slow_after(self, names: Iterable[str], seconds: float) -> None:
        """Make the fix of these devices hang ``seconds`` after it took effect."""
        for name in names:
            (self.root / f"{name}.slow_after").write_text(f"{seconds}\n")

    def slow_probe(self, names: Iterable[str], seconds: float) -> None:
        """Make probing these devices take ``seconds``."""
        for name in names:
            (self.root / f"{name}.probe_slow").write_text(f"{seconds}\n")

    def break_fix(self, names: Iterable[str]) -> None:
        """Make the fix of these devices fail."""
        for name in names:
            (self.root / f"{name}.broken").write_text("1\n")

    def state(self, name: str) -> str:
        """A device's state: sick, fixed or ok."""
        path = self.root / name
        return path.read_text().strip() if path.exists() else "ok"

    def fixes(self, name: str) -> int:
        """How many times the fix ran on a device."""
        log = self.root / f"{name}.log"
        return len(log.read_text().splitlines()) if log.exists() else 0


def make_fleet(base: Path, hosts: int, *, serial: int = 1000, max_fail_pct: int = 100) -> SimFleet:
    """A fleet of ``hosts`` simulated devices ``dev0001``...; none sick yet."""
    project, root = base / "project", base / "devices"
    for folder in (project / "runbooks", project / "playbooks", root):
        folder.mkdir(parents=True)
    (project / "runbooks" / "sim-fleet.yml").write_text(
        RUNBOOK.format(root=root, serial=serial, max_fail_pct=max_fail_pct)
    )
    (project / "playbooks" / "sim-heal.yml").write_text(PLAYBOOK)
    names = tuple(f"dev{n:04d}" for n in range(1, hosts + 1))
    lines = [
        "all:",
        "  vars:",
        "    ansible_connection: sim_device",
        "    ansible_python_interpreter: /nonexistent/python3",
        "  hosts:",
        *(f"    {name}:" for name in names),
    ]
    (project / "inventory.yml").write_text("\n".join(lines) + "\n")
    return SimFleet(project=project, root=root, names=names)
