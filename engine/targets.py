"""Targets: which inventory hosts a runbook acts on.

The runbook's host pattern, narrowed by ``--limit``, is resolved by Ansible itself
(``InventoryManager`` and ``VariableManager``, exactly what ``ansible-inventory --list``
uses) in **one** child process of the Python that runs the engine.  So INI, YAML and
plugin inventories, ``group_vars``/``host_vars`` and every pattern form (``all``, groups,
``a:b``, ``!x``, ``&y``, globs, ``~regex``, ``@file`` limits) behave as in
``ansible-playbook``, and Ansible's global configuration never enters this process.

Two deliberate differences from a play's host list:

* Ansible's *implicit* ``localhost`` (created when a pattern names ``localhost`` but the
  inventory does not) is never a target: a runbook acts only on inventory hosts.
* Host vars are the merged, **untemplated** values, as ``ansible-inventory --list`` shows
  them (a ``{{ }}`` stays text).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.errors import InventoryError

#: Runs in the child: argv is ``INVENTORY PATTERN [LIMIT]``; prints ``[[name, vars], ...]``.
#: Kept to Ansible's public-ish API used by ``ansible-inventory`` itself.
_RESOLVE_SCRIPT = """
import json, sys
from ansible import constants as C
from ansible.errors import AnsibleError
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.vars.manager import VariableManager

def _plain(value):
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return "<%s>" % type(value).__name__

source, pattern = sys.argv[1], sys.argv[2]
limit = sys.argv[3] if len(sys.argv) > 3 else None
try:
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[source])
    inventory.subset(limit)
    variables = VariableManager(loader=loader, inventory=inventory)
    selected = []
    for host in inventory.get_hosts(pattern):
        if host.implicit:
            continue
        host_vars = variables.get_vars(host=host, include_hostvars=False, stage="all")
        for name in C.INTERNAL_STATIC_VARS:
            host_vars.pop(name, None)
        selected.append([host.name, dict(host_vars)])
except AnsibleError as exc:
    sys.stderr.write("%s\\n" % (exc.message or exc,))
    sys.exit(3)
json.dump(selected, sys.stdout, default=_plain)
"""

#: Make Ansible fail (instead of warning and going on with no hosts) on a bad inventory.
_CHILD_ENV = {
    "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
    "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
    "ANSIBLE_NOCOLOR": "True",
    "NO_COLOR": "1",
    "ANSIBLE_FORCE_COLOR": "False",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Host(_Frozen):
    """One inventory host with its merged (untemplated) inventory variables."""

    name: str
    vars: dict[str, Any]


class TargetSet(_Frozen):
    """The hosts a pattern (narrowed by a limit) selects from an inventory, in Ansible's order."""

    inventory: Path
    pattern: str
    limit: str | None = None
    hosts: tuple[Host, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The selected host names, in inventory order."""
        return tuple(h.name for h in self.hosts)


def resolve_targets(inventory: Path, pattern: str, limit: str | None = None) -> TargetSet:
    """Select the hosts of ``inventory`` matching ``pattern`` and ``limit``, as Ansible would.

    Raises :class:`InventoryError` when the inventory is missing or cannot be parsed, or when
    the selection is empty.
    """
    if not inventory.exists():
        raise InventoryError(f"inventory {inventory}: no such file or directory")
    argv = [sys.executable, "-c", _RESOLVE_SCRIPT, str(inventory), pattern]
    if limit is not None:
        argv.append(limit)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, **_CHILD_ENV},
            check=False,
        )
    except OSError as exc:
        raise InventoryError(f"inventory {inventory}: cannot run Ansible: {exc}") from exc
    if proc.returncode != 0:
        raise InventoryError(f"inventory {inventory}: {_last_error(proc.stderr)}")
    try:
        selected = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"inventory {inventory}: unreadable Ansible output: {exc}") from exc
    hosts = tuple(Host(name=name, vars=host_vars) for name, host_vars in selected)
    if not hosts:
        narrowed = f" with --limit {limit!r}" if limit is not None else ""
        raise InventoryError(
            f"inventory {inventory}: host pattern {pattern!r}{narrowed} selects no host"
        )
    return TargetSet(inventory=inventory, pattern=pattern, limit=limit, hosts=hosts)


def _last_error(stderr: str) -> str:
    """The useful part of Ansible's stderr: its error lines, without tracebacks or warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("[WARNING]")]
    text = " ".join(errors[-6:]) if errors else "Ansible failed without a message"
    return text[:2000]
