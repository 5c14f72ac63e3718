"""Ansible plugins shipped with the project, and how Ansible finds them.

``inventory/balena_cloud.py`` is the balenaCloud / openBalena inventory plugin.  The engine
puts :data:`INVENTORY_PLUGINS` on ``ANSIBLE_INVENTORY_PLUGINS`` for every Ansible it starts
(:func:`inventory_plugins_env`); for plain ``ansible-inventory`` see ``inventories/README.md``
(``python -m engine.ansible_plugins`` prints the ``export`` line).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

#: The folder of the project's inventory plugins.
INVENTORY_PLUGINS = Path(__file__).parent / "inventory"


def inventory_plugins_env() -> dict[str, str]:
    """``ANSIBLE_INVENTORY_PLUGINS`` with the project's plugins first, then the caller's."""
    paths = (str(INVENTORY_PLUGINS), os.environ.get("ANSIBLE_INVENTORY_PLUGINS"))
    return {"ANSIBLE_INVENTORY_PLUGINS": os.pathsep.join(p for p in paths if p)}


def export_line() -> str:
    """The shell line that lets plain Ansible find the project's inventory plugins."""
    paths = inventory_plugins_env()["ANSIBLE_INVENTORY_PLUGINS"]
    return f"export ANSIBLE_INVENTORY_PLUGINS={shlex.quote(paths)}"
