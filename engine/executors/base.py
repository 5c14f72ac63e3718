"""The one small interface between the pipeline and whatever runs things on devices.

The pipeline never imports ansible-runner: it talks to an :class:`Executor`.
``AnsibleExecutor`` drives real ansible-runner; ``FakeExecutor`` (tests) answers from a table.
An executor that can also select the hosts of an inventory itself is a
:class:`SelectingExecutor`: the pipeline then resolves a run's targets and probes them in one
call (with Ansible, one ``ansible-playbook`` reads the inventory once instead of twice).  One
that can also start that call in the background is a :class:`BackgroundSelectingExecutor`:
an entry point starts a run's first probe as soon as it knows the runbook, and prepares the
rest of the run (state store, audit log) while the probe runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import Field

from engine.models import FrozenModel


class HostStatus(StrEnum):
    """How one host fared in one executor call."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


class CommandResult(FrozenModel):
    """Result of one ``raw`` command on one host."""

    host: str
    status: HostStatus
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    message: str = ""


class TaskResult(FrozenModel):
    """One task of a playbook on one host, as ansible-runner reported it."""

    name: str
    status: HostStatus | None = None  # None: skipped
    changed: bool = False
    message: str = ""
    stdout: str = ""


class PlaybookResult(FrozenModel):
    """Result of one playbook run on one host."""

    host: str
    status: HostStatus
    tasks: tuple[TaskResult, ...] = ()
    message: str = ""

    @property
    def changed(self) -> bool:
        """Whether any task reported a change."""
        return any(t.changed for t in self.tasks)


class PlaybookRequest(FrozenModel):
    """A playbook to run on some hosts with extra vars."""

    playbook: Path
    hosts: tuple[str, ...]
    extravars: Mapping[str, Any] = Field(default_factory=dict, repr=False)  # may hold secrets
    label: str = ""  # a name for the artifacts folder, e.g. the step id
    secret_values: frozenset[str] = Field(default_factory=frozenset, repr=False)
    """Values scrubbed from what the run keeps (the run's secret params), besides the
    executor's own (see :mod:`engine.redaction`)."""


class Host(FrozenModel):
    """One inventory host with its merged (untemplated) inventory variables."""

    name: str
    vars: dict[str, Any]


class Selection(FrozenModel):
    """Which inventory hosts a call is about, chosen the way ansible-playbook chooses them."""

    inventory: Path
    pattern: str
    """An Ansible host pattern (a runbook's ``targets.hosts``)."""
    limit: str | None = None
    """Narrows the pattern as ``--limit`` does (``@file`` included)."""
    only: tuple[str, ...] | None = None
    """If set, exact host names: the script runs on the selected hosts among them only."""


class SelectionResult(FrozenModel):
    """The hosts a selection picked and a script's result on each host it ran on."""

    hosts: tuple[Host, ...]
    """Every host the pattern and limit select, in inventory order (``only`` not applied)."""
    results: dict[str, CommandResult]
    """Host name → result, for every selected host that ``only`` keeps."""


class Executor(Protocol):
    """Runs read-only probe scripts and playbooks on inventory hosts."""

    def run_script(
        self, inventory: Path, hosts: Sequence[str], script: str, *, timeout: float
    ) -> Mapping[str, CommandResult]:
        """Run one POSIX-sh ``script`` with one ``raw`` task per host; a result for every host."""
        ...

    def run_playbook(
        self, inventory: Path, request: PlaybookRequest, *, artifacts_dir: Path
    ) -> Mapping[str, PlaybookResult]:
        """Run ``request.playbook`` limited to ``request.hosts``; a result for every host."""
        ...


@runtime_checkable
class SelectingExecutor(Executor, Protocol):
    """An executor that can also select hosts: targets and first probe in one call."""

    def select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> SelectionResult:
        """Select hosts as Ansible would and run ``script`` (one ``raw`` task) on each of them.

        Ansible's implicit ``localhost`` is never selected, and an empty selection is a
        result (no hosts).  An inventory or a limit that cannot be read may raise
        ``InventoryError``, or ``ExecutorError`` like any failure of the tool: then
        :func:`engine.targets.resolve_targets` tells which it was.
        """
        ...


class PendingSelection(Protocol):
    """A ``select_and_run_script`` call going on in the background.

    Collect it with :meth:`result` or stop it with :meth:`cancel`, from the thread that
    started it, exactly once; either way nothing of it is left running afterwards.
    """

    def result(self) -> SelectionResult:
        """Wait for the call to end: its result, or the error it raised."""
        ...

    def cancel(self) -> None:
        """Stop the call if it still runs and wait until it has stopped and cleaned up."""
        ...


@runtime_checkable
class BackgroundSelectingExecutor(SelectingExecutor, Protocol):
    """A selecting executor that can start the call and let the caller work meanwhile."""

    def start_select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> PendingSelection:
        """:meth:`SelectingExecutor.select_and_run_script`, started now, collected later."""
        ...
