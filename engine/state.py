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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

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


class ApprovalStatus(StrEnum):
    """Where an approval stands."""

    PENDING = "pending"
    APPROVED = "approved"  # decided; a server worker will apply it
    APPLYING = "applying"  # being applied (by the approver's CLI or a server worker)
    APPLIED = "applied"  # the plan was applied (the run's own outcome is in history)
    FAILED = "failed"  # applying it failed as a tool (plan refused, engine fault)
    DENIED = "denied"
    EXPIRED = "expired"


class ApprovalRecord(_Record):
    """A saved plan waiting for (or past) a person's decision; see :mod:`engine.approvals`."""

    approval_id: str
    runbook: str
    source: str  # "user:<name>" or "alert:<fingerprint>"
    requested_by: str
    requested_at: AwareDatetime
    expires_at: AwareDatetime
    four_eyes: bool
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_by: str | None = None
    decided_at: AwareDatetime | None = None
    reason: str = ""
    plan: dict[str, Any]  # the saved plan as JSON data, digest included


# --------------------------------------------------------------------------- interface


class StateStore(Protocol):
    """What the engine needs from a state store; a server database can implement it later."""

    def start_run(self, record: RunRecord) -> None:
        """Record a new run; its ``run_id`` must be unused."""

    def finish_run(self, run_id: str, status: RunStatus, summary: Mapping[str, int]) -> RunRecord:
        """Set a run's final status and host-outcome counts; return the updated run."""

    def record_host(self, record: HostRecord) -> None:
        """Record (or replace) one host's outcome in a started run."""

    def record_hosts(self, records: Sequence[HostRecord]) -> None:
        """Record (or replace) hosts' outcomes in started runs, all or none (one commit)."""

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

    def add_approval(self, record: ApprovalRecord) -> None:
        """Store a new pending approval."""

    def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        """One approval by id."""

    def list_approvals(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]:
        """Approvals, newest first, optionally of one status."""

    def transition_approval(
        self,
        approval_id: str,
        *,
        from_status: ApprovalStatus,
        to_status: ApprovalStatus,
        at: datetime,
        reason: str,
        by: str | None = None,
    ) -> ApprovalRecord | None:
        """Move an approval between states atomically; None if it was not in ``from_status``.

        ``by`` (with ``at``) records a person's decision.
        """

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
    Migration(
        2,
        "alert firings, the alert run queue and the circuit breaker (webhook server)",
        (
            """
            CREATE TABLE alert_firings (
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                alertname    TEXT NOT NULL,
                labels       TEXT NOT NULL,  -- JSON object, as received (untrusted data)
                status       TEXT NOT NULL,  -- firing | resolved
                outcome      TEXT NOT NULL,  -- queued | held | unmatched | unresolved | resolved
                reason       TEXT NOT NULL,
                received_at  TEXT NOT NULL,
                last_seen_at TEXT NOT NULL,
                times_seen   INTEGER NOT NULL,
                resolved_at  TEXT,
                PRIMARY KEY (fingerprint, starts_at)
            )
            """,
            "CREATE INDEX alert_firings_by_outcome ON alert_firings (outcome, received_at)",
            "CREATE INDEX alert_firings_by_received ON alert_firings (received_at)",
            """
            CREATE TABLE alert_queue (
                item_id      INTEGER PRIMARY KEY AUTOINCREMENT,
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                runbook      TEXT NOT NULL,
                host         TEXT NOT NULL,  -- an inventory host name, never label text
                trigger_mode TEXT NOT NULL,  -- apply | plan | approve (the runbook trigger's)
                mode         TEXT NOT NULL,  -- apply | dry-run (what the run does)
                state        TEXT NOT NULL,
                reason       TEXT NOT NULL,
                enqueued_at  TEXT NOT NULL,
                claimed_at   TEXT,
                finished_at  TEXT,
                owner        TEXT,           -- the server process that claimed it
                run_id       TEXT,
                run_status   TEXT,
                UNIQUE (fingerprint, starts_at, runbook),
                FOREIGN KEY (fingerprint, starts_at)
                    REFERENCES alert_firings (fingerprint, starts_at) ON DELETE CASCADE
            )
            """,
            "CREATE INDEX alert_queue_by_state ON alert_queue (state, item_id)",
            "CREATE INDEX alert_queue_by_enqueued ON alert_queue (enqueued_at)",
            "CREATE INDEX alert_queue_by_finished ON alert_queue (finished_at)",
            """
            CREATE TABLE alert_breaker (
                id        INTEGER PRIMARY KEY CHECK (id = 1),
                open      INTEGER NOT NULL,
                reason    TEXT NOT NULL,
                opened_at TEXT,
                reset_at  TEXT
            )
            """,
        ),
    ),
    Migration(
        3,
        "approvals of saved plans",
        (
            """
            CREATE TABLE approvals (
                approval_id  TEXT PRIMARY KEY,
                runbook      TEXT NOT NULL,
                source       TEXT NOT NULL,
                requested_by TEXT NOT NULL,
                requested_at TEXT NOT NULL,
                expires_at   TEXT NOT NULL,
                four_eyes    INTEGER NOT NULL,
                status       TEXT NOT NULL,  -- pending | approved | denied | expired
                decided_by   TEXT,
                decided_at   TEXT,
                reason       TEXT NOT NULL,
                plan         TEXT NOT NULL   -- the saved plan (JSON, with its digest)
            )
            """,
            "CREATE INDEX approvals_by_status ON approvals (status, requested_at)",
        ),
    ),
    Migration(
        4,
        "alert firings and queue keyed by start time first (new firings land together)",
        # A firing is looked up by (fingerprint, starts_at), and either order finds it; keyed
        # fingerprint first (a hash), every new firing lands on a random page of a large
        # index, so each notification wrote tens of pages to the log (and the checkpoint
        # copied them back).  Keyed start time first, new firings, which started recently,
        # all land at the end.  SQLite cannot reorder a key in place: the tables are rebuilt
        # (with foreign keys off, as its documentation prescribes; checked before commit).
        (
            """
            CREATE TABLE alert_firings_new (
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                alertname    TEXT NOT NULL,
                labels       TEXT NOT NULL,  -- JSON object, as received (untrusted data)
                status       TEXT NOT NULL,  -- firing | resolved
                outcome      TEXT NOT NULL,  -- queued | held | unmatched | unresolved | resolved
                reason       TEXT NOT NULL,
                received_at  TEXT NOT NULL,
                last_seen_at TEXT NOT NULL,
                times_seen   INTEGER NOT NULL,
                resolved_at  TEXT,
                PRIMARY KEY (starts_at, fingerprint)
            )
            """,
            "INSERT INTO alert_firings_new SELECT * FROM alert_firings",
            """
            CREATE TABLE alert_queue_new (
                item_id      INTEGER PRIMARY KEY AUTOINCREMENT,
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                runbook      TEXT NOT NULL,
                host         TEXT NOT NULL,  -- an inventory host name, never label text
                trigger_mode TEXT NOT NULL,  -- apply | plan | approve (the runbook trigger's)
                mode         TEXT NOT NULL,  -- apply | dry-run (what the run does)
                state        TEXT NOT NULL,
                reason       TEXT NOT NULL,
                enqueued_at  TEXT NOT NULL,
                claimed_at   TEXT,
                finished_at  TEXT,
                owner        TEXT,           -- the server process that claimed it
                run_id       TEXT,
                run_status   TEXT,
                UNIQUE (starts_at, fingerprint, runbook),
                FOREIGN KEY (fingerprint, starts_at)
                    REFERENCES alert_firings (fingerprint, starts_at) ON DELETE CASCADE
            )
            """,
            # Item ids are never reused: the new table takes over the old one's counter.
            "UPDATE sqlite_sequence SET name = 'alert_queue_new' WHERE name = 'alert_queue'",
            "INSERT INTO alert_queue_new SELECT * FROM alert_queue",
            "DROP TABLE alert_queue",
            "DROP TABLE alert_firings",
            "ALTER TABLE alert_firings_new RENAME TO alert_firings",
            "ALTER TABLE alert_queue_new RENAME TO alert_queue",
            "CREATE INDEX alert_firings_by_outcome ON alert_firings (outcome, received_at)",
            "CREATE INDEX alert_firings_by_received ON alert_firings (received_at)",
            "CREATE INDEX alert_queue_by_state ON alert_queue (state, item_id)",
            "CREATE INDEX alert_queue_by_enqueued ON alert_queue (enqueued_at)",
            "CREATE INDEX alert_queue_by_finished ON alert_queue (finished_at)",
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

    The write-ahead log grows while readers keep SQLite from copying it back (a long
    ``history`` next to a busy server); once it starts over, a log larger than
    ``wal_size_limit`` bytes is cut back to it (``journal_size_limit``), so a burst does not
    keep its disk space for good.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        busy_timeout: timedelta = timedelta(seconds=10),
        migrations: tuple[Migration, ...] = MIGRATIONS,
        wal_size_limit: int = 16 * 2**20,
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
                self._configure(busy_timeout, wal_size_limit)
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

    def _configure(self, busy_timeout: timedelta, wal_size_limit: int) -> None:
        with self._sqlite_errors("open the database"):
            millis = int(busy_timeout.total_seconds() * 1000)
            self._db.execute(f"PRAGMA busy_timeout = {millis:d}")
            self._db.execute(f"PRAGMA journal_size_limit = {int(wal_size_limit):d}")
            self._db.execute("PRAGMA foreign_keys = ON")
            (mode,) = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StateError(f"{self.path}: state store cannot use WAL (journal mode {mode})")

    def _migrate(self, migrations: tuple[Migration, ...]) -> None:
        # Rebuilding a table that others refer to needs foreign keys off (dropping it would
        # otherwise cascade); they are checked before the migration commits, and back on after.
        with self._sqlite_errors("migrate the schema"):
            self._db.execute("PRAGMA foreign_keys = OFF")
        try:
            self._migrate_in_one_transaction(migrations)
        finally:
            with self._sqlite_errors("migrate the schema"):
                self._db.execute("PRAGMA foreign_keys = ON")

    def _migrate_in_one_transaction(self, migrations: tuple[Migration, ...]) -> None:
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
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StateError(
                    f"{self.path}: migrating the schema would break {len(broken)} references "
                    f"(first: {tuple(broken[0])}); nothing was changed"
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
        self.record_hosts((record,))

    def record_hosts(self, records: Sequence[HostRecord]) -> None:
        """Record hosts' outcomes in started runs, replacing earlier ones, in one transaction.

        One commit (one sync of the write-ahead log) for a whole run's hosts, not one each.
        """
        if not records:
            return
        more = f" and {len(records) - 1} more" if len(records) > 1 else ""
        hosts = f"host {records[0].host}{more}"
        run_ids = sorted({r.run_id for r in records})
        try:
            with self._transaction(f"record {hosts} of run {', '.join(run_ids)}") as db:
                db.executemany(
                    "INSERT INTO host_results (run_id, host, outcome, reason, steps, finished_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (run_id, host) DO UPDATE SET outcome = excluded.outcome,"
                    " reason = excluded.reason, steps = excluded.steps,"
                    " finished_at = excluded.finished_at",
                    [
                        (
                            record.run_id,
                            record.host,
                            record.outcome.value,
                            record.reason,
                            json.dumps(record.steps),
                            _text(record.finished_at),
                        )
                        for record in records
                    ],
                )
        except StateError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                unknown = ", ".join(r for r in run_ids if self.get_run(r) is None)
                raise StateError(
                    f"{self.path}: cannot record {hosts}: run {unknown} was never started"
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

    # -- approvals

    _APPROVAL_COLUMNS = (
        "approval_id, runbook, source, requested_by, requested_at, expires_at, four_eyes,"
        " status, decided_by, decided_at, reason, plan"
    )

    def add_approval(self, record: ApprovalRecord) -> None:
        """Store a new pending approval."""
        with self._transaction(f"add approval {record.approval_id}") as db:
            db.execute(
                f"INSERT INTO approvals ({self._APPROVAL_COLUMNS})"  # noqa: S608 - constant
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.approval_id,
                    record.runbook,
                    record.source,
                    record.requested_by,
                    _text(record.requested_at),
                    _text(record.expires_at),
                    int(record.four_eyes),
                    record.status.value,
                    record.decided_by,
                    None if record.decided_at is None else _text(record.decided_at),
                    record.reason,
                    json.dumps(record.plan, sort_keys=True),
                ),
            )

    def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        """One approval by id."""
        with self._guard, self._sqlite_errors(f"read approval {approval_id}"):
            row = self._db.execute(
                f"SELECT {self._APPROVAL_COLUMNS} FROM approvals"  # noqa: S608 - constant
                " WHERE approval_id = ?",
                (approval_id,),
            ).fetchone()
        return None if row is None else _approval_record(row)

    def list_approvals(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]:
        """Approvals, newest first, optionally of one status."""
        query = f"SELECT {self._APPROVAL_COLUMNS} FROM approvals"  # noqa: S608 - constant
        args: tuple[str, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status.value,)
        with self._guard, self._sqlite_errors("list approvals"):
            rows = self._db.execute(query + " ORDER BY requested_at DESC", args).fetchall()
        return [_approval_record(row) for row in rows]

    def transition_approval(
        self,
        approval_id: str,
        *,
        from_status: ApprovalStatus,
        to_status: ApprovalStatus,
        at: datetime,
        reason: str,
        by: str | None = None,
    ) -> ApprovalRecord | None:
        """Move an approval between states atomically; None if it was not in ``from_status``.

        ``by`` (with ``at``) records a person's decision.
        """
        with self._transaction(f"move approval {approval_id} to {to_status.value}") as db:
            if by is not None:
                cursor = db.execute(
                    "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, reason = ?"
                    " WHERE approval_id = ? AND status = ?",
                    (to_status.value, by, _text(at), reason, approval_id, from_status.value),
                )
            else:
                cursor = db.execute(
                    "UPDATE approvals SET status = ?, reason = ?"
                    " WHERE approval_id = ? AND status = ?",
                    (to_status.value, reason, approval_id, from_status.value),
                )
        return self.get_approval(approval_id) if cursor.rowcount == 1 else None


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


def _approval_record(row: Sequence[object]) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id=str(row[0]),
        runbook=str(row[1]),
        source=str(row[2]),
        requested_by=str(row[3]),
        requested_at=_moment(str(row[4])),
        expires_at=_moment(str(row[5])),
        four_eyes=bool(row[6]),
        status=ApprovalStatus(str(row[7])),
        decided_by=None if row[8] is None else str(row[8]),
        decided_at=None if row[9] is None else _moment(str(row[9])),
        reason=str(row[10]),
        plan=json.loads(str(row[11])),
    )


def open_state(path: Path, *, clock: Callable[[], datetime]) -> StateStore:
    """Open the default state store at ``path`` (the entry points' one call)."""
    return SqliteStateStore(path, clock=clock)


# --------------------------------------------------------------------------- alert intake
#
# The webhook server's part of the store (migration 2): one row per alert *firing*
# (fingerprint + startsAt, so a re-sent or duplicated notification is recognised), a durable
# queue of alert-triggered runs, and the fleet-wide circuit breaker.  Label values are
# untrusted data: they are stored as JSON and never used to build a statement.


class FiringOutcome(StrEnum):
    """What the server decided for one alert firing."""

    QUEUED = "queued"  # at least one runbook run was queued
    HELD = "held"  # runs were recorded but the circuit breaker was open: not run
    UNMATCHED = "unmatched"  # no runbook trigger matches the alert
    UNRESOLVED = "unresolved"  # a trigger matches, but the device is not exactly one host
    RESOLVED = "resolved"  # the first notification seen already said resolved


class QueueState(StrEnum):
    """Where one queued alert-triggered run is."""

    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker of the server process named by ``owner``
    DONE = "done"  # the run finished; ``run_status`` says how
    FAILED = "failed"  # the run could not be completed (engine error); ``reason`` says why
    CANCELLED = "cancelled"  # the alert resolved before the run started
    HELD = "held"  # not run: the circuit breaker was open
    EXPIRED = "expired"  # not run: it waited longer than the queue's max age
    INTERRUPTED = "interrupted"  # the server stopped while the run was in progress


class QueueRoute(_Record):
    """One run the intake wants queued for a firing: runbook, inventory host, modes."""

    runbook: str
    host: str
    trigger_mode: str  # the runbook trigger's mode: apply | plan | approve
    mode: Mode


# The intake's inputs and answers are plain frozen dataclasses, not validated models: they
# are built per alert on the webhook hot path from values the webhook body's models have
# validated already (mypy checks the types), so validating them again would only cost.


@dataclass(frozen=True, slots=True)
class FiringInput:
    """A firing alert as the intake routed it."""

    fingerprint: str
    starts_at: datetime  # timezone-aware
    alertname: str
    labels: Mapping[str, str]
    outcome: FiringOutcome
    reason: str
    routes: tuple[QueueRoute, ...] = ()


@dataclass(frozen=True, slots=True)
class ResolvedInput:
    """A resolved alert from a notification."""

    fingerprint: str
    starts_at: datetime  # timezone-aware
    alertname: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class AlertBatch:
    """The alerts of one notification, routed."""

    firing: tuple[FiringInput, ...] = ()
    resolved: tuple[ResolvedInput, ...] = ()


@dataclass(frozen=True, slots=True)
class FiringKey:
    """Identifies one firing."""

    fingerprint: str
    starts_at: datetime  # timezone-aware


class FiringRecord(_Record):
    """One alert firing as the store keeps it."""

    fingerprint: str
    starts_at: AwareDatetime
    alertname: str
    labels: dict[str, str]
    status: str  # firing | resolved
    outcome: FiringOutcome
    reason: str
    received_at: AwareDatetime
    last_seen_at: AwareDatetime
    times_seen: int
    resolved_at: AwareDatetime | None = None


class QueueItem(_Record):
    """One alert-triggered run in the durable queue."""

    item_id: int
    fingerprint: str
    starts_at: AwareDatetime
    runbook: str
    host: str
    trigger_mode: str
    mode: Mode
    state: QueueState
    reason: str
    enqueued_at: AwareDatetime
    claimed_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    owner: str | None = None
    run_id: str | None = None
    run_status: RunStatus | None = None


@dataclass(frozen=True, slots=True)
class RecordedAlerts:
    """What one notification changed in the store."""

    new: tuple[FiringKey, ...] = ()
    deduplicated: tuple[FiringKey, ...] = ()
    resolved: tuple[FiringKey, ...] = ()
    queued: tuple[QueueItem, ...] = ()
    held: tuple[QueueItem, ...] = ()
    cancelled: tuple[QueueItem, ...] = ()


class QueueClaim(_Record):
    """A worker's claim: the item it now runs (if any) and items set aside on the way."""

    item: QueueItem | None = None
    held: tuple[QueueItem, ...] = ()
    expired: tuple[QueueItem, ...] = ()


class BreakerRecord(_Record):
    """The circuit breaker as last saved."""

    open: bool
    reason: str
    opened_at: AwareDatetime | None = None
    reset_at: AwareDatetime | None = None


class AlertStore(StateStore, Protocol):
    """A :class:`StateStore` that also keeps alert firings, the run queue and the breaker."""

    def record_alerts(
        self,
        firing: Sequence[FiringInput],
        resolved: Sequence[ResolvedInput],
        *,
        now: datetime,
        hold_reason: str | None,
    ) -> RecordedAlerts:
        """Record one notification's alerts and queue new firings' runs, in one transaction."""

    def record_notifications(
        self, notifications: Sequence[AlertBatch], *, now: datetime, hold_reason: str | None
    ) -> list[RecordedAlerts]:
        """Record several notifications in one transaction (group commit); one result each."""

    def claim_queue_item(
        self,
        owner: str,
        *,
        now: datetime,
        max_age: timedelta,
        hold_reason: str | None,
        new_run_id: Callable[[], str],
    ) -> QueueClaim:
        """Claim the oldest runnable queued item for ``owner``."""

    def finish_queue_item(
        self,
        item_id: int,
        owner: str,
        state: QueueState,
        *,
        now: datetime,
        run_status: RunStatus | None = None,
        reason: str = "",
    ) -> bool:
        """Close a running item ``owner`` holds; return whether it was still running."""

    def interrupt_running(
        self, *, now: datetime, reason: str, owner: str | None = None
    ) -> list[QueueItem]:
        """Mark running items (of ``owner``, or all) and their runs interrupted."""

    def get_queue_item(self, item_id: int) -> QueueItem | None:
        """Return one queue item, or None."""

    def list_queue(self, state: QueueState | None = None, limit: int = 100) -> list[QueueItem]:
        """Return queue items, newest first, optionally in one state only."""

    def list_firings(
        self, outcome: FiringOutcome | None = None, limit: int = 100
    ) -> list[FiringRecord]:
        """Return firings, most recently received first, optionally of one outcome only."""

    def queue_counts(self) -> dict[QueueState, int]:
        """Return the number of queue items in each state."""

    def firing_counts(self) -> dict[FiringOutcome, int]:
        """Return the number of firings with each outcome."""

    def count_failed_items(self, since: datetime) -> int:
        """Count alert-triggered runs that finished unsuccessfully since ``since``."""

    def count_alerting_devices(self, since: datetime, *, stop_at: int) -> int:
        """Count distinct hosts with a still-firing alert queued since ``since`` (≤ ``stop_at``)."""

    def latest_queued_per_host(self, after_item: int) -> tuple[int, dict[str, datetime]]:
        """The last queue item id, and per host when items after ``after_item`` were queued last."""

    def checkpoint(self) -> None:
        """Copy what it can of the write-ahead log back into the database, waiting for nobody."""

    def breaker_state(self) -> BreakerRecord | None:
        """Return the saved circuit breaker, or None when never saved."""

    def save_breaker(self, record: BreakerRecord) -> None:
        """Save the circuit breaker."""


_QUEUE_COLUMNS = (
    "item_id, fingerprint, starts_at, runbook, host, trigger_mode, mode, state, reason,"
    " enqueued_at, claimed_at, finished_at, owner, run_id, run_status"
)
_FIRING_COLUMNS = (
    "fingerprint, starts_at, alertname, labels, status, outcome, reason, received_at,"
    " last_seen_at, times_seen, resolved_at"
)


#: Labels as stored: JSON with sorted keys (``json.dumps(labels, sort_keys=True)``, with its
#: encoder made once instead of per call).
_labels_json = json.JSONEncoder(sort_keys=True).encode


def _maybe_moment(text: str | None) -> datetime | None:
    return None if text is None else _moment(text)


def _queue_item(row: Sequence[object]) -> QueueItem:
    return QueueItem(
        item_id=int(str(row[0])),
        fingerprint=str(row[1]),
        starts_at=_moment(str(row[2])),
        runbook=str(row[3]),
        host=str(row[4]),
        trigger_mode=str(row[5]),
        mode=Mode(str(row[6])),
        state=QueueState(str(row[7])),
        reason=str(row[8]),
        enqueued_at=_moment(str(row[9])),
        claimed_at=_maybe_moment(None if row[10] is None else str(row[10])),
        finished_at=_maybe_moment(None if row[11] is None else str(row[11])),
        owner=None if row[12] is None else str(row[12]),
        run_id=None if row[13] is None else str(row[13]),
        run_status=None if row[14] is None else RunStatus(str(row[14])),
    )


def _firing_record(row: Sequence[object]) -> FiringRecord:
    return FiringRecord(
        fingerprint=str(row[0]),
        starts_at=_moment(str(row[1])),
        alertname=str(row[2]),
        labels=json.loads(str(row[3])),
        status=str(row[4]),
        outcome=FiringOutcome(str(row[5])),
        reason=str(row[6]),
        received_at=_moment(str(row[7])),
        last_seen_at=_moment(str(row[8])),
        times_seen=int(str(row[9])),
        resolved_at=_maybe_moment(None if row[10] is None else str(row[10])),
    )


def _record_batch(
    db: sqlite3.Connection,
    firing: Sequence[FiringInput],
    resolved: Sequence[ResolvedInput],
    stamp: str,
    hold_reason: str | None,
) -> RecordedAlerts:
    """One notification's inserts and updates, inside the caller's transaction."""
    new: list[FiringKey] = []
    dups: list[FiringKey] = []
    done: list[FiringKey] = []
    queued: list[QueueItem] = []
    cancelled: list[QueueItem] = []
    state = QueueState.HELD if hold_reason is not None else QueueState.QUEUED
    enqueued_at = _moment(stamp)
    for alert in firing:
        key = FiringKey(fingerprint=alert.fingerprint, starts_at=alert.starts_at)
        starts_at = _text(alert.starts_at)
        outcome, reason = alert.outcome, alert.reason
        if hold_reason is not None and alert.routes:
            outcome, reason = FiringOutcome.HELD, hold_reason
        (seen,) = db.execute(
            "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels,"
            " status, outcome, reason, received_at, last_seen_at, times_seen)"
            " VALUES (?, ?, ?, ?, 'firing', ?, ?, ?, ?, 1)"
            " ON CONFLICT (fingerprint, starts_at) DO UPDATE"
            " SET last_seen_at = excluded.last_seen_at, times_seen = times_seen + 1"
            " RETURNING times_seen",
            (
                alert.fingerprint,
                starts_at,
                alert.alertname,
                _labels_json(alert.labels),
                outcome.value,
                reason,
                stamp,
                stamp,
            ),
        ).fetchone()
        if seen > 1:
            dups.append(key)
            continue
        new.append(key)
        for route in alert.routes:
            (item_id,) = db.execute(
                "INSERT INTO alert_queue (fingerprint, starts_at, runbook, host,"
                " trigger_mode, mode, state, reason, enqueued_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING item_id",
                (
                    alert.fingerprint,
                    starts_at,
                    route.runbook,
                    route.host,
                    route.trigger_mode,
                    route.mode.value,
                    state.value,
                    hold_reason or "",
                    stamp,
                ),
            ).fetchone()
            # The row as inserted (the other columns are NULL), without reading it back.
            queued.append(
                QueueItem(
                    item_id=item_id,
                    fingerprint=alert.fingerprint,
                    starts_at=_moment(starts_at),
                    runbook=route.runbook,
                    host=route.host,
                    trigger_mode=route.trigger_mode,
                    mode=route.mode,
                    state=state,
                    reason=hold_reason or "",
                    enqueued_at=enqueued_at,
                )
            )
    for gone in resolved:
        key = FiringKey(fingerprint=gone.fingerprint, starts_at=gone.starts_at)
        params = (gone.fingerprint, _text(gone.starts_at))
        row = db.execute(
            "SELECT status FROM alert_firings WHERE fingerprint = ? AND starts_at = ?",
            params,
        ).fetchone()
        if row is not None and row[0] == "resolved":
            db.execute(
                "UPDATE alert_firings SET last_seen_at = ?, times_seen = times_seen + 1"
                " WHERE fingerprint = ? AND starts_at = ?",
                (stamp, *params),
            )
            dups.append(key)
            continue
        done.append(key)
        if row is None:
            db.execute(
                "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels,"
                " status, outcome, reason, received_at, last_seen_at, times_seen,"
                " resolved_at) VALUES (?, ?, ?, ?, 'resolved', ?, ?, ?, ?, 1, ?)",
                (
                    *params,
                    gone.alertname,
                    _labels_json(gone.labels),
                    FiringOutcome.RESOLVED.value,
                    "resolved before any firing notification was received",
                    stamp,
                    stamp,
                    stamp,
                ),
            )
            continue
        db.execute(
            "UPDATE alert_firings SET status = 'resolved', resolved_at = ?,"
            " last_seen_at = ?, times_seen = times_seen + 1"
            " WHERE fingerprint = ? AND starts_at = ?",
            (stamp, stamp, *params),
        )
        rows = db.execute(
            "UPDATE alert_queue SET state = ?, reason = ?, finished_at = ?"  # noqa: S608 - constant columns, bound values
            " WHERE fingerprint = ? AND starts_at = ? AND state = ?"
            f" RETURNING {_QUEUE_COLUMNS}",
            (
                QueueState.CANCELLED.value,
                "the alert resolved before the run started",
                stamp,
                *params,
                QueueState.QUEUED.value,
            ),
        ).fetchall()
        cancelled += (_queue_item(r) for r in rows)
    held = hold_reason is not None
    return RecordedAlerts(
        new=tuple(new),
        deduplicated=tuple(dups),
        resolved=tuple(done),
        queued=() if held else tuple(queued),
        held=tuple(queued) if held else (),
        cancelled=tuple(cancelled),
    )


class SqliteAlertStore(SqliteStateStore):
    """The SQLite store with the webhook server's tables: firings, run queue, breaker.

    A commit is durable when it returns: ``synchronous = FULL`` (SQLite's usual default,
    set here explicitly) syncs the write-ahead log at every commit.  SQLite copies the log
    back into the database inside whichever commit passes ``checkpoint_pages`` log pages
    (1,000 by default): a stall of that commit.  A writer that has :meth:`checkpoint` called
    on another connection after its commits sets it high, as a bound only.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        busy_timeout: timedelta = timedelta(seconds=10),
        migrations: tuple[Migration, ...] = MIGRATIONS,
        checkpoint_pages: int | None = None,
    ) -> None:
        super().__init__(path, clock=clock, busy_timeout=busy_timeout, migrations=migrations)
        try:
            with self._sqlite_errors("configure the database"):
                self._db.execute("PRAGMA synchronous = FULL")
                if checkpoint_pages is not None:
                    self._db.execute(f"PRAGMA wal_autocheckpoint = {int(checkpoint_pages):d}")
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteAlertStore({str(self.path)!r})"

    def checkpoint(self) -> None:
        """Copy the write-ahead log back into the database, waiting for nobody (PASSIVE).

        Pages a reader still needs are left for a later checkpoint; once all are copied, the
        next commit starts the log over from its beginning.
        """
        with self._guard, self._sqlite_errors("checkpoint the write-ahead log"):
            # fetchall: a statement left unfinished would keep a read snapshot open, and the
            # log could then never start over.
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- intake

    def record_alerts(
        self,
        firing: Sequence[FiringInput],
        resolved: Sequence[ResolvedInput],
        *,
        now: datetime,
        hold_reason: str | None,
    ) -> RecordedAlerts:
        """Record one notification's alerts in one transaction; return what changed.

        A firing seen before (same fingerprint and startsAt) is only counted as seen again:
        each firing queues its runs at most once, ever.  New firings queue their routes
        (``held`` instead when ``hold_reason`` is given: the circuit breaker is open).  A
        resolved alert marks its firing resolved and cancels its runs not yet started; a
        resolved alert never seen firing is recorded, so a late firing copy is a duplicate.
        """
        batch = AlertBatch(firing=tuple(firing), resolved=tuple(resolved))
        (recorded,) = self.record_notifications([batch], now=now, hold_reason=hold_reason)
        return recorded

    def record_notifications(
        self, notifications: Sequence[AlertBatch], *, now: datetime, hold_reason: str | None
    ) -> list[RecordedAlerts]:
        """Record several notifications in one transaction (group commit); one result each.

        Each is recorded as :meth:`record_alerts` would, in order; all or none are committed.
        """
        stamp = _text(now)
        with self._transaction(f"record {len(notifications)} alert notifications") as db:
            return [
                _record_batch(db, batch.firing, batch.resolved, stamp, hold_reason)
                for batch in notifications
            ]

    # -- the queue

    def claim_queue_item(
        self,
        owner: str,
        *,
        now: datetime,
        max_age: timedelta,
        hold_reason: str | None,
        new_run_id: Callable[[], str],
    ) -> QueueClaim:
        """Claim the oldest runnable queued item for ``owner``; give it a run id.

        With ``hold_reason`` (the circuit breaker is open) nothing is claimed and every
        queued item is set ``held``.  Items queued longer than ``max_age`` ago are set
        ``expired``.  An item whose host has a running item waits, so one server never runs
        two alert runs on one device at once.
        """
        stamp = _text(now)
        with self._transaction(f"claim a queue item for {owner}") as db:
            if hold_reason is not None:
                rows = db.execute(
                    "UPDATE alert_queue SET state = ?, reason = ?, finished_at = ?"  # noqa: S608 - constant columns, bound values
                    f" WHERE state = ? RETURNING {_QUEUE_COLUMNS}",
                    (QueueState.HELD.value, hold_reason, stamp, QueueState.QUEUED.value),
                ).fetchall()
                return QueueClaim(held=tuple(_queue_item(r) for r in rows))
            rows = db.execute(
                "UPDATE alert_queue SET state = ?, reason = ?, finished_at = ?"  # noqa: S608 - constant columns, bound values
                f" WHERE state = ? AND enqueued_at < ? RETURNING {_QUEUE_COLUMNS}",
                (
                    QueueState.EXPIRED.value,
                    f"not started within the queue's max age ({max_age})",
                    stamp,
                    QueueState.QUEUED.value,
                    _text(now - max_age),
                ),
            ).fetchall()
            expired = tuple(_queue_item(r) for r in rows)
            row = db.execute(
                "SELECT item_id FROM alert_queue WHERE state = ? AND host NOT IN"
                " (SELECT host FROM alert_queue WHERE state = ?) ORDER BY item_id LIMIT 1",
                (QueueState.QUEUED.value, QueueState.RUNNING.value),
            ).fetchone()
            if row is None:
                return QueueClaim(expired=expired)
            claimed = db.execute(
                "UPDATE alert_queue SET state = ?, owner = ?, claimed_at = ?, run_id = ?"  # noqa: S608 - constant columns, bound values
                f" WHERE item_id = ? RETURNING {_QUEUE_COLUMNS}",
                (QueueState.RUNNING.value, owner, stamp, new_run_id(), row[0]),
            ).fetchone()
        return QueueClaim(item=_queue_item(claimed), expired=expired)

    def finish_queue_item(
        self,
        item_id: int,
        owner: str,
        state: QueueState,
        *,
        now: datetime,
        run_status: RunStatus | None = None,
        reason: str = "",
    ) -> bool:
        """Close a running item ``owner`` holds; return whether it was still running."""
        with self._transaction(f"finish queue item {item_id}") as db:
            cursor = db.execute(
                "UPDATE alert_queue SET state = ?, run_status = ?, reason = ?, finished_at = ?"
                " WHERE item_id = ? AND owner = ? AND state = ?",
                (
                    state.value,
                    None if run_status is None else run_status.value,
                    reason,
                    _text(now),
                    item_id,
                    owner,
                    QueueState.RUNNING.value,
                ),
            )
        return cursor.rowcount > 0

    def interrupt_running(
        self, *, now: datetime, reason: str, owner: str | None = None
    ) -> list[QueueItem]:
        """Mark running items (of ``owner``, or all) interrupted, and their runs; free locks.

        Never re-queues: an item a stopped process claimed may have acted already.  Call with
        ``owner=None`` only when no other server process uses the store (the server holds a
        lock file for that).  Device locks held by those runs are released: their process is
        gone (or giving up on them), so nothing else would release them before their ttl.
        """
        stamp = _text(now)
        where, params = "state = ?", [QueueState.RUNNING.value]
        if owner is not None:
            where, params = "state = ? AND owner = ?", [QueueState.RUNNING.value, owner]
        with self._transaction("interrupt running queue items") as db:
            rows = db.execute(
                "UPDATE alert_queue SET state = ?, run_status = ?, reason = ?, finished_at = ?"  # noqa: S608 - constant columns, bound values
                f" WHERE {where} RETURNING {_QUEUE_COLUMNS}",
                (
                    QueueState.INTERRUPTED.value,
                    RunStatus.INTERRUPTED.value,
                    reason,
                    stamp,
                    *params,
                ),
            ).fetchall()
            items = sorted((_queue_item(r) for r in rows), key=lambda i: i.item_id)
            for item in items:
                if item.run_id is None:
                    continue
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ? AND status = ?",
                    (RunStatus.INTERRUPTED.value, stamp, item.run_id, RunStatus.RUNNING.value),
                )
                db.execute("DELETE FROM device_locks WHERE run_id = ?", (item.run_id,))
        return items

    def get_queue_item(self, item_id: int) -> QueueItem | None:
        """Return one queue item, or None."""
        with self._guard, self._sqlite_errors(f"read queue item {item_id}"):
            row = self._db.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM alert_queue WHERE item_id = ?",  # noqa: S608 - constant columns, bound values
                (item_id,),
            ).fetchone()
        return None if row is None else _queue_item(row)

    def list_queue(self, state: QueueState | None = None, limit: int = 100) -> list[QueueItem]:
        """Return queue items, newest first, optionally in one state only."""
        where, params = ("WHERE state = ?", (state.value,)) if state is not None else ("", ())
        with self._guard, self._sqlite_errors("list the queue"):
            rows = self._db.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM alert_queue {where} ORDER BY item_id DESC LIMIT ?",  # noqa: S608 - constant columns, bound values
                (*params, limit),
            ).fetchall()
        return [_queue_item(r) for r in rows]

    def list_firings(
        self, outcome: FiringOutcome | None = None, limit: int = 100
    ) -> list[FiringRecord]:
        """Return firings, most recently received first, optionally of one outcome only."""
        where, params = ("WHERE outcome = ?", (outcome.value,)) if outcome is not None else ("", ())
        with self._guard, self._sqlite_errors("list alert firings"):
            rows = self._db.execute(
                f"SELECT {_FIRING_COLUMNS} FROM alert_firings {where}"  # noqa: S608 - constant columns, bound values
                " ORDER BY received_at DESC, fingerprint LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_firing_record(r) for r in rows]

    def queue_counts(self) -> dict[QueueState, int]:
        """Return the number of queue items in each state (0 for states with none)."""
        with self._guard, self._sqlite_errors("count the queue"):
            rows = self._db.execute(
                "SELECT state, count(*) FROM alert_queue GROUP BY state"
            ).fetchall()
        counts = dict.fromkeys(QueueState, 0)
        counts.update({QueueState(r[0]): int(r[1]) for r in rows})
        return counts

    def firing_counts(self) -> dict[FiringOutcome, int]:
        """Return the number of firings with each outcome (0 for outcomes with none)."""
        with self._guard, self._sqlite_errors("count alert firings"):
            rows = self._db.execute(
                "SELECT outcome, count(*) FROM alert_firings GROUP BY outcome"
            ).fetchall()
        counts = dict.fromkeys(FiringOutcome, 0)
        counts.update({FiringOutcome(r[0]): int(r[1]) for r in rows})
        return counts

    def count_failed_items(self, since: datetime) -> int:
        """Count alert-triggered runs that finished unsuccessfully since ``since``.

        A run counts when it ended in any status but ``succeeded``, or could not be completed
        (``failed``).  Interrupted, cancelled, held and expired items never ran to an end.
        """
        with self._guard, self._sqlite_errors("count failed alert runs"):
            (count,) = self._db.execute(
                "SELECT count(*) FROM alert_queue WHERE finished_at >= ?"
                " AND (state = ? OR (state = ? AND run_status != ?))",
                (
                    _text(since),
                    QueueState.FAILED.value,
                    QueueState.DONE.value,
                    RunStatus.SUCCEEDED.value,
                ),
            ).fetchone()
        return int(count)

    def count_alerting_devices(self, since: datetime, *, stop_at: int) -> int:
        """Count distinct hosts with a still-firing alert queued since ``since``.

        Counting stops at ``stop_at``: a breaker only needs to know the threshold is passed.
        """
        with self._guard, self._sqlite_errors("count alerting devices"):
            (count,) = self._db.execute(
                "SELECT count(*) FROM (SELECT DISTINCT q.host FROM alert_queue q"
                " JOIN alert_firings f"
                " ON f.fingerprint = q.fingerprint AND f.starts_at = q.starts_at"
                " WHERE q.enqueued_at >= ? AND f.status = 'firing' LIMIT ?)",
                (_text(since), stop_at),
            ).fetchone()
        return int(count)

    def latest_queued_per_host(self, after_item: int) -> tuple[int, dict[str, datetime]]:
        """The last queue item id, and per host when items after ``after_item`` were queued last.

        Both come from one snapshot.  Items keep their host and time, and ids only grow, so a
        caller keeps the latest time per host up to date by reading only the items added since
        its last call.
        """
        with self._transaction("read recently queued hosts", immediate=False) as db:
            (last,) = db.execute(
                "SELECT coalesce(max(item_id), ?) FROM alert_queue", (after_item,)
            ).fetchone()
            rows = db.execute(
                "SELECT host, max(enqueued_at) FROM alert_queue"
                " WHERE item_id > ? AND item_id <= ? GROUP BY host",
                (after_item, last),
            ).fetchall()
        return int(last), {str(host): _moment(str(at)) for host, at in rows}

    # -- the circuit breaker

    def breaker_state(self) -> BreakerRecord | None:
        """Return the saved circuit breaker, or None when never saved."""
        with self._guard, self._sqlite_errors("read the circuit breaker"):
            row = self._db.execute(
                "SELECT open, reason, opened_at, reset_at FROM alert_breaker WHERE id = 1"
            ).fetchone()
        if row is None:
            return None
        return BreakerRecord(
            open=bool(row[0]),
            reason=str(row[1]),
            opened_at=_maybe_moment(row[2]),
            reset_at=_maybe_moment(row[3]),
        )

    def save_breaker(self, record: BreakerRecord) -> None:
        """Save the circuit breaker."""
        with self._transaction("save the circuit breaker") as db:
            db.execute(
                "INSERT INTO alert_breaker (id, open, reason, opened_at, reset_at)"
                " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET open = excluded.open,"
                " reason = excluded.reason, opened_at = excluded.opened_at,"
                " reset_at = excluded.reset_at",
                (
                    int(record.open),
                    record.reason,
                    None if record.opened_at is None else _text(record.opened_at),
                    None if record.reset_at is None else _text(record.reset_at),
                ),
            )
