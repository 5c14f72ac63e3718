"""The embedded backend: one SQLite file next to the audit log (``sqlite:///path``).

Only one ``remediate serve`` uses a file at a time (``single_server``); CLI runs may share
it with that server.  SQLite's own ideas stay here: the write-ahead log is copied back into
the database (checkpointed) by a thread of the database, on its own connection, after every
few intake commits, so no commit of the intake pays for a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

import structlog

from engine.errors import ConfigError, StateError
from engine.state.sqlite.store import SqliteAlertStore, SqliteStateStore

__all__ = ["SqliteAlertStore", "SqliteDatabase", "SqliteStateStore"]

#: Notifications recorded between two copies of the write-ahead log back into the database
#: (each copy syncs the log and the database: fewer, larger copies cost less, and a page the
#: intake rewrote several times in between is copied once).  32 notifications log about
#: 7 MiB at 25 alerts each; copying after every 4 took about twice the checkpointer's CPU
#: (bench/intake_stages.py).
CHECKPOINT_AFTER = 32
#: Log pages past which an intake commit copies the write-ahead log back itself (a stall of
#: that commit); normally the checkpointer has copied it long before.
INTAKE_CHECKPOINT_PAGES = 10_000
#: How long closing waits for a checkpoint in progress; a failed one is retried this much later.
CHECKPOINT_WAIT = 10.0


class SqliteDatabase:
    """A SQLite state file; each :meth:`store` is one connection (open one per thread)."""

    single_server = True

    def __init__(self, path: Path, *, clock: Callable[[], datetime]) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._clock = clock
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._stop = threading.Event()
        self._uncopied = 0
        self._checkpointer: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SqliteDatabase({str(self.path)!r})"

    def store(self, *, intake: bool = False) -> SqliteAlertStore:
        """A new connection; an ``intake`` one has its log copied back by a thread of ours."""
        if not intake:
            return SqliteAlertStore(self.path, clock=self._clock)
        store = SqliteAlertStore(
            self.path,
            clock=self._clock,
            checkpoint_pages=INTAKE_CHECKPOINT_PAGES,
            after_commit=self._committed,
        )
        with self._lock:
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_wal, name="remediate-checkpoint", daemon=True
                )
                self._checkpointer.start()
        return store

    def ping(self) -> None:
        """Open the file and read its schema version."""
        with SqliteStateStore(self.path, clock=self._clock) as store:
            store.schema_version()

    def audit_log(self) -> None:
        """None: with SQLite the audit log is the JSON-lines file next to the database."""
        return

    def run_board(self) -> NoReturn:
        """None here: runs spread over workers need the state in PostgreSQL."""
        raise ConfigError(
            f"state URL sqlite:///{self.path}: distributed runs (--distributed, remediate "
            "worker, executor: distributed) need the state in PostgreSQL: pass --state-url "
            "postgresql://... (or set REMEDIATE_STATE_URL) on every controller and worker"
        )

    def migrate(self) -> int:
        """Apply missing migrations (opening a connection does); return the schema version."""
        with SqliteStateStore(self.path, clock=self._clock) as store:
            return store.schema_version()

    def grant(self, role: str) -> None:
        """SQLite has no roles: the file's permissions are its access control."""
        raise ConfigError(
            f"{self.path}: SQLite has no roles to grant {role!r} anything; "
            "its file's permissions decide who may use it"
        )

    def close(self) -> None:
        """Stop the checkpointer (waiting for a copy in progress)."""
        self._stop.set()
        self._due.set()
        if self._checkpointer is not None:
            self._checkpointer.join(CHECKPOINT_WAIT)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _committed(self, notifications: int) -> None:
        """An intake commit recorded ``notifications``: have the log copied every few."""
        with self._lock:
            self._uncopied += notifications
            if self._uncopied < CHECKPOINT_AFTER:
                return
            self._uncopied = 0
        self._due.set()

    def _checkpoint_wal(self) -> None:
        """After intake commits, copy the write-ahead log back, on its own connection.

        The copy (PASSIVE: it waits for nobody) runs while the intake goes on, on the other
        core (SQLite lets go of the GIL); it usually ends before the next commit, which then
        starts the log over.  So no commit pays for a copy, and the log stays small.
        """
        try:
            store = SqliteAlertStore(self.path, clock=self._clock)
        except StateError as exc:
            structlog.get_logger().warning("wal.checkpoint_failed", error=str(exc))
            return
        try:
            while not self._stop.is_set():
                self._due.wait()
                self._due.clear()
                if self._stop.is_set():
                    return
                try:
                    store.checkpoint()
                except StateError as exc:  # the log keeps the data; a later copy catches up
                    structlog.get_logger().warning("wal.checkpoint_failed", error=str(exc))
                    self._stop.wait(CHECKPOINT_WAIT)
        finally:
            store.close()
