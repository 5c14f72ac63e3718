"""The SQLite stores: one file (WAL, ``busy_timeout``, foreign keys) shared by processes.

Every read-modify-write runs inside ``BEGIN IMMEDIATE`` so that, for example, exactly one
process wins a device lease.  All timestamps are stored as fixed-width UTC ISO-8601 text,
so text order is time order; "now" is the injected clock (SQLite has no clock of its own
that processes would share).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

from engine.errors import StateError
from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.privacy import private_file
from engine.server.queue import (
    CANCELLED_REASON,
    AlertBatch,
    BreakerRecord,
    FiringInput,
    FiringKey,
    FiringOutcome,
    FiringRecord,
    ItemFiring,
    JoinedItem,
    QueueClaim,
    QueueItem,
    QueueRoute,
    QueueState,
    RecordedAlerts,
    ResolvedInput,
    joined_reason,
)
from engine.state.migrations import Migration, check_migrations
from engine.state.records import (
    Admission,
    ApprovalRecord,
    ApprovalStatus,
    HostRecord,
    Interruption,
    Lease,
    LeaseGrant,
    RunRecord,
    lease_expired_reason,
    run_filters,
)
from engine.state.sqlite.migrations import MIGRATIONS

_UPSERT_HOST = (
    "INSERT INTO host_results (run_id, host, outcome, reason, steps, finished_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (run_id, host) DO UPDATE SET outcome = excluded.outcome,"
    " reason = excluded.reason, steps = excluded.steps, finished_at = excluded.finished_at"
)


def _host_row(record: HostRecord) -> tuple[str, str, str, str, str, str]:
    return (
        record.run_id,
        record.host,
        record.outcome.value,
        record.reason,
        json.dumps(record.steps),
        _text(record.finished_at),
    )


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
        check_migrations(migrations)
        with self._sqlite_errors("open"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"{path}: cannot create the state directory: {exc.strerror}"
                ) from exc
            # Made owner-only before SQLite opens it: SQLite gives its -wal and -shm files
            # the database's mode, whatever the process umask.
            private_file(path)
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
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        """Set a run's final status and counts, finished now, and end its admission.

        A run finished already (marked interrupted when its leases expired) keeps its status.
        """
        if status is RunStatus.RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        with self._transaction(f"finish run {run_id}") as db:
            db.execute(
                "UPDATE runs SET status = ?, summary = ?, finished_at = ?"
                " WHERE run_id = ? AND status = ?",
                (
                    status.value,
                    json.dumps(dict(summary), sort_keys=True),
                    _text(self._clock()),
                    run_id,
                    RunStatus.RUNNING.value,
                ),
            )
            row = db.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StateError(f"{self.path}: cannot finish run {run_id}: no such run")
            db.execute("DELETE FROM admissions WHERE run_id = ?", (run_id,))
        return _run_record(row)

    def record_host(self, record: HostRecord, *, lease: Lease | None = None) -> bool:
        """Record one host's outcome in a started run, replacing an earlier one for that host.

        With ``lease``: only while it is the device's current lease and the run is running.
        """
        try:
            with self._transaction(f"record host {record.host} of run {record.run_id}") as db:
                if lease is not None and not _fence_holds(db, lease):
                    return False
                db.execute(_UPSERT_HOST, _host_row(record))
        except StateError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StateError(
                    f"{self.path}: cannot record host {record.host}: "
                    f"run {record.run_id} was never started"
                ) from exc
            raise
        return True

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
                db.executemany(_UPSERT_HOST, [_host_row(r) for r in records])
        except StateError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                unknown = ", ".join(r for r in run_ids if self.get_run(r) is None)
                raise StateError(
                    f"{self.path}: cannot record {hosts}: run {unknown} was never started"
                ) from exc
            raise

    def list_runs(
        self,
        limit: int = 50,
        runbook: str | None = None,
        *,
        host: str | None = None,
        status: RunStatus | None = None,
        since: datetime | None = None,
        id_suffix: str | None = None,
    ) -> list[RunRecord]:
        """Return the most recent runs first, optionally only those matching every filter."""
        where, params = run_filters(
            "?",
            runbook=runbook,
            host=host,
            status=status,
            since=_text(since) if since is not None else None,
            id_suffix=id_suffix,
            suffix_sql="substr(run_id, -?)",
        )
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

    def mark_acted(
        self, runbook: str, host: str, at: datetime, *, lease: Lease | None = None
    ) -> bool:
        """Remember that ``runbook`` acted on ``host`` at ``at`` (a later time wins).

        With ``lease``: only while it is the device's current lease and the run is running.
        """
        with self._transaction(f"record cool-down of {runbook} on {host}") as db:
            if lease is not None and not _fence_holds(db, lease):
                return False
            db.execute(
                "INSERT INTO cooldowns (runbook, host, acted_at) VALUES (?, ?, ?)"
                " ON CONFLICT (runbook, host) DO UPDATE"
                " SET acted_at = max(acted_at, excluded.acted_at)",
                (runbook, host, _text(at)),
            )
        return True

    # -- device leases

    def acquire_lease(self, host: str, run_id: str, *, holder: str, ttl: timedelta) -> LeaseGrant:
        """Lease ``host`` to ``run_id`` until now + ``ttl`` (the injected clock), with a new token.

        Granted when the device is free, its lease expired, or ``run_id`` holds it already
        (extended, same token).  An expired lease of a run still running is reaped first: its
        run is marked interrupted and reported.  Atomic across threads and processes.
        """
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        now = self._clock()
        stamp = _text(now)
        with self._transaction(f"lease {host} to run {run_id}") as db:
            row = db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM device_locks WHERE host = ?",  # noqa: S608 - constant columns
                (host,),
            ).fetchone()
            current = None if row is None else _lease(row)
            if current is not None and current.run_id == run_id:
                renewed = db.execute(
                    "UPDATE device_locks SET expires_at = ?, holder = ? WHERE host = ?"  # noqa: S608 - constant columns
                    f" RETURNING {_LEASE_COLUMNS}",
                    (_text(now + ttl), holder, host),
                ).fetchone()
                return LeaseGrant(lease=_lease(renewed))
            if current is not None and current.expires_at > now:
                return LeaseGrant(held_by=current)
            interrupted = _reap(db, [current] if current is not None else [], stamp)
            (token,) = db.execute(
                "UPDATE lease_tokens SET last = last + 1 WHERE id = 1 RETURNING last"
            ).fetchone()
            granted = db.execute(
                "INSERT INTO device_locks (host, run_id, holder, token, acquired_at, expires_at)"  # noqa: S608 - constant columns
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET run_id = excluded.run_id,"
                " holder = excluded.holder, token = excluded.token,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at"
                f" RETURNING {_LEASE_COLUMNS}",
                (host, run_id, holder, token, stamp, _text(now + ttl)),
            ).fetchone()
        return LeaseGrant(lease=_lease(granted), interrupted=tuple(interrupted))

    def renew_leases(self, leases: Sequence[Lease], ttl: timedelta) -> list[Lease]:
        """Extend the leases still current to now + ``ttl``; those missing were lost."""
        expires = _text(self._clock() + ttl)
        renewed: list[Lease] = []
        with self._transaction("renew leases") as db:
            for lease in leases:
                row = db.execute(
                    "UPDATE device_locks SET expires_at = ? WHERE host = ? AND token = ?"  # noqa: S608 - constant columns
                    f" RETURNING {_LEASE_COLUMNS}",
                    (expires, lease.host, lease.token),
                ).fetchone()
                if row is not None:
                    renewed.append(_lease(row))
        return renewed

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up if it is still current; return whether it was."""
        with self._transaction(f"release the lease on {lease.host}") as db:
            cursor = db.execute(
                "DELETE FROM device_locks WHERE host = ? AND token = ?", (lease.host, lease.token)
            )
        return cursor.rowcount > 0

    def lock_holder(self, host: str) -> Lease | None:
        """Return the live lease on ``host``, or None if it is free or expired."""
        now = _text(self._clock())
        with self._guard, self._sqlite_errors(f"read the lease of {host}"):
            row = self._db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM device_locks"  # noqa: S608 - constant columns
                " WHERE host = ? AND expires_at > ?",
                (host, now),
            ).fetchone()
        return None if row is None else _lease(row)

    def reap_expired(self) -> list[Interruption]:
        """Remove expired leases; mark their runs, if still running, interrupted; return those."""
        stamp = _text(self._clock())
        with self._transaction("reap expired leases") as db:
            rows = db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM device_locks WHERE expires_at <= ?",  # noqa: S608 - constant columns
                (stamp,),
            ).fetchall()
            return _reap(db, [_lease(r) for r in rows], stamp)

    # -- fleet-wide admission

    def admit_hosts(
        self,
        runbook: str,
        run_id: str,
        hosts: Sequence[str],
        *,
        allowed: int,
        ttl: timedelta,
    ) -> Admission:
        """Admit ``run_id`` to act on ``hosts`` unless the runbook's runs would exceed ``allowed``.

        ``BEGIN IMMEDIATE`` takes the database's write lock: admissions are counted and
        written by one transaction at a time.
        """
        now = self._clock()
        with self._transaction(f"admit run {run_id} of {runbook}") as db:
            rows = db.execute(
                "SELECT DISTINCT a.host FROM admissions a JOIN runs r ON r.run_id = a.run_id"
                " WHERE a.runbook = ? AND a.run_id != ? AND a.expires_at > ? AND r.status = ?"
                " ORDER BY a.host",
                (runbook, run_id, _text(now), RunStatus.RUNNING.value),
            ).fetchall()
            others = tuple(str(r[0]) for r in rows)
            if len(set(others) | set(hosts)) > allowed:
                return Admission(admitted=False, allowed=allowed, in_flight=others)
            db.executemany(
                "INSERT INTO admissions (runbook, run_id, host, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (runbook, run_id, host)"
                " DO UPDATE SET expires_at = excluded.expires_at",
                [(runbook, run_id, host, _text(now + ttl)) for host in hosts],
            )
        return Admission(admitted=True, allowed=allowed, in_flight=others)

    def renew_admission(self, run_id: str, ttl: timedelta) -> bool:
        """Extend ``run_id``'s admission to now + ``ttl``; whether it still had one."""
        with self._transaction(f"renew the admission of run {run_id}") as db:
            cursor = db.execute(
                "UPDATE admissions SET expires_at = ? WHERE run_id = ?",
                (_text(self._clock() + ttl), run_id),
            )
        return cursor.rowcount > 0

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


_LEASE_COLUMNS = "host, run_id, holder, token, acquired_at, expires_at"


def _lease(row: Sequence[object]) -> Lease:
    return Lease(
        host=str(row[0]),
        run_id=str(row[1]),
        holder=str(row[2]),
        token=int(str(row[3])),
        acquired_at=_moment(str(row[4])),
        expires_at=_moment(str(row[5])),
    )


def _fence_holds(db: sqlite3.Connection, lease: Lease) -> bool:
    """Whether ``lease`` is still its device's current lease, and its run still running."""
    row = db.execute(
        "SELECT 1 FROM device_locks l JOIN runs r ON r.run_id = l.run_id"
        " WHERE l.host = ? AND l.token = ? AND r.status = ?",
        (lease.host, lease.token, RunStatus.RUNNING.value),
    ).fetchone()
    return row is not None


def _reap(db: sqlite3.Connection, expired: Sequence[Lease], stamp: str) -> list[Interruption]:
    """Delete ``expired`` leases; mark their runs (and queue items) interrupted if running."""
    found: list[Interruption] = []
    for lease in expired:
        db.execute(
            "DELETE FROM device_locks WHERE host = ? AND token = ?", (lease.host, lease.token)
        )
        reason = lease_expired_reason(lease)
        run = db.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ? AND status = ?"
            " RETURNING runbook, trigger",
            (RunStatus.INTERRUPTED.value, stamp, lease.run_id, RunStatus.RUNNING.value),
        ).fetchone()
        if run is None:
            continue
        item = db.execute(
            "UPDATE alert_queue SET state = ?, run_status = ?, reason = ?, finished_at = ?"
            " WHERE run_id = ? AND state = ? RETURNING item_id",
            (
                QueueState.INTERRUPTED.value,
                RunStatus.INTERRUPTED.value,
                reason,
                stamp,
                lease.run_id,
                QueueState.RUNNING.value,
            ),
        ).fetchone()
        db.execute("DELETE FROM admissions WHERE run_id = ?", (lease.run_id,))
        found.append(
            Interruption(
                run_id=lease.run_id,
                runbook=str(run[0]),
                trigger=str(run[1]),
                reason=reason,
                host=lease.host,
                token=lease.token,
                item_id=None if item is None else int(item[0]),
            )
        )
    return found


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


#: Queue a firing's run, or find the run of its runbook queued or running on the device in
#: its mode (the partial unique index ``alert_queue_one_active``) and return that one.  A
#: held item is not in that index: it is always inserted.
_QUEUE_ROUTE = (
    "INSERT INTO alert_queue (fingerprint, starts_at, runbook, host, trigger_mode, mode,"
    " state, reason, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (runbook, host, trigger_mode) WHERE state IN ('queued', 'running')"
    " DO UPDATE SET state = state RETURNING item_id, state, fingerprint, starts_at"
)


#: An active item's key (runbook, host, trigger mode) → its id and state (queued | running).
_Active = dict[tuple[str, str, str], tuple[int, QueueState]]


def _active_items(db: sqlite3.Connection, notifications: Sequence[AlertBatch]) -> _Active:
    """The items queued or running for the routes of ``notifications``, in one statement.

    Read inside the intake's write transaction (``BEGIN IMMEDIATE``), so nobody changes
    them before the commit; each route is looked up in the partial unique index.
    """
    keys = {
        (route.runbook, route.host, route.trigger_mode)
        for batch in notifications
        for alert in batch.firing
        for route in alert.routes
    }
    if not keys:
        return {}
    active: _Active = {}
    for start in range(0, len(keys), _ROUTES_PER_LOOKUP):
        chunk = list(itertools.islice(keys, start, start + _ROUTES_PER_LOOKUP))
        rows = db.execute(
            "SELECT r.column1, r.column2, r.column3, q.item_id, q.state"  # noqa: S608 - placeholders only
            f" FROM (VALUES {', '.join(['(?, ?, ?)'] * len(chunk))}) AS r"
            " CROSS JOIN alert_queue q ON q.runbook = r.column1 AND q.host = r.column2"
            " AND q.trigger_mode = r.column3 AND q.state IN ('queued', 'running')",
            [value for key in chunk for value in key],
        )
        for runbook, host, trigger_mode, item_id, state in rows:
            active[(runbook, host, trigger_mode)] = (item_id, QueueState(state))
    return active


def _route_key(route: QueueRoute | QueueItem) -> tuple[str, str, str]:
    return (route.runbook, route.host, route.trigger_mode)


#: Routes looked up per statement (three bound values each, far below SQLite's limit).
_ROUTES_PER_LOOKUP = 2000


def _record_batch(
    db: sqlite3.Connection,
    batch: AlertBatch,
    stamp: str,
    hold_reason: str | None,
    active: _Active,
) -> RecordedAlerts:
    """One notification's inserts and updates, inside the caller's transaction.

    ``active`` (:func:`_active_items`) is kept up to date as items are queued or cancelled,
    so a firing whose every route joins a run is inserted ``coalesced`` at once.
    """
    new: list[FiringKey] = []
    dups: list[FiringKey] = []
    done: list[FiringKey] = []
    queued: list[QueueItem] = []
    cancelled: list[QueueItem] = []
    coalesced: list[JoinedItem] = []
    state = QueueState.HELD if hold_reason is not None else QueueState.QUEUED
    enqueued_at = _moment(stamp)
    for alert in batch.firing:
        key = FiringKey(fingerprint=alert.fingerprint, starts_at=alert.starts_at)
        starts_at = _text(alert.starts_at)
        outcome, reason = alert.outcome, alert.reason
        # A held item is never joined (the partial unique index leaves it out): when held,
        # every route queues a held item.
        known = [
            None if hold_reason is not None else active.get(_route_key(route))
            for route in alert.routes
        ]
        joins = [
            JoinedItem(
                fingerprint=alert.fingerprint,
                starts_at=alert.starts_at,
                item_id=item[0],
                state=item[1],
                runbook=route.runbook,
                host=route.host,
            )
            for route, item in zip(alert.routes, known, strict=True)
            if item is not None
        ]
        if hold_reason is not None and alert.routes:
            outcome, reason = FiringOutcome.HELD, hold_reason
        elif joins and len(joins) == len(alert.routes):  # it joins on every route
            outcome, reason = FiringOutcome.COALESCED, joined_reason(joins)
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
        joined: list[JoinedItem] = []
        foreseen = iter(joins)
        unforeseen = False
        for route, item in zip(alert.routes, known, strict=True):
            if item is not None:
                item_id = item[0]
                joined.append(next(foreseen))
            else:
                # Queue its run; the partial unique index still has the last word (an item
                # this transaction did not see joins as well).
                item_id, item_state, fingerprint, item_start = db.execute(
                    _QUEUE_ROUTE,
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
            db.execute(
                "INSERT INTO queue_firings (item_id, fingerprint, starts_at) VALUES (?, ?, ?)",
                (item_id, alert.fingerprint, starts_at),
            )
            if item is not None:
                continue
            if (fingerprint, item_start) != (alert.fingerprint, starts_at):
                unforeseen = True
                joined.append(
                    JoinedItem(
                        fingerprint=alert.fingerprint,
                        starts_at=alert.starts_at,
                        item_id=item_id,
                        state=QueueState(item_state),
                        runbook=route.runbook,
                        host=route.host,
                    )
                )
                continue
            if hold_reason is None:
                active[_route_key(route)] = (item_id, state)
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
        if unforeseen and len(joined) == len(alert.routes):
            db.execute(
                "UPDATE alert_firings SET outcome = ?, reason = ?"
                " WHERE fingerprint = ? AND starts_at = ?",
                (
                    FiringOutcome.COALESCED.value,
                    joined_reason(joined),
                    alert.fingerprint,
                    starts_at,
                ),
            )
        coalesced += joined
    _record_resolved(db, batch.resolved, stamp, active, (dups, done, cancelled))
    held = hold_reason is not None
    return RecordedAlerts(
        new=tuple(new),
        deduplicated=tuple(dups),
        resolved=tuple(done),
        queued=() if held else tuple(queued),
        held=tuple(queued) if held else (),
        cancelled=tuple(cancelled),
        coalesced=tuple(coalesced),
    )


def _record_resolved(
    db: sqlite3.Connection,
    resolved: Sequence[ResolvedInput],
    stamp: str,
    active: _Active,
    into: tuple[list[FiringKey], list[FiringKey], list[QueueItem]],
) -> None:
    """Record resolved alerts; their runs not started yet are cancelled (into ``into``).

    ``into``: the notification's deduplicated and resolved firings and cancelled items.
    """
    dups, done, cancelled = into
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
        # Its runs not started yet are cancelled, unless another firing they run for still fires.
        rows = db.execute(
            "UPDATE alert_queue SET state = ?, reason = ?, finished_at = ?"  # noqa: S608 - constant columns, bound values
            " WHERE state = ? AND item_id IN (SELECT item_id FROM queue_firings"
            " WHERE fingerprint = ? AND starts_at = ?) AND NOT EXISTS (SELECT 1"
            " FROM queue_firings l JOIN alert_firings f"
            " ON f.fingerprint = l.fingerprint AND f.starts_at = l.starts_at"
            " WHERE l.item_id = alert_queue.item_id AND f.status = 'firing')"
            f" RETURNING {_QUEUE_COLUMNS}",
            (QueueState.CANCELLED.value, CANCELLED_REASON, stamp, QueueState.QUEUED.value, *params),
        ).fetchall()
        cancelled += sorted((_queue_item(r) for r in rows), key=lambda i: i.item_id)
    for item in cancelled:  # no firing joins them any more
        if item.item_id == active.get(_route_key(item), (0, item.state))[0]:
            del active[_route_key(item)]


class SqliteAlertStore(SqliteStateStore):
    """The SQLite store with the webhook server's tables: firings, run queue, breaker.

    A commit is durable when it returns: ``synchronous = FULL`` (SQLite's usual default,
    set here explicitly) syncs the write-ahead log at every commit.  SQLite copies the log
    back into the database inside whichever commit passes ``checkpoint_pages`` log pages
    (1,000 by default): a stall of that commit.  A writer that has :meth:`checkpoint` called
    on another connection after its commits sets it high, as a bound only; ``after_commit``
    is told how many notifications each intake commit recorded (the database's checkpointer
    counts them).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        busy_timeout: timedelta = timedelta(seconds=10),
        migrations: tuple[Migration, ...] = MIGRATIONS,
        checkpoint_pages: int | None = None,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(path, clock=clock, busy_timeout=busy_timeout, migrations=migrations)
        self._after_commit = after_commit
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
        (``held`` instead when ``hold_reason`` is given: the circuit breaker is open), or join
        the run of the route's runbook queued or running on the device in the same trigger
        mode (recorded ``coalesced`` when they join for every route).  A resolved alert marks
        its firing resolved and cancels its runs not yet started that no other firing still
        firing was queued for or joined; a resolved alert never seen firing is recorded, so a
        late firing copy is a duplicate.
        """
        batch = AlertBatch(firing=tuple(firing), resolved=tuple(resolved))
        (recorded,) = self.record_notifications([batch], now=now, hold_reason=hold_reason)
        return recorded

    def record_notifications(
        self,
        notifications: Sequence[AlertBatch],
        *,
        now: datetime,
        hold_reason: str | None,
        audit: Callable[[list[RecordedAlerts]], None] | None = None,
    ) -> list[RecordedAlerts]:
        """Record several notifications in one transaction (group commit); one result each.

        Each is recorded as :meth:`record_alerts` would, in order; all or none are committed.
        ``audit`` is called with the results right after the commit (the audit log is a
        file, synced on its own: not under the database's write lock).
        """
        stamp = _text(now)
        with self._transaction(f"record {len(notifications)} alert notifications") as db:
            active = {} if hold_reason is not None else _active_items(db, notifications)
            results = [
                _record_batch(db, batch, stamp, hold_reason, active) for batch in notifications
            ]
        if audit is not None:
            audit(results)
        if self._after_commit is not None:
            self._after_commit(len(notifications))
        return results

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

    def heartbeat(self, owner: str, ttl: timedelta) -> None:
        """Say that controller ``owner`` is alive until now + ``ttl`` (the injected clock)."""
        with self._transaction(f"heartbeat of {owner}") as db:
            db.execute(
                "INSERT INTO controllers (owner, expires_at) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                (owner, _text(self._clock() + ttl)),
            )

    def interrupt_orphans(self, *, now: datetime) -> list[QueueItem]:
        """Mark running items of controllers whose heartbeat expired (and their runs) interrupted.

        A controller that never sent a heartbeat is not judged (an older engine's server).
        """
        stamp = _text(self._clock())
        with self._transaction("interrupt the runs of stopped controllers") as db:
            rows = db.execute(
                "SELECT owner FROM controllers WHERE expires_at <= ?", (stamp,)
            ).fetchall()
            db.execute("DELETE FROM controllers WHERE expires_at <= ?", (stamp,))
        items: list[QueueItem] = []
        for (owner,) in rows:
            items += self.interrupt_running(
                now=now,
                reason=f"its server {owner} stopped (no heartbeat since its expiry)",
                owner=str(owner),
            )
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

    def item_firings(self, item_ids: Sequence[int]) -> list[ItemFiring]:
        """The firings the items run for: each item's own first, then those that joined it."""
        if not item_ids:
            return []
        marks = ", ".join("?" * len(item_ids))
        with self._guard, self._sqlite_errors("list the firings of queue items"):
            rows = self._db.execute(
                "SELECT l.item_id, l.fingerprint, l.starts_at, f.alertname, f.status"  # noqa: S608 - placeholders only, bound values
                " FROM queue_firings l JOIN alert_queue q ON q.item_id = l.item_id"
                " JOIN alert_firings f"
                " ON f.fingerprint = l.fingerprint AND f.starts_at = l.starts_at"
                f" WHERE l.item_id IN ({marks}) ORDER BY l.item_id,"
                " (l.fingerprint = q.fingerprint AND l.starts_at = q.starts_at) DESC,"
                " f.received_at, l.starts_at, l.fingerprint",
                tuple(item_ids),
            ).fetchall()
        return [
            ItemFiring(
                item_id=int(r[0]),
                fingerprint=str(r[1]),
                starts_at=_moment(str(r[2])),
                alertname=str(r[3]),
                status=str(r[4]),
            )
            for r in rows
        ]

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
                " JOIN queue_firings l ON l.item_id = q.item_id JOIN alert_firings f"
                " ON f.fingerprint = l.fingerprint AND f.starts_at = l.starts_at"
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
