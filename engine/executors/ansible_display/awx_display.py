"""ansible-runner's event callback for the engine's probe plays, less one event per host.

ansible-runner tells ``ansible-playbook`` to use its ``awx_display`` callback, loaded from
the folder ``$AWX_LIB_DIRECTORY`` names (its own by default).  For probes, the engine points
that at this folder: this ``awx_display`` is ansible-runner's, except that a task starting
on a host (``runner_on_start``) is not an event.  Ansible announces it from its main process
before it starts each host's worker, so every such event (context, a JSON file to pick up,
a framed record on the terminal, and the engine's side reading both) delayed the next host's
start and cost the controller CPU, for an event the probe never reads: each host's result
event (``runner_on_ok``, ``_failed``, ``_unreachable``) still comes, with its duration.
Playbook steps keep ansible-runner's own callback and every event.

Like ``remediate_targets``, this file runs inside Ansible processes only.
"""

from __future__ import annotations

from typing import Any

from ansible_runner.display_callback.callback.awx_display import (
    CallbackModule as _RunnerCallback,
)
from ansible_runner.display_callback.callback.awx_display import current_time

# Ansible reads a plugin's options from this text in its file (ansible-runner's own, as is).
DOCUMENTATION = """
    callback: awx_display
    short_description: Playbook event dispatcher for ansible-runner
    version_added: "2.0"
    description:
        - This callback is necessary for ansible-runner to work
    type: stdout
    extends_documentation_fragment:
      - default_callback
    requirements:
      - Set as stdout in config
"""


class CallbackModule(_RunnerCallback):  # type: ignore[misc] # ansible-runner's has no types
    """ansible-runner's ``awx_display``, without ``runner_on_start`` events."""

    CALLBACK_NAME = "awx_display"

    def v2_runner_on_start(self, host: Any, task: Any) -> None:  # noqa: ARG002 - Ansible's API
        """Note when the host's task started (for its result's duration); no event."""
        self._host_start[host.get_name()] = current_time()
