"""A simulated device (tests, benchmarks): a local connection telling commands their host.

Like ``ansible.builtin.local``, but every command runs with ``DEVICE`` set to the host's
address (``ansible_host``, by default its inventory name), so one machine can stand in for
a fleet whose hosts keep their own state (a file per host, named after ``$DEVICE``).
"""

from __future__ import annotations

import shlex
from typing import Any

from ansible.plugins.connection.local import DOCUMENTATION as _LOCAL_DOCUMENTATION
from ansible.plugins.connection.local import Connection as LocalConnection

DOCUMENTATION = _LOCAL_DOCUMENTATION.replace("name: local", "name: sim_device", 1)


class Connection(LocalConnection):  # type: ignore[misc] # Ansible ships no type information
    """``local``, with ``DEVICE`` exported to every command."""

    transport = "sim_device"

    def exec_command(self, cmd: Any, in_data: Any = None, sudoable: bool = True) -> Any:
        """Run ``cmd`` as ``local`` does, with ``DEVICE`` set."""
        device = shlex.quote(str(self._play_context.remote_addr))
        prefix = f"DEVICE={device}; export DEVICE; "
        cmd = prefix.encode() + cmd if isinstance(cmd, bytes) else prefix + cmd
        return super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
