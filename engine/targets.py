"""Targets: which inventory hosts a runbook acts on.

The runbook's host pattern, narrowed by ``--limit``, is resolved by Ansible itself
(``InventoryManager`` and ``VariableManager``, exactly what ``ansible-inventory --list``
uses), never in the engine's own process, so Ansible's global configuration never enters
it.  INI, YAML and plugin inventories, ``group_vars``/``host_vars`` and every pattern form
(``all``, groups, ``a:b``, ``!x``, ``&y``, globs, ``~regex``, ``@file`` limits) behave as in
``ansible-playbook``.  The Ansible side is one file,
``engine/executors/ansible_callbacks/remediate_targets.py``, used in two ways:

* a run's targets come with its first probe: the pipeline asks a
  :class:`~engine.executors.base.SelectingExecutor` to select the hosts and probe them in one
  call, and the Ansible executor does both in one ``ansible-playbook`` (the file is its
  callback plugin), which reads the inventory once, as a hand-written play would;
* :func:`resolve_targets` (the webhook server, executors that cannot select) runs the file
  as a script in **one** child process of the Python that runs the engine.

Every Ansible started here gets the project's inventory plugins on
``ANSIBLE_INVENTORY_PLUGINS`` (:mod:`engine.ansible_plugins`: ``balena_cloud``), and an
error the balena plugin reports becomes :class:`InventoryError` (exit 2) or
:class:`~engine.errors.InventorySourceError` (exit 3) with its one line
(:func:`engine.balena.inventory_error`).

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
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from engine.ansible_plugins import inventory_plugins_env
from engine.balena import inventory_error
from engine.errors import InventoryError
from engine.executors.ansible_env import INVENTORY_ENV, PLAIN_OUTPUT_ENV
from engine.executors.base import Host, Selection
from engine.models import FrozenModel
from engine.runbooks import Runbook

__all__ = [
    "SELECT_SCRIPT",
    "Host",
    "TargetSet",
    "resolve_targets",
    "runbook_selection",
    "select_hosts",
    "stream_hosts",
    "target_set",
]

#: The Ansible side: ``python SELECT_SCRIPT INVENTORY PATTERN [LIMIT]`` prints the selection.
SELECT_SCRIPT = Path(__file__).parent / "executors" / "ansible_callbacks" / "remediate_targets.py"

_CHILD_ENV = {**INVENTORY_ENV, **PLAIN_OUTPUT_ENV}


class TargetSet(FrozenModel):
    """The hosts a pattern (narrowed by a limit) selects from an inventory, in Ansible's order."""

    inventory: Path
    pattern: str
    limit: str | None = None
    hosts: tuple[Host, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The selected host names, in inventory order."""
        return tuple(h.name for h in self.hosts)


def runbook_selection(
    runbook: Runbook,
    inventory: Path,
    limit: str | None = None,
    only: Sequence[str] | None = None,
) -> Selection:
    """What a run of ``runbook`` selects: its host pattern, narrowed by ``limit``.

    ``only``: exact host names the run keeps (applying a saved plan: the reviewed hosts).
    """
    return Selection(
        inventory=inventory,
        pattern=runbook.spec.targets.hosts,
        limit=limit,
        only=None if only is None else tuple(only),
    )


def resolve_targets(inventory: Path, pattern: str, limit: str | None = None) -> TargetSet:
    """Select the hosts of ``inventory`` matching ``pattern`` and ``limit``, as Ansible would.

    Raises :class:`InventoryError` when the inventory is missing or cannot be parsed, or when
    the selection is empty.
    """
    return target_set(inventory, pattern, limit, select_hosts(inventory, pattern, limit))


def target_set(
    inventory: Path, pattern: str, limit: str | None, hosts: Sequence[Host]
) -> TargetSet:
    """The target set of a selection; an empty one is an :class:`InventoryError`."""
    if not hosts:
        narrowed = f" with --limit {limit!r}" if limit is not None else ""
        raise InventoryError(
            f"inventory {inventory}: host pattern {pattern!r}{narrowed} selects no host"
        )
    return TargetSet(inventory=inventory, pattern=pattern, limit=limit, hosts=tuple(hosts))


def select_hosts(inventory: Path, pattern: str, limit: str | None = None) -> tuple[Host, ...]:
    """The hosts ``pattern`` and ``limit`` select (maybe none), from one child process.

    Raises :class:`InventoryError` when the inventory is missing or cannot be parsed, and
    :class:`~engine.errors.InventorySourceError` when its source (the balena API) is down.
    """
    if not inventory.exists():
        raise InventoryError(f"inventory {inventory}: no such file or directory")
    argv = [sys.executable, str(SELECT_SCRIPT), str(inventory), pattern]
    if limit is not None:
        argv.append(limit)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env={**os.environ, **_CHILD_ENV, **inventory_plugins_env()},
            check=False,
        )
    except OSError as exc:
        raise InventoryError(f"inventory {inventory}: cannot run Ansible: {exc}") from exc
    if proc.returncode != 0:
        raise inventory_error(inventory, proc.stderr) or InventoryError(
            f"inventory {inventory}: {_last_error(proc.stderr)}"
        )
    try:
        return tuple(Host(name=name, vars=host_vars) for name, host_vars in json.loads(proc.stdout))
    except (ValueError, ValidationError) as exc:
        raise InventoryError(f"inventory {inventory}: unreadable Ansible output: {exc}") from exc


def stream_hosts(
    inventory: Path, pattern: str, limit: str | None = None
) -> Iterator[tuple[Host, tuple[str, ...]]]:
    """Each host ``pattern`` and ``limit`` select, with its groups, read as Ansible prints it.

    For a selection too large to hold at once (a coordinator writing a fleet into the state
    database): one JSON line per host from the child process, never the whole list.
    Raises :class:`InventoryError` when the inventory cannot be read.
    """
    if not inventory.exists():
        raise InventoryError(f"inventory {inventory}: no such file or directory")
    argv = [sys.executable, str(SELECT_SCRIPT), "--lines", str(inventory), pattern]
    if limit is not None:
        argv.append(limit)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **_CHILD_ENV},
        )
    except OSError as exc:
        raise InventoryError(f"inventory {inventory}: cannot run Ansible: {exc}") from exc
    try:
        assert proc.stdout is not None  # noqa: S101 - asked for above
        for line in proc.stdout:
            try:
                name, host_vars, groups = json.loads(line)
                yield Host(name=name, vars=host_vars), tuple(groups)
            except (ValueError, ValidationError) as exc:
                raise InventoryError(
                    f"inventory {inventory}: unreadable Ansible output: {exc}"
                ) from exc
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        if proc.wait() != 0:
            raise InventoryError(f"inventory {inventory}: {_last_error(stderr)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _last_error(stderr: str) -> str:
    """The useful part of Ansible's stderr: its error lines, without tracebacks or warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("[WARNING]")]
    text = " ".join(errors[-6:]) if errors else "Ansible failed without a message"
    return text[:2000]
