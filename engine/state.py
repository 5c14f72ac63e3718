"""State: runs, per-host outcomes, cool-downs and device locks in an embedded store.

The pipeline talks to a :class:`StateStore`; the default is :class:`SqliteStateStore`,
a single SQLite file (WAL, ``busy_timeout``, foreign keys) that several
``remediate`` processes may share.  Every read-modify-write runs inside
``BEGIN IMMEDIATE`` so that, for example, exactly one process wins a device lock.

The schema is an ordered list of :data:`MIGRATIONS` applied at open and recorded
in ``schema_version``; add tables by appending a migration, never by editing one.
All timestamps are stored as fixed-width UTC ISO-8601 text, so text order is
time order.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict

from engine.errors import StateError
from engine.outcomes import HostOutcome, Mode, RunStatus

# --------------------------------------------------------------------------- records


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunRecord(_Record):
    """One run of one runbook, as the state store keeps it."""

    run_id: str
    runbook: str
    runbook_digest: str
    mode: Mode
    trigger: str  # "user:alice" or "alert:<fingerprint>"
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    status: RunStatus = RunStatus.RUNNING
    summary: dict[str, int] = {}  # host outcome -> count


class HostRecord(_Record):
    """Where one host ended in one run."""

    run_id: str
    host: str
    outcome: HostOutcome
    reason: str
    steps: list[str]  # ids of the steps executed, in order
    finished_at: AwareDatetime


class LockRecord(_Record):
    """A live per-device lock."""

    host: str
    run_id: str
    acquired_at: AwareDatetime
    expires_at: AwareDatetime


# --------------------------------------------------------------------------- interface


class StateStore(Protocol):
    """What the engine needs from a state store; a server database can implement it later."""

    def start_run(self, record: RunRecord) -> None:
        """Record a new run; its ``run_id`` must be unused."""

    def finish_run(self, run_id: str, status: RunStatus, summary: Mapping[str, int]) -> RunRecord:
        """Set a run's final status and host-outcome counts; return the updated run."""

    def record_host(self, record: HostRecord) -> None:
        """Record (or replace) one host's outcome in a started run."""

    def list_runs(self, limit: int = 50, runbook: str | None = None) -> list[RunRecord]:
        """Return the most recent runs first, optionally of one runbook only."""

    def get_run(self, run_id: str) -> RunRecord | None:
        """Return one run, or None if no run has that id."""

    def host_records(self, run_id: str) -> list[HostRecord]:
        """Return the host outcomes of a run, ordered by host."""

    def last_acted(self, runbook: str, host: str) -> datetime | None:
        """Return when ``runbook`` last acted on ``host`` (for cool-downs), or None."""

    def mark_acted(self, runbook: str, host: str, at: datetime) -> None:
        """Remember that ``runbook`` acted on ``host`` at ``at`` (a later time wins)."""

    def try_lock(self, host: str, run_id: str, ttl: timedelta) -> bool:
        """Take ``host``'s lock for ``run_id`` for ``ttl``; return whether it is now held."""

    def release_lock(self, host: str, run_id: str) -> bool:
        """Release ``host``'s lock if ``run_id`` holds it; return whether it did."""

    def lock_holder(self, host: str) -> LockRecord | None:
        """Return the live lock on ``host``, or None if it is free or expired."""

    def mark_interrupted(self, now: datetime) -> list[str]:
        """Mark runs still ``running`` as ``interrupted``; return their ids."""

    def save_audit_head(self, seq: int, hash_: str) -> None:
        """Remember the audit log's last record (a higher ``seq`` wins)."""

    def audit_head(self) -> tuple[int, str] | None:
        """Return the saved audit head as (seq, hash), or None if none was saved."""

    def close(self) -> None:
        """Release the store's resources."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Migration:
    """One step of the schema: statements run in one transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


#: The schema, in order.  Append new migrations; never edit or reorder applied ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, host results, cool-downs, device locks, audit head",
        (
            """
            CREATE TABLE runs (
                run_id         TEXT PRIMARY KEY,
                runbook        TEXT NOT NULL,
                runbook_digest TEXT NOT NULL,
                mode           TEXT NOT NULL,
                trigger        TEXT NOT NULL,
                started_at     TEXT NOT NULL,
                finished_at    TEXT,
                status         TEXT NOT NULL,
                summary        TEXT NOT NULL  -- JSON object: outcome -> count
            )
            """,
            "CREATE INDEX runs_by_start ON runs (started_at)",
            "CREATE INDEX runs_by_runbook ON runs (runbook, started_at)",
            "CREATE INDEX runs_by_status ON runs (status)",
            """
            CREATE TABLE host_results (
                run_id      TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
                host        TEXT NOT NULL,
                outcome     TEXT NOT NULL,
                reason      TEXT NOT NULL,
                steps       TEXT NOT NULL,  -- JSON array of step ids
                finished_at TEXT NOT NULL,
                PRIMARY KEY (run_id, host)
            )
            """,
            """
            CREATE TABLE cooldowns (
                runbook  TEXT NOT NULL,
                host     TEXT NOT NULL,
                acted_at TEXT NOT NULL,
                PRIMARY KEY (runbook, host)
            )
            """,
            """
            CREATE TABLE device_locks (
                host        TEXT PRIMARY KEY,
                run_id      TEXT NOT NULL,
                acquired_at TEXT NOT NULL,
                expires_at  TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE audit_head (
                id   INTEGER PRIMARY KEY CHECK (id = 1),
                seq  INTEGER NOT NULL,
                hash TEXT NOT NULL
            )
            """,
        ),
    ),
)


def _check_migrations(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migration versions must be 1..{len(migrations)} in order: {versions}")


_check_migrations(MIGRATIONS)


# --------------------------------------------------------------------------- time


def _text(moment: datetime) -> str:
    """Return ``moment`` as fixed-width UTC ISO-8601 text (sortable)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --------------------------------------------------------------------------- SQLite


class SqliteStateStore:
    """A :class:`StateStore` in one SQLite file, shared safely by threads and processes.

    Each instance owns one connection (serialised by a lock, so an instance may
    be shared between threads); open one instance per process.  Use as a context
    manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        busy_timeout: timedelta = timedelta(seconds=10),
        migrations: tuple[Migration, ...] = MIGRATIONS,
    ) -> None:
        self.path = path
        self._clock = clock
        self._guard = threading.RLock()
        _check_migrations(migrations)
        with self._sqlite_errors("open"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"{path}: cannot create the state directory: {exc.strerror}"
                ) from exc
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=0
            )
        try:
            with self._opening():
                self._configure(busy_timeout)
                self._migrate(migrations)
        except BaseException:
            self._db.close()
            raise

    # -- lifecycle

    def close(self) -> None:
        """Close the connection; the instance cannot be used afterwards."""
        with self._guard:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStateStore({str(self.path)!r})"

    # -- plumbing

    @contextmanager
    def _sqlite_errors(self, doing: str) -> Iterator[None]:
        """Translate sqlite3 errors into StateError naming the database and the operation."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: state store cannot {doing}: {exc}") from exc

    @contextmanager
    def _transaction(self, doing: str, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction (``BEGIN IMMEDIATE`` takes the write lock up front)."""
        with self._guard, self._sqlite_errors(doing):
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN DEFERRED")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _opening(self) -> Iterator[None]:
        """Serialise opening across processes with a ``flock`` on ``<db>.lock``.

        SQLite answers ``PRAGMA journal_mode = WAL`` on a fresh file with "database
        is locked" (without waiting) when another process opens it at the same time.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StateError(
                f"{lock_path}: cannot open the state lock file: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _configure(self, busy_timeout: timedelta) -> None:
        with self._sqlite_errors("open the database"):
            millis = int(busy_timeout.total_seconds() * 1000)
            self._db.execute(f"PRAGMA busy_timeout = {millis:d}")
            self._db.execute("PRAGMA foreign_keys = ON")
            (mode,) = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: state store cannot use WAL (journal mode {mode})")

    def _migrate(self, migrations: tuple[Migration, ...]) -> None:
        with self._transaction("migrate the schema") as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            (current,) = db.execute(
                "SELECT coalesce(max(version), 0) FROM schema_version"
            ).fetchone()
            if current > len(migrations):
                raise StateError(
                    f"{self.path}: schema version {current} is newer than this engine "
                    f"knows ({len(migrations)}); upgrade remediate"
                )
            now = _text(self._clock())
            for migration in migrations[current:]:
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, now),
                )

    def schema_version(self) -> int:
        """Return the highest migration applied to the database."""
        with self._guard, self._sqlite_errors("read the schema version"):
            (version,) = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(version)

    # -- runs

    def start_run(self, record: RunRecord) -> None:
        """Record a new run; its ``run_id`` must be unused."""
        try:
            with self._transaction(f"start run {record.run_id}") as db:
                db.execute(
                    "INSERT INTO runs (run_id, runbook, runbook_digest, mode, trigger,"
                    " started_at, finished_at, status, summary)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.run_id,
                        record.runbook,
                        record.runbook_digest,
                        record.mode.value,
                        record.trigger,
                        _text(record.started_at),
                        _text(record.finished_at) if record.finished_at else None,
                        record.status.value,
                        json.dumps(record.summary, sort_keys=True),
                    ),
                )
        except StateError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StateError(f"{self.path}: run {record.run_id} already exists") from exc
            raise

    def finish_run(self, run_id: str, status: RunStatus, summary: Mapping[str, int]) -> RunRecord:
        """Set a run's final status and host-outcome counts, finished now; return the run."""
        if status is RunStatus.RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        with self._transaction(f"finish run {run_id}") as db:
            cursor = db.execute(
                "UPDATE runs SET status = ?, summary = ?, finished_at = ? WHERE run_id = ?",
                (
                    status.value,
                    json.dumps(dict(summary), sort_keys=True),
                    _text(self._clock()),
                    run_id,
                ),
            )
            if cursor.rowcount == 0:
                raise StateError(f"{self.path}: cannot finish run {run_id}: no such run")
            row = db.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
        return _run_record(row)

    def record_host(self, record: HostRecord) -> None:
        """Record one host's outcome in a started run, replacing an earlier one for that host."""
        try:
            with self._transaction(f"record host {record.host} of run {record.run_id}") as db:
                db.execute(
                    "INSERT INTO host_results (run_id, host, outcome, reason, steps, finished_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (run_id, host) DO UPDATE SET outcome = excluded.outcome,"
                    " reason = excluded.reason, steps = excluded.steps,"
                    " finished_at = excluded.finished_at",
                    (
                        record.run_id,
                        record.host,
                        record.outcome.value,
                        record.reason,
                        json.dumps(record.steps),
                        _text(record.finished_at),
                    ),
                )
        except StateError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StateError(
                    f"{self.path}: cannot record host {record.host}: "
                    f"run {record.run_id} was never started"
                ) from exc
            raise

    def list_runs(self, limit: int = 50, runbook: str | None = None) -> list[RunRecord]:
        """Return the most recent runs first, optionally of one runbook only."""
        where, params = ("WHERE runbook = ?", (runbook,)) if runbook is not None else ("", ())
        with self._guard, self._sqlite_errors("list runs"):
            rows = self._db.execute(
                f"{_RUN_SELECT} {where} ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_run_record(row) for row in rows]

    def get_run(self, run_id: str) -> RunRecord | None:
        """Return one run, or None if no run has that id."""
        with self._guard, self._sqlite_errors(f"read run {run_id}"):
            row = self._db.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run_record(row)

    def host_records(self, run_id: str) -> list[HostRecord]:
        """Return the host outcomes of a run, ordered by host."""
        with self._guard, self._sqlite_errors(f"read hosts of run {run_id}"):
            rows = self._db.execute(
                "SELECT run_id, host, outcome, reason, steps, finished_at FROM host_results"
                " WHERE run_id = ? ORDER BY host",
                (run_id,),
            ).fetchall()
        return [
            HostRecord(
                run_id=r[0],
                host=r[1],
                outcome=HostOutcome(r[2]),
                reason=r[3],
                steps=json.loads(r[4]),
                finished_at=_moment(r[5]),
            )
            for r in rows
        ]

    def mark_interrupted(self, now: datetime) -> list[str]:
        """Mark runs still ``running`` as ``interrupted`` at ``now``; return their ids.

        Call only when no other engine process can be running (e.g. at server
        start-up): a live run in another process would be marked too.  Device
        locks are left to expire by their ttl, so a run that is in fact alive
        keeps its devices.
        """
        with self._transaction("mark interrupted runs") as db:
            rows = db.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE status = ? RETURNING run_id",
                (RunStatus.INTERRUPTED.value, _text(now), RunStatus.RUNNING.value),
            ).fetchall()
        return sorted(row[0] for row in rows)

    # -- cool-downs

    def last_acted(self, runbook: str, host: str) -> datetime | None:
        """Return when ``runbook`` last acted on ``host`` (for cool-downs), or None."""
        with self._guard, self._sqlite_errors(f"read cool-down of {runbook} on {host}"):
            row = self._db.execute(
                "SELECT acted_at FROM cooldowns WHERE runbook = ? AND host = ?", (runbook, host)
            ).fetchone()
        return None if row is None else _moment(row[0])

    def mark_acted(self, runbook: str, host: str, at: datetime) -> None:
        """Remember that ``runbook`` acted on ``host`` at ``at`` (a later time wins)."""
        with self._transaction(f"record cool-down of {runbook} on {host}") as db:
            db.execute(
                "INSERT INTO cooldowns (runbook, host, acted_at) VALUES (?, ?, ?)"
                " ON CONFLICT (runbook, host) DO UPDATE"
                " SET acted_at = max(acted_at, excluded.acted_at)",
                (runbook, host, _text(at)),
            )

    # -- device locks

    def try_lock(self, host: str, run_id: str, ttl: timedelta) -> bool:
        """Take ``host``'s lock for ``run_id`` until now + ``ttl``; return whether it is held.

        Succeeds when the lock is free, expired, or already held by ``run_id``
        (which extends it).  Atomic across threads and processes.
        """
        if ttl <= timedelta(0):
            raise ValueError(f"lock ttl must be positive, got {ttl}")
        now = self._clock()
        with self._transaction(f"lock {host} for run {run_id}") as db:
            row = db.execute(
                "SELECT run_id, expires_at FROM device_locks WHERE host = ?", (host,)
            ).fetchone()
            if row is not None and row[0] != run_id and _text(now) < row[1]:
                return False
            acquired = _text(now) if row is None or row[0] != run_id else None
            db.execute(
                "INSERT INTO device_locks (host, run_id, acquired_at, expires_at)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET run_id = excluded.run_id,"
                " acquired_at = coalesce(?, acquired_at), expires_at = excluded.expires_at",
                (host, run_id, _text(now), _text(now + ttl), acquired),
            )
        return True

    def release_lock(self, host: str, run_id: str) -> bool:
        """Release ``host``'s lock if ``run_id`` holds it; return whether it did."""
        with self._transaction(f"unlock {host} for run {run_id}") as db:
            cursor = db.execute(
                "DELETE FROM device_locks WHERE host = ? AND run_id = ?", (host, run_id)
            )
        return cursor.rowcount > 0

    def lock_holder(self, host: str) -> LockRecord | None:
        """Return the live lock on ``host``, or None if it is free or expired."""
        now = _text(self._clock())
        with self._guard, self._sqlite_errors(f"read the lock of {host}"):
            row = self._db.execute(
                "SELECT host, run_id, acquired_at, expires_at FROM device_locks"
                " WHERE host = ? AND expires_at > ?",
                (host, now),
            ).fetchone()
        if row is None:
            return None
        return LockRecord(
            host=row[0],
            run_id=row[1],
            acquired_at=_moment(row[2]),
            expires_at=_moment(row[3]),
        )

    # -- audit head

    def save_audit_head(self, seq: int, hash_: str) -> None:
        """Remember the audit log's last record (a higher ``seq`` wins).

        Pass it back to ``verify_audit(expected_head=...)`` to detect records
        removed from the end of the log, which the hash chain alone cannot show.
        """
        with self._transaction("save the audit head") as db:
            db.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
                " WHERE excluded.seq > audit_head.seq",
                (seq, hash_),
            )

    def audit_head(self) -> tuple[int, str] | None:
        """Return the saved audit head as (seq, hash), or None if none was saved."""
        with self._guard, self._sqlite_errors("read the audit head"):
            row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))


_RUN_SELECT = (
    "SELECT run_id, runbook, runbook_digest, mode, trigger, started_at, finished_at,"
    " status, summary FROM runs"
)


def _run_record(row: tuple[str, ...]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        runbook=row[1],
        runbook_digest=row[2],
        mode=Mode(row[3]),
        trigger=row[4],
        started_at=_moment(row[5]),
        finished_at=_moment(row[6]) if row[6] is not None else None,
        status=RunStatus(row[7]),
        summary=json.loads(row[8]),
    )


def open_state(path: Path, *, clock: Callable[[], datetime]) -> StateStore:
    """Open the default state store at ``path`` (the entry points' one call)."""
    return SqliteStateStore(path, clock=clock)
