"""A simulated fleet (tests, benchmarks): local hosts whose device state is a file per host.

Every host connects with the ``sim_device`` connection plugin (``ansible.builtin.local``,
with ``DEVICE`` set to the host's name in each command), so one machine stands in for a
fleet: a host is "sick" while ``ROOT/DEVICE`` holds ``sick``, and the runbook's step writes
``fixed`` there, appending a line to ``ROOT/DEVICE.log`` each time it acts (so a test counts
the fixes a host got) and one to ``ROOT/DEVICE.effective`` once the state is written (a fix
that took effect; one cut short before it did is only in the first).  Marker files beside it
slow a probe or a fix down, or break a fix.  Only ``raw`` runs, as on a balenaOS device.

A fleet made with a ``group`` keeps its hosts (and their connection) in that inventory
group, so other hosts (lab devices over SSH, :meth:`SimFleet.add_group`) can share the
inventory; the runbook then targets the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

PLUGINS = Path(__file__).resolve().parent / "ansible_plugins"

RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {{name: sim-fleet, title: A simulated device's state file says sick}}
targets: {{hosts: {target}}}
{triggers}params:
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
        echo "$$" >> "{{ root }}/$DEVICE.effective";
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
        return self._lines(f"{name}.log")

    def effective_fixes(self, name: str) -> int:
        """How many times a fix of a device took effect (wrote its state)."""
        return self._lines(f"{name}.effective")

    def _lines(self, file: str) -> int:
        log = self.root / file
        return len(log.read_text().splitlines()) if log.exists() else 0

    def add_group(self, name: str, group: Mapping[str, object]) -> None:
        """Add an inventory group (``hosts``, ``vars``) beside the fleet's own group."""
        yaml = YAML(typ="safe", pure=True)
        data = yaml.load(self.inventory)
        children = data["all"].get("children")
        if children is None or name in children:
            raise ValueError(f"{self.inventory}: made without a group, or {name!r} is taken")
        children[name] = dict(group)
        with self.inventory.open("w") as out:
            yaml.dump(data, out)


def make_fleet(
    base: Path,
    hosts: int,
    *,
    serial: int = 1000,
    max_fail_pct: int = 100,
    group: str | None = None,
    alertname: str | None = None,
) -> SimFleet:
    """A fleet of ``hosts`` simulated devices ``dev0001``...; none sick yet.

    ``group``: the inventory group holding them (default: directly under ``all``);
    ``alertname``: an alert (its ``device`` label naming the host) that runs the runbook.
    """
    project, root = base / "project", base / "devices"
    for folder in (project / "runbooks", project / "playbooks", root):
        folder.mkdir(parents=True)
    (project / "runbooks" / "sim-fleet.yml").write_text(
        RUNBOOK.format(
            root=root,
            serial=serial,
            max_fail_pct=max_fail_pct,
            target=group or "all",
            triggers=(
                f"triggers: [{{alertname: {alertname}, device_label: device, mode: apply}}]\n"
                if alertname
                else ""
            ),
        )
    )
    (project / "playbooks" / "sim-heal.yml").write_text(PLAYBOOK)
    names = tuple(f"dev{n:04d}" for n in range(1, hosts + 1))
    indent = "    " if group else ""
    lines = [
        "all:",
        *(["  children:", f"    {group}:"] if group else []),
        f"{indent}  vars:",
        f"{indent}    ansible_connection: sim_device",
        f"{indent}    ansible_python_interpreter: /nonexistent/python3",
        f"{indent}  hosts:",
        *(f"{indent}    {name}:" for name in names),
    ]
    (project / "inventory.yml").write_text("\n".join(lines) + "\n")
    return SimFleet(project=project, root=root, names=names)
