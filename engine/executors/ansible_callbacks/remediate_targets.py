"""Which inventory hosts a host pattern, narrowed by a limit, selects: Ansible's own answer.

This file runs inside Ansible processes only, never in the engine's (Ansible's global
configuration and plugin state stay out of the engine), in two ways:

* as the ``remediate_targets`` callback plugin of the probe's ``ansible-playbook``: when the
  play starts, it writes the selection to the JSON file named by ``$REMEDIATE_TARGETS`` (see
  :func:`_request`), answered from that run's own inventory (read once, ``--limit``
  applied): the run that probes the hosts is also the one that resolves them, and a
  dynamic inventory cannot answer the selection and the play differently;
* as a script, ``python remediate_targets.py INVENTORY PATTERN [LIMIT]``, printing the
  selection as JSON on stdout, or Ansible's error on stderr with exit code 3
  (:func:`engine.targets.select_hosts`); with ``--lines`` first, one JSON line per host
  (name, vars, groups) as it is read, for a reader that streams them
  (:func:`engine.targets.stream_hosts`).

Both answer with :func:`selected`, over what ``ansible-inventory --list`` uses
(``InventoryManager`` and ``VariableManager``): every inventory format, ``group_vars`` and
``host_vars``, every pattern and limit form (``@file`` included).  Ansible's *implicit*
``localhost`` is never selected, and host vars are the merged, untemplated values.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from ansible import constants as C  # noqa: N812 - Ansible's own spelling
from ansible.errors import AnsibleError
from ansible.inventory.host import Host
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.callback import CallbackBase
from ansible.utils.vars import load_options_vars
from ansible.vars.manager import VariableManager

#: The environment variable that asks the callback for the selection (JSON, see _request).
REQUEST_ENV = "REMEDIATE_TARGETS"


def select_hosts(inventory: str, pattern: str, limit: str | None) -> list[list[Any]]:
    """``[[name, vars], ...]`` of the hosts ``pattern`` and ``limit`` select, in Ansible's order.

    Raises ``AnsibleError`` when the inventory or the limit cannot be read.
    """
    loader = DataLoader()
    hosts = InventoryManager(loader=loader, sources=[inventory])
    hosts.subset(limit)
    return selected(hosts, VariableManager(loader=loader, inventory=hosts), pattern)


def selected(hosts: InventoryManager, variables: VariableManager, pattern: str) -> list[list[Any]]:
    """``[[name, vars], ...]`` of the hosts ``pattern`` selects in ``hosts`` (its limit applied).

    A running play's restriction to its current batch is ignored: the answer is the whole
    selection, whatever part of it the play is working on.
    """
    return [[host.name, host_vars] for host, host_vars in _walk(hosts, variables, pattern)]


def _walk(
    hosts: InventoryManager, variables: VariableManager, pattern: str
) -> Iterator[tuple[Host, dict[str, Any]]]:
    """Yield each selected host and its inventory vars (Ansible's own left out), in order."""
    # Ansible's own variables, not the inventory's: static ones, and the command line's
    # (ansible_check_mode & co., which only ansible-playbook sets).
    internal = C.INTERNAL_STATIC_VARS | set(load_options_vars(None))
    for host in hosts.get_hosts(pattern, ignore_restrictions=True):
        if host.implicit:
            continue
        host_vars = variables.get_vars(host=host, include_hostvars=False, stage="all")
        for name in internal:
            host_vars.pop(name, None)
        yield host, dict(host_vars)


def host_lines(inventory: str, pattern: str, limit: str | None) -> Any:
    """Yield ``[name, vars, groups]`` of each selected host, in Ansible's order."""
    loader = DataLoader()
    hosts = InventoryManager(loader=loader, sources=[inventory])
    hosts.subset(limit)
    variables = VariableManager(loader=loader, inventory=hosts)
    for host, host_vars in _walk(hosts, variables, pattern):
        groups = sorted(g.name for g in host.get_groups() if g.name not in {"all", "ungrouped"})
        yield [host.name, host_vars, groups]


def _plain(value: object) -> str:
    """JSON for the odd value a YAML inventory can hold (dates); a placeholder otherwise."""
    isoformat = getattr(value, "isoformat", None)
    return str(isoformat()) if callable(isoformat) else f"<{type(value).__name__}>"


def _dump(data: object) -> str:
    return json.dumps(data, default=_plain)


def _request() -> dict[str, Any] | None:
    """``{"pattern", "out"}`` from the environment, or None when unset."""
    text = os.environ.get(REQUEST_ENV)
    if not text:
        return None
    request = json.loads(text)
    return request if isinstance(request, dict) else None


class CallbackModule(CallbackBase):  # type: ignore[misc] # Ansible ships no type information
    """Writes the selection when the first play starts, for the engine to read after the run."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "remediate_targets"
    CALLBACK_NEEDS_ENABLED = False  # loaded from its folder; inert unless $REMEDIATE_TARGETS

    def __init__(self) -> None:
        super().__init__()
        self._request = _request()

    def v2_playbook_on_play_start(self, play: Any) -> None:
        """Resolve the request's pattern in this run's inventory, as its ``--limit`` narrowed it."""
        request, self._request = self._request, None  # the probe playbook has one play
        if request is None:
            return
        variables = play.get_variable_manager()
        hosts = variables._inventory  # the run's inventory: VariableManager has no accessor
        try:
            answer: dict[str, Any] = {"hosts": selected(hosts, variables, request["pattern"])}
        except AnsibleError as exc:
            answer = {"error": str(exc.message or exc)}
        descriptor = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(_dump(answer))


def main(argv: list[str]) -> int:
    """The script: ``[--lines] INVENTORY PATTERN [LIMIT]``; JSON on stdout, or exit 3."""
    if argv and argv[0] == "--lines":
        return _lines(argv[1:])
    inventory, pattern = argv[0], argv[1]
    limit = argv[2] if len(argv) > 2 else None  # noqa: PLR2004 - the optional third argument
    try:
        selected = select_hosts(inventory, pattern, limit)
    except AnsibleError as exc:
        sys.stderr.write(f"{exc.message or exc}\n")
        return 3
    sys.stdout.write(_dump(selected))
    return 0


def _lines(argv: list[str]) -> int:
    inventory, pattern = argv[0], argv[1]
    limit = argv[2] if len(argv) > 2 else None  # noqa: PLR2004 - the optional third argument
    try:
        for line in host_lines(inventory, pattern, limit):
            sys.stdout.write(_dump(line) + "\n")
    except AnsibleError as exc:
        sys.stderr.write(f"{exc.message or exc}\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
