"""Real balena fleets: the balenaCloud / openBalena API as an Ansible inventory.

* :mod:`engine.balena.api`: the API client (httpx): ``whoami``, fleets by slug, their devices,
  paged, with bounded retries; every failure is an :class:`~engine.errors.InventoryError`
  (the token, the configuration: exit 2) or an :class:`~engine.errors.InventorySourceError`
  (the API unreachable or answering nonsense: exit 3).
* :mod:`engine.balena.inventory`: the plugin's configuration and what the devices become:
  host names, groups and host vars (pure functions, no Ansible).
* ``engine/ansible_plugins/inventory/balena_cloud.py``: the Ansible inventory plugin itself,
  a thin adapter over the two; :mod:`engine.tunnel`: the SSH ``ProxyCommand`` it configures.

The plugin runs inside Ansible (``ansible-inventory``, ``ansible-playbook``), where an error
can only travel as Ansible's text.  So the plugin writes each error as one line that starts
with a marker naming its class (:func:`marked`), and the engine's adapters turn Ansible's
output back into the error (:func:`inventory_error`): the CLI prints that one line and exits
2 or 3 as for any other error.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import EngineError, InventoryError, InventorySourceError

__all__ = ["carries_error", "inventory_error", "marked"]

_MARK = "balena-inventory"
_KINDS = {"input": InventoryError, "unavailable": InventorySourceError}
_MARKED = re.compile(rf"\[{_MARK}:(?P<kind>input|unavailable)\] (?P<line>[^\r\n]*)")


def marked(error: EngineError) -> str:
    """``error`` as the one line the plugin hands to Ansible, with its class marker."""
    kind = "unavailable" if isinstance(error, InventorySourceError) else "input"
    line = " ".join(str(error).split())
    return f"[{_MARK}:{kind}] {line}"


def carries_error(ansible_output: str) -> bool:
    """Whether Ansible's output holds an error line of the balena plugin."""
    return _MARKED.search(ansible_output) is not None


def inventory_error(inventory: Path, ansible_output: str) -> EngineError | None:
    """The error the balena plugin reported in Ansible's output, if it reported one."""
    found = _MARKED.search(ansible_output)
    if found is None:
        return None
    line = found["line"].strip()
    return _KINDS[found["kind"]](f"inventory {inventory}: {line}")
