"""Build the pipeline's services once per CLI invocation: executor, state store, audit, progress.

Importing this module is cheap: a run starts its first probe (:func:`new_executor`) before
the state store, the audit log and the pipeline are imported and opened.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from engine.audit import AuditSink
    from engine.executors.ansible import AnsibleExecutor
    from engine.pipeline import Reporter, Services
    from engine.settings import Settings
    from engine.state import StateDatabase, StateStore


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


def progress_display(console: Console) -> Progress:
    """The progress display runs show on ``console`` (a line per phase, a bar)."""
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


def with_inventory_secrets(settings: Settings, inventory: Path) -> Settings:
    """``settings`` whose secrets include the API token ``inventory``'s plugin reads, if set."""
    from engine.redaction import inventory_secrets

    token = inventory_secrets(inventory, os.environ)
    return settings.model_copy(update={"secrets": settings.secrets.with_values(token)})


def private_state_dir(settings: Settings) -> None:
    """Create the state directory owner-only, or tighten it (saying so on stderr, once)."""
    from engine.privacy import private_state_dir as make_private

    tightened = make_private(settings.state_dir)
    if tightened is not None:
        sys.stderr.write(f"remediate: {tightened.warning()}\n")


def new_executor(settings: Settings) -> AnsibleExecutor:
    """The executor of this invocation's runs (ansible-runner, work files under the state dir)."""
    from engine.executors.ansible import AnsibleExecutor, AnsibleSettings

    private_state_dir(settings)
    return AnsibleExecutor(
        AnsibleSettings(work_dir=settings.state_dir / "work"), secrets=settings.secrets
    )


@contextmanager
def open_database(settings: Settings, *, migrate: bool = True) -> Iterator[StateDatabase]:
    """The state database (``--state-url``, else the state directory's file), closed after."""
    from engine.audit import utc_now
    from engine.state import open_database as open_state_database

    private_state_dir(settings)
    with open_state_database(settings.database_url(), clock=utc_now, migrate=migrate) as database:
        yield database


@contextmanager
def open_store(settings: Settings) -> Iterator[StateStore]:
    """The state store, closed afterwards."""
    with open_database(settings) as database:
        store = database.store()
        try:
            yield store
        finally:
            store.close()


def audit_sink(settings: Settings, database: StateDatabase) -> AuditSink:
    """Where this invocation's audit records go: the database's chain, else the file."""
    from engine.audit import PER_HOST_EVENTS, AuditLog

    return database.audit_log() or AuditLog(settings.audit_path, unsynced_events=PER_HOST_EVENTS)


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
    from engine.audit import configure_audit, utc_now
    from engine.pipeline import NullReporter, Services, new_run_id

    executor = executor or new_executor(settings)
    with open_database(settings) as database:
        audit = audit_sink(settings, database)
        configure_audit(audit, clock=utc_now, secrets=settings.secrets)
        store = database.store()
        progress = (
            progress_display(reporter_console)
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
            secrets=settings.secrets,
            holder=f"cli:{socket.gethostname()}:{os.getpid()}",
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
            store.close()
