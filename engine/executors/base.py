"""The one small interface between the pipeline and whatever runs things on devices.

The pipeline never imports ansible-runner: it talks to an :class:`Executor`.
``AnsibleExecutor`` drives real ansible-runner; ``FakeExecutor`` (tests) answers from a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostStatus(StrEnum):
    """How one host fared in one executor call."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


class CommandResult(_Frozen):
    """Result of one ``raw`` command on one host."""

    host: str
    status: HostStatus
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    message: str = ""


class TaskResult(_Frozen):
    """One task of a playbook on one host, as ansible-runner reported it."""

    name: str
    status: HostStatus | None = None  # None: skipped
    changed: bool = False
    message: str = ""
    stdout: str = ""


class PlaybookResult(_Frozen):
    """Result of one playbook run on one host."""

    host: str
    status: HostStatus
    tasks: tuple[TaskResult, ...] = ()
    message: str = ""

    @property
    def changed(self) -> bool:
        """Whether any task reported a change."""
        return any(t.changed for t in self.tasks)


class PlaybookRequest(_Frozen):
    """A playbook to run on some hosts with extra vars."""

    playbook: Path
    hosts: tuple[str, ...]
    extravars: Mapping[str, Any] = Field(default_factory=dict)
    label: str = ""  # a name for the artifacts folder, e.g. the step id


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
