"""Build the pipeline's services once per CLI invocation: executor, state store, audit, progress.

Importing this module is cheap: a run starts its first probe (:func:`new_executor`) before
the state store, the audit log and the pipeline are imported and opened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from engine.executors.ansible import AnsibleExecutor
    from engine.pipeline import Reporter, Services
    from engine.settings import Settings
    from engine.state import StateStore


class RichReporter:
    """Progress on stderr: one line per phase, a bar where the amount of work is known."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def phase(self, name: str, total: int | None = None) -> None:
        """Finish the previous phase's line and start a new one."""
        if self._task is not None:
            self._progress.update(self._task, completed=self._total())
        self._task = self._progress.add_task(name, total=total)

    def advance(self, amount: int = 1) -> None:
        """Advance the current phase."""
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def _total(self) -> float:
        task = next(t for t in self._progress.tasks if t.id == self._task)
        return task.total if task.total is not None else task.completed


def _progress(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )


def new_executor(settings: Settings) -> AnsibleExecutor:
    """The executor of this invocation's runs (ansible-runner, work files under the state dir)."""
    from engine.executors.ansible import AnsibleExecutor, AnsibleSettings

    return AnsibleExecutor(AnsibleSettings(work_dir=settings.state_dir / "work"))


@contextmanager
def open_store(settings: Settings) -> Iterator[StateStore]:
    """The state store, closed afterwards."""
    from engine.audit import utc_now
    from engine.state import open_state

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_state(settings.db_path, clock=utc_now)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def open_services(
    settings: Settings,
    *,
    reporter_console: Console | None,
    executor: AnsibleExecutor | None = None,
) -> Iterator[Services]:
    """Services for one CLI run; the audit log and its head in the store are kept in step.

    ``executor``: the one that started the run's first probe, if any (else a new one).
    """
    from engine.audit import PER_HOST_EVENTS, AuditLog, configure_audit, utc_now
    from engine.pipeline import NullReporter, Services, new_run_id

    audit = AuditLog(settings.audit_path, unsynced_events=PER_HOST_EVENTS)
    configure_audit(audit, clock=utc_now)
    executor = executor or new_executor(settings)
    with open_store(settings) as store:
        progress = (
            _progress(reporter_console)
            if reporter_console is not None and reporter_console.is_terminal
            else None
        )
        reporter: Reporter = RichReporter(progress) if progress is not None else NullReporter()
        services = Services(
            executor=executor,
            store=store,
            clock=utc_now,
            new_run_id=new_run_id,
            artifacts_dir=settings.artifacts_dir,
            sleep=time.sleep,
            reporter=reporter,
        )
        try:
            if progress is not None:
                with progress:
                    yield services
            else:
                yield services
        finally:
            head = audit.head()
            if head is not None:
                store.save_audit_head(head.seq, head.hash)
