"""The PostgreSQL store: every method one transaction on a connection from the pool.

Leases, admissions and heartbeats expire on the database's clock (``clock_timestamp()``),
never a controller's.  Read-modify-writes lock what they decide on: the device's lease row,
the runbook's admission row (``FOR UPDATE``), queue items (``FOR UPDATE SKIP LOCKED``, so
replicas never wait for, or take, each other's claims).  A firing is recorded with
``INSERT ... ON CONFLICT``: of two replicas receiving it at once, the second waits for the
first's commit and sees a duplicate.  A transaction that loses a deadlock or a
serialization check is run again (nothing of it was committed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from engine.audit import AuditHead, seal_record, take_pending, writing_into
from engine.errors import StateError
from engine.outcomes import HostOutcome, Mode, RunStatus
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

_T = TypeVar("_T")
Cursor = psycopg.Cursor[tuple[Any, ...]]

#: Times a transaction that lost a deadlock or a serialization check is tried again.
RETRIES = 5
#: Queued items one claim looks at before giving up (each found to be on a busy device).
CLAIM_CANDIDATES = 16

_RUN_COLUMNS = (
    "run_id, runbook, runbook_digest, mode, trigger, started_at, finished_at, status, summary"
)
_LEASE_COLUMNS = "host, run_id, holder, token, acquired_at, expires_at"
_APPROVAL_COLUMNS = (
    "approval_id, runbook, source, requested_by, requested_at, expires_at, four_eyes,"
    " status, decided_by, decided_at, reason, plan"
)
_QUEUE_COLUMNS = (
    "item_id, fingerprint, starts_at, runbook, host, trigger_mode, mode, state, reason,"
    " enqueued_at, claimed_at, finished_at, owner, run_id, run_status"
)
_FIRING_COLUMNS = (
    "fingerprint, starts_at, alertname, labels, status, outcome, reason, received_at,"
    " last_seen_at, times_seen, resolved_at"
)
_labels_json = json.JSONEncoder(sort_keys=True).encode


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got {moment!r}")
    return moment


_UPSERT_HOST = (
    "INSERT INTO host_results (run_id, host, outcome, reason, steps, finished_at)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (run_id, host) DO UPDATE SET outcome = excluded.outcome,"
    " reason = excluded.reason, steps = excluded.steps, finished_at = excluded.finished_at"
)


def _host_row(record: HostRecord) -> tuple[str, str, str, str, str, datetime]:
    return (
        record.run_id,
        record.host,
        record.outcome.value,
        record.reason,
        json.dumps(record.steps),
        _aware(record.finished_at),
    )


class PostgresStore:
    """An :class:`~engine.state.AlertStore` on a shared pool; safe to use from many threads."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]], url: str) -> None:
        self._pool = pool
        self.url = url

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def close(self) -> None:
        """Nothing to release: the pool belongs to the database."""

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StateError(f"{self.url}: state store cannot {doing}: {exc}") from exc

    def _run(self, doing: str, work: Callable[[Cursor], _T]) -> _T:
        """Run ``work`` in one transaction (committed at the end); try again on a deadlock.

        Audit events of the caller's unit of work (:func:`engine.audit.audit_unit`), and
        events emitted while ``work`` runs, are appended to the chain in this transaction,
        last (every transaction locks the chain's head after its rows: no lock-order
        deadlock): a rolled-back change leaves no record.
        """
        pending = take_pending()
        with self._errors(doing):
            for attempt in range(RETRIES):
                try:
                    with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                        with writing_into(lambda members: _append_chain(cur, [members])[0]):
                            result = work(cur)
                        if pending:
                            _append_chain(cur, pending)
                        return result
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    if attempt == RETRIES - 1:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the audit chain

    def append_audit(self, events: Sequence[Mapping[str, str]]) -> list[AuditHead]:
        """Append events (canonical member texts) in a transaction of their own."""
        return self._run("append to the audit chain", lambda cur: _append_chain(cur, events))

    def audit_chain_head(self) -> AuditHead | None:
        """The chain's last record, or None when it is empty."""

        def work(cur: Cursor) -> AuditHead | None:
            row = _must(cur.execute("SELECT seq, hash FROM audit_chain_head WHERE id = 1"))
            return None if int(row[0]) == 0 else AuditHead(seq=int(row[0]), hash=str(row[1]))

        return self._run("read the audit chain's head", work)

    def audit_lines(self, *, batch: int = 5000) -> Iterator[bytes]:
        """Every record of the chain as its JSON line (with the newline), in order."""
        after = 0

        def page(cur: Cursor) -> list[tuple[Any, ...]]:
            return cur.execute(
                "SELECT seq, record FROM audit_chain WHERE seq > %s ORDER BY seq LIMIT %s",
                (after, batch),
            ).fetchall()

        while True:
            rows = self._run("read the audit chain", page)
            if not rows:
                return
            for seq, record in rows:
                yield f"{record}\n".encode("ascii")
                after = int(seq)

    def schema_version(self) -> int:
        """Return the highest migration applied to the database."""
        return self._run(
            "read the schema version",
            lambda cur: int(_must(cur.execute("SELECT max(version) FROM schema_version"))[0]),
        )

    # -- runs

    def start_run(self, record: RunRecord) -> None:
        """Record a new run; its ``run_id`` must be unused."""

        def work(cur: Cursor) -> None:
            cur.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",  # noqa: S608 - constant columns
                (
                    record.run_id,
                    record.runbook,
                    record.runbook_digest,
                    record.mode.value,
                    record.trigger,
                    _aware(record.started_at),
                    record.finished_at,
                    record.status.value,
                    json.dumps(record.summary, sort_keys=True),
                ),
            )

        try:
            self._run(f"start run {record.run_id}", work)
        except StateError as exc:
            if isinstance(exc.__cause__, pg_errors.UniqueViolation):
                raise StateError(f"{self.url}: run {record.run_id} already exists") from exc
            raise

    def finish_run(self, run_id: str, status: RunStatus, summary: Mapping[str, int]) -> RunRecord:
        """Set a run's final status and counts, finished now, and end its admission.

        A run finished already (marked interrupted when its leases expired) keeps its status.
        """
        if status is RunStatus.RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")

        def work(cur: Cursor) -> RunRecord:
            cur.execute(
                "UPDATE runs SET status = %s, summary = %s, finished_at = clock_timestamp()"
                " WHERE run_id = %s AND status = %s",
                (status.value, json.dumps(dict(summary), sort_keys=True), run_id, "running"),
            )
            row = cur.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s",  # noqa: S608 - constant columns
                (run_id,),
            ).fetchone()
            if row is None:
                raise StateError(f"{self.url}: cannot finish run {run_id}: no such run")
            cur.execute("DELETE FROM admissions WHERE run_id = %s", (run_id,))
            return _run_record(row)

        return self._run(f"finish run {run_id}", work)

    def record_host(self, record: HostRecord, *, lease: Lease | None = None) -> bool:
        """Record one host's outcome in a started run, replacing an earlier one for that host.

        With ``lease``: only while it is the device's current lease and the run is running.
        """

        def work(cur: Cursor) -> bool:
            if lease is not None and not _fence_holds(cur, lease):
                return False
            cur.execute(_UPSERT_HOST, _host_row(record))
            return True

        try:
            return self._run(f"record host {record.host} of run {record.run_id}", work)
        except StateError as exc:
            if isinstance(exc.__cause__, pg_errors.ForeignKeyViolation):
                raise StateError(
                    f"{self.url}: cannot record host {record.host}: "
                    f"run {record.run_id} was never started"
                ) from exc
            raise

    def record_hosts(self, records: Sequence[HostRecord]) -> None:
        """Record hosts' outcomes in started runs, replacing earlier ones, in one transaction."""
        if not records:
            return
        more = f" and {len(records) - 1} more" if len(records) > 1 else ""
        hosts = f"host {records[0].host}{more}"
        run_ids = sorted({r.run_id for r in records})

        def work(cur: Cursor) -> None:
            cur.executemany(_UPSERT_HOST, [_host_row(r) for r in records])

        try:
            self._run(f"record {hosts} of run {', '.join(run_ids)}", work)
        except StateError as exc:
            if isinstance(exc.__cause__, pg_errors.ForeignKeyViolation):
                unknown = ", ".join(r for r in run_ids if self.get_run(r) is None)
                raise StateError(
                    f"{self.url}: cannot record {hosts}: run {unknown} was never started"
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
            "%s",
            runbook=runbook,
            host=host,
            status=status,
            since=_aware(since) if since is not None else None,
            id_suffix=id_suffix,
            suffix_sql="right(run_id, %s)",
        )

        def work(cur: Cursor) -> list[RunRecord]:
            rows = cur.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs {where}"  # noqa: S608 - constant columns
                " ORDER BY started_at DESC, created DESC LIMIT %s",
                (*params, limit),
            ).fetchall()
            return [_run_record(r) for r in rows]

        return self._run("list runs", work)

    def get_run(self, run_id: str) -> RunRecord | None:
        """Return one run, or None if no run has that id."""

        def work(cur: Cursor) -> RunRecord | None:
            row = cur.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = %s",  # noqa: S608 - constant columns
                (run_id,),
            ).fetchone()
            return None if row is None else _run_record(row)

        return self._run(f"read run {run_id}", work)

    def host_records(self, run_id: str) -> list[HostRecord]:
        """Return the host outcomes of a run, ordered by host."""

        def work(cur: Cursor) -> list[HostRecord]:
            rows = cur.execute(
                "SELECT run_id, host, outcome, reason, steps, finished_at FROM host_results"
                " WHERE run_id = %s ORDER BY host",
                (run_id,),
            ).fetchall()
            return [
                HostRecord(
                    run_id=r[0],
                    host=r[1],
                    outcome=HostOutcome(r[2]),
                    reason=r[3],
                    steps=json.loads(r[4]),
                    finished_at=r[5],
                )
                for r in rows
            ]

        return self._run(f"read hosts of run {run_id}", work)

    def mark_interrupted(self, now: datetime) -> list[str]:
        """Mark runs still ``running`` as ``interrupted`` at ``now``; return their ids."""

        def work(cur: Cursor) -> list[str]:
            rows = cur.execute(
                "UPDATE runs SET status = %s, finished_at = %s WHERE status = %s RETURNING run_id",
                (RunStatus.INTERRUPTED.value, _aware(now), RunStatus.RUNNING.value),
            ).fetchall()
            return sorted(str(r[0]) for r in rows)

        return self._run("mark interrupted runs", work)

    # -- cool-downs

    def last_acted(self, runbook: str, host: str) -> datetime | None:
        """Return when ``runbook`` last acted on ``host`` (for cool-downs), or None."""

        def work(cur: Cursor) -> datetime | None:
            row = cur.execute(
                "SELECT acted_at FROM cooldowns WHERE runbook = %s AND host = %s", (runbook, host)
            ).fetchone()
            return None if row is None else row[0]

        return self._run(f"read cool-down of {runbook} on {host}", work)

    def mark_acted(
        self, runbook: str, host: str, at: datetime, *, lease: Lease | None = None
    ) -> bool:
        """Remember that ``runbook`` acted on ``host`` at ``at`` (a later time wins).

        With ``lease``: only while it is the device's current lease and the run is running.
        """
        _aware(at)

        def work(cur: Cursor) -> bool:
            if lease is not None and not _fence_holds(cur, lease):
                return False
            cur.execute(
                "INSERT INTO cooldowns (runbook, host, acted_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (runbook, host) DO UPDATE"
                " SET acted_at = greatest(cooldowns.acted_at, excluded.acted_at)",
                (runbook, host, at),
            )
            return True

        return self._run(f"record cool-down of {runbook} on {host}", work)

    # -- device leases

    def acquire_lease(self, host: str, run_id: str, *, holder: str, ttl: timedelta) -> LeaseGrant:
        """Lease ``host`` to ``run_id`` until the database's now + ``ttl``, with a new token.

        Granted when the device is free, its lease expired, or ``run_id`` holds it already
        (extended, same token).  An expired lease of a run still running is reaped first:
        that run is marked interrupted and reported.  The lease row is locked while deciding.
        """
        if ttl <= timedelta(0):
            raise ValueError(f"lease ttl must be positive, got {ttl}")

        def work(cur: Cursor) -> LeaseGrant:
            # Make sure a row exists to lock, then decide on it.
            cur.execute(
                "INSERT INTO device_locks (host, run_id, holder, token, acquired_at, expires_at)"
                " VALUES (%s, '', '', 0, 'epoch', 'epoch') ON CONFLICT (host) DO NOTHING",
                (host,),
            )
            row = cur.execute(
                f"SELECT {_LEASE_COLUMNS}, expires_at > clock_timestamp() FROM device_locks"  # noqa: S608 - constant columns
                " WHERE host = %s FOR UPDATE",
                (host,),
            ).fetchone()
            assert row is not None  # noqa: S101 - inserted above, never deleted while locked
            live = bool(row[6])
            current = None if row[3] == 0 else _lease(row)
            if current is not None and current.run_id == run_id:
                renewed = cur.execute(
                    "UPDATE device_locks SET expires_at = clock_timestamp() + %s, holder = %s"  # noqa: S608 - constant columns
                    f" WHERE host = %s RETURNING {_LEASE_COLUMNS}",
                    (ttl, holder, host),
                ).fetchone()
                return LeaseGrant(lease=_lease(_must(renewed)))
            if current is not None and live:
                return LeaseGrant(held_by=current)
            interrupted = _reap(cur, [current] if current is not None else [])
            granted = cur.execute(
                "UPDATE device_locks SET run_id = %s, holder = %s,"  # noqa: S608 - constant columns
                " token = nextval('lease_tokens'), acquired_at = clock_timestamp(),"
                " expires_at = clock_timestamp() + %s"
                f" WHERE host = %s RETURNING {_LEASE_COLUMNS}",
                (run_id, holder, ttl, host),
            ).fetchone()
            return LeaseGrant(lease=_lease(_must(granted)), interrupted=tuple(interrupted))

        return self._run(f"lease {host} to run {run_id}", work)

    def renew_leases(self, leases: Sequence[Lease], ttl: timedelta) -> list[Lease]:
        """Extend the leases still current to now + ``ttl``; those missing were lost."""

        def work(cur: Cursor) -> list[Lease]:
            renewed = []
            for lease in leases:
                row = cur.execute(
                    "UPDATE device_locks SET expires_at = clock_timestamp() + %s"  # noqa: S608 - constant columns
                    f" WHERE host = %s AND token = %s RETURNING {_LEASE_COLUMNS}",
                    (ttl, lease.host, lease.token),
                ).fetchone()
                if row is not None:
                    renewed.append(_lease(row))
            return renewed

        return self._run("renew leases", work)

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up if it is still current; return whether it was."""

        def work(cur: Cursor) -> bool:
            cur.execute(
                "DELETE FROM device_locks WHERE host = %s AND token = %s", (lease.host, lease.token)
            )
            return cur.rowcount > 0

        return self._run(f"release the lease on {lease.host}", work)

    def lock_holder(self, host: str) -> Lease | None:
        """Return the live lease on ``host``, or None if it is free or expired."""

        def work(cur: Cursor) -> Lease | None:
            row = cur.execute(
                f"SELECT {_LEASE_COLUMNS} FROM device_locks"  # noqa: S608 - constant columns
                " WHERE host = %s AND token > 0 AND expires_at > clock_timestamp()",
                (host,),
            ).fetchone()
            return None if row is None else _lease(row)

        return self._run(f"read the lease of {host}", work)

    def reap_expired(self) -> list[Interruption]:
        """Remove expired leases; mark their runs, if still running, interrupted; return those."""

        def work(cur: Cursor) -> list[Interruption]:
            rows = cur.execute(
                f"SELECT {_LEASE_COLUMNS} FROM device_locks"  # noqa: S608 - constant columns
                " WHERE token > 0 AND expires_at <= clock_timestamp()"
                " ORDER BY host FOR UPDATE SKIP LOCKED",
            ).fetchall()
            return _reap(cur, [_lease(r) for r in rows])

        return self._run("reap expired leases", work)

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

        Counted and written under a lock on the runbook's row of ``admission_locks``: two
        controllers admitting runs of one runbook take turns.
        """

        def work(cur: Cursor) -> Admission:
            cur.execute(
                "INSERT INTO admission_locks (runbook) VALUES (%s) ON CONFLICT DO NOTHING",
                (runbook,),
            )
            cur.execute("SELECT 1 FROM admission_locks WHERE runbook = %s FOR UPDATE", (runbook,))
            rows = cur.execute(
                "SELECT DISTINCT a.host FROM admissions a JOIN runs r ON r.run_id = a.run_id"
                " WHERE a.runbook = %s AND a.run_id <> %s AND a.expires_at > clock_timestamp()"
                " AND r.status = %s ORDER BY a.host",
                (runbook, run_id, RunStatus.RUNNING.value),
            ).fetchall()
            others = tuple(str(r[0]) for r in rows)
            if len(set(others) | set(hosts)) > allowed:
                return Admission(admitted=False, allowed=allowed, in_flight=others)
            cur.executemany(
                "INSERT INTO admissions (runbook, run_id, host, expires_at)"
                " VALUES (%s, %s, %s, clock_timestamp() + %s)"
                " ON CONFLICT (runbook, run_id, host)"
                " DO UPDATE SET expires_at = excluded.expires_at",
                [(runbook, run_id, host, ttl) for host in hosts],
            )
            return Admission(admitted=True, allowed=allowed, in_flight=others)

        return self._run(f"admit run {run_id} of {runbook}", work)

    def renew_admission(self, run_id: str, ttl: timedelta) -> bool:
        """Extend ``run_id``'s admission to now + ``ttl``; whether it still had one."""

        def work(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE admissions SET expires_at = clock_timestamp() + %s WHERE run_id = %s",
                (ttl, run_id),
            )
            return cur.rowcount > 0

        return self._run(f"renew the admission of run {run_id}", work)

    # -- audit head

    def save_audit_head(self, seq: int, hash_: str) -> None:
        """Remember the audit log's last record (a higher ``seq`` wins)."""
        self._run(
            "save the audit head",
            lambda cur: cur.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
                " WHERE excluded.seq > audit_head.seq",
                (seq, hash_),
            ),
        )

    def audit_head(self) -> tuple[int, str] | None:
        """Return the saved audit head as (seq, hash), or None if none was saved."""

        def work(cur: Cursor) -> tuple[int, str] | None:
            row = cur.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return self._run("read the audit head", work)

    # -- approvals

    def add_approval(self, record: ApprovalRecord) -> None:
        """Store a new pending approval."""
        self._run(
            f"add approval {record.approval_id}",
            lambda cur: cur.execute(
                f"INSERT INTO approvals ({_APPROVAL_COLUMNS})"  # noqa: S608 - constant columns
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.approval_id,
                    record.runbook,
                    record.source,
                    record.requested_by,
                    _aware(record.requested_at),
                    _aware(record.expires_at),
                    record.four_eyes,
                    record.status.value,
                    record.decided_by,
                    record.decided_at,
                    record.reason,
                    json.dumps(record.plan, sort_keys=True),
                ),
            ),
        )

    def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        """One approval by id."""

        def work(cur: Cursor) -> ApprovalRecord | None:
            row = cur.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE approval_id = %s",  # noqa: S608 - constant columns
                (approval_id,),
            ).fetchone()
            return None if row is None else _approval_record(row)

        return self._run(f"read approval {approval_id}", work)

    def list_approvals(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]:
        """Approvals, newest first, optionally of one status."""
        where, params = ("WHERE status = %s", (status.value,)) if status is not None else ("", ())

        def work(cur: Cursor) -> list[ApprovalRecord]:
            rows = cur.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals {where}"  # noqa: S608 - constant columns
                " ORDER BY requested_at DESC",
                params,
            ).fetchall()
            return [_approval_record(r) for r in rows]

        return self._run("list approvals", work)

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

        ``by`` (with ``at``) records a person's decision.  The row is locked by the update:
        of two deciders at once, the second sees the first's new status and gets None.
        """

        def work(cur: Cursor) -> ApprovalRecord | None:
            if by is not None:
                row = cur.execute(
                    "UPDATE approvals SET status = %s, decided_by = %s, decided_at = %s,"  # noqa: S608 - constant columns
                    f" reason = %s WHERE approval_id = %s AND status = %s"
                    f" RETURNING {_APPROVAL_COLUMNS}",
                    (to_status.value, by, _aware(at), reason, approval_id, from_status.value),
                ).fetchone()
            else:
                row = cur.execute(
                    "UPDATE approvals SET status = %s, reason = %s"  # noqa: S608 - constant columns
                    f" WHERE approval_id = %s AND status = %s RETURNING {_APPROVAL_COLUMNS}",
                    (to_status.value, reason, approval_id, from_status.value),
                ).fetchone()
            return None if row is None else _approval_record(row)

        return self._run(f"move approval {approval_id} to {to_status.value}", work)

    # -- intake

    def record_alerts(
        self,
        firing: Sequence[FiringInput],
        resolved: Sequence[ResolvedInput],
        *,
        now: datetime,
        hold_reason: str | None,
    ) -> RecordedAlerts:
        """Record one notification's alerts in one transaction; return what changed."""
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

        ``audit`` is called with the results inside the transaction: its events are part
        of the commit (or of nothing).
        """
        _aware(now)

        def work(cur: Cursor) -> list[RecordedAlerts]:
            if any(batch.resolved for batch in notifications):  # order matters: one by one
                results = [
                    _record_batch(cur, batch.firing, batch.resolved, now, hold_reason)
                    for batch in notifications
                ]
            else:  # firings only (the common case): a few set-based statements for all
                results = _record_firings(cur, notifications, now, hold_reason)
            if audit is not None:
                audit(results)
            return results

        return self._run(f"record {len(notifications)} alert notifications", work)

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

        Candidates are locked ``FOR UPDATE SKIP LOCKED`` (another replica's claim in progress
        is skipped, never waited for); a per-host advisory lock, held to commit, then makes
        "no running item on this host" a decision only one claimer takes at a time.
        """
        _aware(now)

        def work(cur: Cursor) -> QueueClaim:
            if hold_reason is not None:
                rows = cur.execute(
                    "UPDATE alert_queue SET state = %s, reason = %s, finished_at = %s"  # noqa: S608 - constant columns
                    f" WHERE state = %s RETURNING {_QUEUE_COLUMNS}",
                    (QueueState.HELD.value, hold_reason, now, QueueState.QUEUED.value),
                ).fetchall()
                return QueueClaim(held=tuple(_queue_item(r) for r in rows))
            rows = cur.execute(
                "UPDATE alert_queue SET state = %s, reason = %s, finished_at = %s"  # noqa: S608 - constant columns
                f" WHERE state = %s AND enqueued_at < %s RETURNING {_QUEUE_COLUMNS}",
                (
                    QueueState.EXPIRED.value,
                    f"not started within the queue's max age ({max_age})",
                    now,
                    QueueState.QUEUED.value,
                    now - max_age,
                ),
            ).fetchall()
            expired = tuple(sorted((_queue_item(r) for r in rows), key=lambda i: i.item_id))
            passed: list[int] = [0]  # candidates whose host turned out busy
            for _ in range(CLAIM_CANDIDATES):
                candidate = cur.execute(
                    "SELECT item_id, host FROM alert_queue q WHERE state = %s"
                    " AND item_id <> ALL(%s) AND NOT EXISTS (SELECT 1 FROM alert_queue r"
                    " WHERE r.host = q.host AND r.state = %s)"
                    " ORDER BY item_id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    (QueueState.QUEUED.value, passed, QueueState.RUNNING.value),
                ).fetchone()
                if candidate is None:
                    break
                item_id, host = candidate
                cur.execute(
                    "SELECT pg_advisory_xact_lock("
                    "hashtextextended('remediate-queue-host:' || %s, 0))",
                    (host,),
                )
                busy = cur.execute(
                    "SELECT 1 FROM alert_queue WHERE host = %s AND state = %s LIMIT 1",
                    (host, QueueState.RUNNING.value),
                ).fetchone()
                if busy is not None:
                    passed.append(item_id)
                    continue
                claimed = cur.execute(
                    "UPDATE alert_queue SET state = %s, owner = %s, claimed_at = %s, run_id = %s"  # noqa: S608 - constant columns
                    f" WHERE item_id = %s RETURNING {_QUEUE_COLUMNS}",
                    (QueueState.RUNNING.value, owner, now, new_run_id(), item_id),
                ).fetchone()
                return QueueClaim(item=_queue_item(_must(claimed)), expired=expired)
            return QueueClaim(expired=expired)

        return self._run(f"claim a queue item for {owner}", work)

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

        def work(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE alert_queue SET state = %s, run_status = %s, reason = %s,"
                " finished_at = %s WHERE item_id = %s AND owner = %s AND state = %s",
                (
                    state.value,
                    None if run_status is None else run_status.value,
                    reason,
                    _aware(now),
                    item_id,
                    owner,
                    QueueState.RUNNING.value,
                ),
            )
            return cur.rowcount > 0

        return self._run(f"finish queue item {item_id}", work)

    def interrupt_running(
        self, *, now: datetime, reason: str, owner: str | None = None
    ) -> list[QueueItem]:
        """Mark running items (of ``owner``, or all) interrupted, and their runs; free leases."""
        where, params = "state = %s", [QueueState.RUNNING.value]
        if owner is not None:
            where, params = "state = %s AND owner = %s", [QueueState.RUNNING.value, owner]

        def work(cur: Cursor) -> list[QueueItem]:
            rows = cur.execute(
                "UPDATE alert_queue SET state = %s, run_status = %s, reason = %s,"  # noqa: S608 - constant columns
                f" finished_at = %s WHERE {where} RETURNING {_QUEUE_COLUMNS}",
                (
                    QueueState.INTERRUPTED.value,
                    RunStatus.INTERRUPTED.value,
                    reason,
                    _aware(now),
                    *params,
                ),
            ).fetchall()
            items = sorted((_queue_item(r) for r in rows), key=lambda i: i.item_id)
            for item in items:
                if item.run_id is None:
                    continue
                cur.execute(
                    "UPDATE runs SET status = %s, finished_at = %s WHERE run_id = %s"
                    " AND status = %s",
                    (RunStatus.INTERRUPTED.value, now, item.run_id, RunStatus.RUNNING.value),
                )
                cur.execute("DELETE FROM device_locks WHERE run_id = %s", (item.run_id,))
                cur.execute("DELETE FROM admissions WHERE run_id = %s", (item.run_id,))
            return items

        return self._run("interrupt running queue items", work)

    def heartbeat(self, owner: str, ttl: timedelta) -> None:
        """Say that controller ``owner`` is alive until the database's now + ``ttl``."""
        self._run(
            f"heartbeat of {owner}",
            lambda cur: cur.execute(
                "INSERT INTO controllers (owner, expires_at) VALUES (%s, clock_timestamp() + %s)"
                " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                (owner, ttl),
            ),
        )

    def interrupt_orphans(self, *, now: datetime) -> list[QueueItem]:
        """Mark running items (and runs) of controllers whose heartbeat expired interrupted."""

        def dead(cur: Cursor) -> list[str]:
            rows = cur.execute(
                "DELETE FROM controllers WHERE expires_at <= clock_timestamp() RETURNING owner"
            ).fetchall()
            return [str(r[0]) for r in rows]

        items: list[QueueItem] = []
        for owner in self._run("find stopped controllers", dead):
            items += self.interrupt_running(
                now=now,
                reason=f"its server {owner} stopped (no heartbeat since its expiry)",
                owner=owner,
            )
        return items

    def get_queue_item(self, item_id: int) -> QueueItem | None:
        """Return one queue item, or None."""

        def work(cur: Cursor) -> QueueItem | None:
            row = cur.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM alert_queue WHERE item_id = %s",  # noqa: S608 - constant columns
                (item_id,),
            ).fetchone()
            return None if row is None else _queue_item(row)

        return self._run(f"read queue item {item_id}", work)

    def list_queue(self, state: QueueState | None = None, limit: int = 100) -> list[QueueItem]:
        """Return queue items, newest first, optionally in one state only."""
        where, params = ("WHERE state = %s", (state.value,)) if state is not None else ("", ())

        def work(cur: Cursor) -> list[QueueItem]:
            rows = cur.execute(
                f"SELECT {_QUEUE_COLUMNS} FROM alert_queue {where}"  # noqa: S608 - constant columns
                " ORDER BY item_id DESC LIMIT %s",
                (*params, limit),
            ).fetchall()
            return [_queue_item(r) for r in rows]

        return self._run("list the queue", work)

    def item_firings(self, item_ids: Sequence[int]) -> list[ItemFiring]:
        """The firings the items run for: each item's own first, then those that joined it."""
        if not item_ids:
            return []

        def work(cur: Cursor) -> list[ItemFiring]:
            rows = cur.execute(
                "SELECT l.item_id, l.fingerprint, l.starts_at, f.alertname, f.status"
                " FROM queue_firings l JOIN alert_queue q ON q.item_id = l.item_id"
                " JOIN alert_firings f"
                " ON f.starts_at = l.starts_at AND f.fingerprint = l.fingerprint"
                " WHERE l.item_id = ANY(%s) ORDER BY l.item_id,"
                " (l.fingerprint = q.fingerprint AND l.starts_at = q.starts_at) DESC,"
                " f.received_at, l.starts_at, l.fingerprint",
                (list(item_ids),),
            ).fetchall()
            return [
                ItemFiring(
                    item_id=int(r[0]), fingerprint=r[1], starts_at=r[2], alertname=r[3], status=r[4]
                )
                for r in rows
            ]

        return self._run("list the firings of queue items", work)

    def list_firings(
        self, outcome: FiringOutcome | None = None, limit: int = 100
    ) -> list[FiringRecord]:
        """Return firings, most recently received first, optionally of one outcome only."""
        where, params = (
            ("WHERE outcome = %s", (outcome.value,)) if outcome is not None else ("", ())
        )

        def work(cur: Cursor) -> list[FiringRecord]:
            rows = cur.execute(
                f"SELECT {_FIRING_COLUMNS} FROM alert_firings {where}"  # noqa: S608 - constant columns
                " ORDER BY received_at DESC, fingerprint LIMIT %s",
                (*params, limit),
            ).fetchall()
            return [_firing_record(r) for r in rows]

        return self._run("list alert firings", work)

    def queue_counts(self) -> dict[QueueState, int]:
        """Return the number of queue items in each state (0 for states with none)."""

        def work(cur: Cursor) -> dict[QueueState, int]:
            rows = cur.execute("SELECT state, count(*) FROM alert_queue GROUP BY state").fetchall()
            counts = dict.fromkeys(QueueState, 0)
            counts.update({QueueState(r[0]): int(r[1]) for r in rows})
            return counts

        return self._run("count the queue", work)

    def firing_counts(self) -> dict[FiringOutcome, int]:
        """Return the number of firings with each outcome (0 for outcomes with none)."""

        def work(cur: Cursor) -> dict[FiringOutcome, int]:
            rows = cur.execute(
                "SELECT outcome, count(*) FROM alert_firings GROUP BY outcome"
            ).fetchall()
            counts = dict.fromkeys(FiringOutcome, 0)
            counts.update({FiringOutcome(r[0]): int(r[1]) for r in rows})
            return counts

        return self._run("count alert firings", work)

    def count_failed_items(self, since: datetime) -> int:
        """Count alert-triggered runs that finished unsuccessfully since ``since``."""

        def work(cur: Cursor) -> int:
            row = cur.execute(
                "SELECT count(*) FROM alert_queue WHERE finished_at >= %s"
                " AND (state = %s OR (state = %s AND run_status <> %s))",
                (
                    _aware(since),
                    QueueState.FAILED.value,
                    QueueState.DONE.value,
                    RunStatus.SUCCEEDED.value,
                ),
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run("count failed alert runs", work)

    def count_alerting_devices(self, since: datetime, *, stop_at: int) -> int:
        """Count distinct hosts with a still-firing alert queued since ``since`` (≤ ``stop_at``)."""

        def work(cur: Cursor) -> int:
            row = cur.execute(
                "SELECT count(*) FROM (SELECT DISTINCT q.host FROM alert_queue q"
                " JOIN queue_firings l ON l.item_id = q.item_id JOIN alert_firings f"
                " ON f.starts_at = l.starts_at AND f.fingerprint = l.fingerprint"
                " WHERE q.enqueued_at >= %s AND f.status = 'firing' LIMIT %s) AS hosts",
                (_aware(since), stop_at),
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run("count alerting devices", work)

    def latest_queued_per_host(self, after_item: int) -> tuple[int, dict[str, datetime]]:
        """The last queue item id, and per host when items after ``after_item`` were queued last.

        Identity values are handed out before commit, so an item with a lower id may commit
        after a higher one was read: the bound is taken below the oldest id still being
        written only in the sense that a caller re-reads from ``after_item`` onwards.
        """

        def work(cur: Cursor) -> tuple[int, dict[str, datetime]]:
            (last,) = cur.execute(
                "SELECT coalesce(max(item_id), %s) FROM alert_queue", (after_item,)
            ).fetchone() or (after_item,)
            rows = cur.execute(
                "SELECT host, max(enqueued_at) FROM alert_queue"
                " WHERE item_id > %s AND item_id <= %s GROUP BY host",
                (after_item, last),
            ).fetchall()
            return int(last), {str(host): at for host, at in rows}

        return self._run("read recently queued hosts", work)

    # -- the circuit breaker

    def breaker_state(self) -> BreakerRecord | None:
        """Return the saved circuit breaker, or None when never saved."""

        def work(cur: Cursor) -> BreakerRecord | None:
            row = cur.execute(
                "SELECT open, reason, opened_at, reset_at FROM alert_breaker WHERE id = 1"
            ).fetchone()
            if row is None:
                return None
            return BreakerRecord(open=row[0], reason=row[1], opened_at=row[2], reset_at=row[3])

        return self._run("read the circuit breaker", work)

    def save_breaker(self, record: BreakerRecord) -> None:
        """Save the circuit breaker (shared by every replica)."""
        self._run(
            "save the circuit breaker",
            lambda cur: cur.execute(
                "INSERT INTO alert_breaker (id, open, reason, opened_at, reset_at)"
                " VALUES (1, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET open = excluded.open,"
                " reason = excluded.reason, opened_at = excluded.opened_at,"
                " reset_at = excluded.reset_at",
                (record.open, record.reason, record.opened_at, record.reset_at),
            ),
        )


# --------------------------------------------------------------------------- rows


def _append_chain(cur: Cursor, events: Sequence[Mapping[str, str]]) -> list[AuditHead]:
    """Seal ``events`` after the chain's head (locked to commit) and insert them."""
    seq, prev = _must(cur.execute("SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE"))
    heads: list[AuditHead] = []
    rows: list[tuple[int, str]] = []
    for members in events:
        seq += 1
        line, prev = seal_record(members, seq, prev)
        rows.append((seq, line))
        heads.append(AuditHead(seq=seq, hash=prev))
    cur.executemany("INSERT INTO audit_chain (seq, record) VALUES (%s, %s)", rows)
    cur.execute("UPDATE audit_chain_head SET seq = %s, hash = %s WHERE id = 1", (seq, prev))
    return heads


def _must(found: Any) -> Sequence[Any]:
    """The row a statement returned (``fetchone()`` or a cursor) that always returns one."""
    row = found.fetchone() if isinstance(found, psycopg.Cursor) else found
    if row is None:
        raise StateError("internal: a statement that returns a row returned none")
    return tuple(row)


def _run_record(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        runbook=row[1],
        runbook_digest=row[2],
        mode=Mode(row[3]),
        trigger=row[4],
        started_at=row[5],
        finished_at=row[6],
        status=RunStatus(row[7]),
        summary=json.loads(row[8]),
    )


def _lease(row: Sequence[Any]) -> Lease:
    return Lease(
        host=row[0],
        run_id=row[1],
        holder=row[2],
        token=int(row[3]),
        acquired_at=row[4],
        expires_at=row[5],
    )


def _approval_record(row: Sequence[Any]) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id=row[0],
        runbook=row[1],
        source=row[2],
        requested_by=row[3],
        requested_at=row[4],
        expires_at=row[5],
        four_eyes=bool(row[6]),
        status=ApprovalStatus(row[7]),
        decided_by=row[8],
        decided_at=row[9],
        reason=row[10],
        plan=json.loads(row[11]),
    )


def _queue_item(row: Sequence[Any]) -> QueueItem:
    return QueueItem(
        item_id=int(row[0]),
        fingerprint=row[1],
        starts_at=row[2],
        runbook=row[3],
        host=row[4],
        trigger_mode=row[5],
        mode=Mode(row[6]),
        state=QueueState(row[7]),
        reason=row[8],
        enqueued_at=row[9],
        claimed_at=row[10],
        finished_at=row[11],
        owner=row[12],
        run_id=row[13],
        run_status=None if row[14] is None else RunStatus(row[14]),
    )


def _firing_record(row: Sequence[Any]) -> FiringRecord:
    return FiringRecord(
        fingerprint=row[0],
        starts_at=row[1],
        alertname=row[2],
        labels=json.loads(row[3]),
        status=row[4],
        outcome=FiringOutcome(row[5]),
        reason=row[6],
        received_at=row[7],
        last_seen_at=row[8],
        times_seen=int(row[9]),
        resolved_at=row[10],
    )


def _fence_holds(cur: Cursor, lease: Lease) -> bool:
    """Whether ``lease`` is still its device's current lease, and its run still running.

    The lease row is locked (``FOR SHARE``) until the writer's commit, so the lease cannot
    pass on between the check and the write.
    """
    row = cur.execute(
        "SELECT 1 FROM device_locks l JOIN runs r ON r.run_id = l.run_id"
        " WHERE l.host = %s AND l.token = %s AND r.status = %s FOR SHARE OF l",
        (lease.host, lease.token, RunStatus.RUNNING.value),
    ).fetchone()
    return row is not None


def _reap(cur: Cursor, expired: Sequence[Lease]) -> list[Interruption]:
    """Free ``expired`` leases; mark their runs (and queue items) interrupted if running."""
    found: list[Interruption] = []
    for lease in expired:
        cur.execute(
            "UPDATE device_locks SET run_id = '', holder = '', token = 0"
            " WHERE host = %s AND token = %s",
            (lease.host, lease.token),
        )
        reason = lease_expired_reason(lease)
        # A run spread over workers (dist_runs) goes on: its coordinator marks the shard's
        # hosts interrupted once the task engine finds the worker stalled.
        run = cur.execute(
            "UPDATE runs SET status = %s, finished_at = clock_timestamp()"
            " WHERE run_id = %s AND status = %s AND NOT EXISTS"
            " (SELECT 1 FROM dist_runs d WHERE d.run_id = runs.run_id)"
            " RETURNING runbook, trigger",
            (RunStatus.INTERRUPTED.value, lease.run_id, RunStatus.RUNNING.value),
        ).fetchone()
        if run is None:
            continue
        item = cur.execute(
            "UPDATE alert_queue SET state = %s, run_status = %s, reason = %s,"
            " finished_at = clock_timestamp() WHERE run_id = %s AND state = %s RETURNING item_id",
            (
                QueueState.INTERRUPTED.value,
                RunStatus.INTERRUPTED.value,
                reason,
                lease.run_id,
                QueueState.RUNNING.value,
            ),
        ).fetchone()
        cur.execute("DELETE FROM admissions WHERE run_id = %s", (lease.run_id,))
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


#: Queue the runs of routes (one row per runbook, device and trigger mode given), or find
#: the run of each queued or running already (the partial unique index
#: ``alert_queue_one_active``): that row is locked to commit, so it can neither start nor be
#: cancelled while the firing joins it.  A held item is not in that index: always inserted.
_QUEUE_ROUTES = (
    "INSERT INTO alert_queue (fingerprint, starts_at, runbook, host, trigger_mode, mode,"
    " state, reason, enqueued_at) SELECT f, s, rb, h, tm, m, %s, %s, %s FROM unnest("
    "%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[])"
    " AS t (f, s, rb, h, tm, m)"
    " ON CONFLICT (runbook, host, trigger_mode) WHERE state IN ('queued', 'running')"
    " DO UPDATE SET state = alert_queue.state"
    " RETURNING item_id, state, fingerprint, starts_at, runbook, host, trigger_mode"
)

_RouteKey = tuple[datetime, str, str]  # a firing's (starts_at, fingerprint) and a runbook


def _queue_routes(
    cur: Cursor,
    routes: Sequence[tuple[FiringInput, QueueRoute]],
    now: datetime,
    hold_reason: str | None,
) -> tuple[dict[_RouteKey, QueueItem], dict[_RouteKey, JoinedItem]]:
    """Queue the runs new firings route to, in order; return those queued and those joined.

    The first route of a runbook, device and trigger mode queues its run, unless one is
    queued or running (then it joins that); later ones join it.  With ``hold_reason`` every
    route is queued ``held`` (a held run is never joined).  Every firing is linked to its
    item, and a firing that joined on every route is recorded ``coalesced``.
    """
    if not routes:
        return {}, {}
    state = QueueState.HELD if hold_reason is not None else QueueState.QUEUED
    if hold_reason is not None:
        proposed = list(routes)
    else:
        first: dict[tuple[str, str, str], tuple[FiringInput, QueueRoute]] = {}
        for alert, route in routes:
            first.setdefault((route.runbook, route.host, route.trigger_mode), (alert, route))
        # In the order the firings came (item ids are the order runs are claimed in).  Two
        # replicas queueing two or more of the same runs in opposite orders at once would
        # deadlock: the database tells one of them (after its deadlock_timeout, 1 s by
        # default) and that transaction is run again.
        proposed = list(first.values())
    rows = cur.execute(
        _QUEUE_ROUTES,
        (
            state.value,
            hold_reason or "",
            now,
            [a.fingerprint for a, _ in proposed],
            [a.starts_at for a, _ in proposed],
            [r.runbook for _, r in proposed],
            [r.host for _, r in proposed],
            [r.trigger_mode for _, r in proposed],
            [r.mode.value for _, r in proposed],
        ),
    ).fetchall()
    own = {(r[3], r[2], r[4]): r for r in rows}  # by the firing that queued it, and runbook
    active = {(r[4], r[5], r[6]): r for r in rows}  # by runbook, device and mode
    queued: dict[_RouteKey, QueueItem] = {}
    joined: dict[_RouteKey, JoinedItem] = {}
    links: list[tuple[int, str, datetime]] = []
    for alert, route in routes:
        key = (alert.starts_at, alert.fingerprint, route.runbook)
        row = own.get(key) if hold_reason is not None else None
        if row is None:
            row = active[(route.runbook, route.host, route.trigger_mode)]
        item_id = int(row[0])
        links.append((item_id, alert.fingerprint, alert.starts_at))
        if (row[2], row[3]) != (alert.fingerprint, alert.starts_at):
            joined[key] = JoinedItem(
                fingerprint=alert.fingerprint,
                starts_at=alert.starts_at,
                item_id=item_id,
                state=QueueState(row[1]),
                runbook=route.runbook,
                host=route.host,
            )
            continue
        queued[key] = QueueItem(
            item_id=item_id,
            fingerprint=alert.fingerprint,
            starts_at=alert.starts_at,
            runbook=route.runbook,
            host=route.host,
            trigger_mode=route.trigger_mode,
            mode=route.mode,
            state=state,
            reason=hold_reason or "",
            enqueued_at=now,
        )
    cur.execute(
        "INSERT INTO queue_firings (item_id, fingerprint, starts_at)"
        " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[])",
        ([i for i, _, _ in links], [f for _, f, _ in links], [s for _, _, s in links]),
    )
    _mark_coalesced(cur, routes, joined)
    return queued, joined


def _mark_coalesced(
    cur: Cursor,
    routes: Sequence[tuple[FiringInput, QueueRoute]],
    joined: Mapping[_RouteKey, JoinedItem],
) -> None:
    """Record ``coalesced`` (naming the runs joined) the firings that joined on every route."""
    by_firing: dict[tuple[datetime, str], list[JoinedItem]] = {}
    whole: dict[tuple[datetime, str], bool] = {}
    for alert, route in routes:
        firing = (alert.starts_at, alert.fingerprint)
        found = joined.get((*firing, route.runbook))
        whole[firing] = whole.get(firing, True) and found is not None
        if found is not None:
            by_firing.setdefault(firing, []).append(found)
    coalesced = [(firing, items) for firing, items in by_firing.items() if whole[firing]]
    if not coalesced:
        return
    cur.execute(
        "UPDATE alert_firings SET outcome = %s, reason = t.r FROM unnest("
        "%s::timestamptz[], %s::text[], %s::text[]) AS t (s, f, r)"
        " WHERE starts_at = t.s AND fingerprint = t.f",
        (
            FiringOutcome.COALESCED.value,
            [s for (s, _), _ in coalesced],
            [f for (_, f), _ in coalesced],
            [joined_reason(items) for _, items in coalesced],
        ),
    )


def _record_firings(
    cur: Cursor, notifications: Sequence[AlertBatch], now: datetime, hold_reason: str | None
) -> list[RecordedAlerts]:
    """Notifications of firing alerts only, recorded with a few set-based statements.

    The same as recording them one by one (:func:`_record_batch`): the first copy of a
    firing in the group decides it (new, or seen before), every other copy is a duplicate.
    """
    first: dict[tuple[datetime, str], FiringInput] = {}
    copies: dict[tuple[datetime, str], int] = {}
    for batch in notifications:
        for alert in batch.firing:
            key = (alert.starts_at, alert.fingerprint)
            first.setdefault(key, alert)
            copies[key] = copies.get(key, 0) + 1
    inserted: set[tuple[datetime, str]] = set()
    if first:
        columns: list[list[Any]] = [[], [], [], [], [], [], []]
        # In key order: replicas upserting overlapping firings lock their rows in one order.
        for key, alert in sorted(first.items(), key=lambda item: item[0]):
            outcome, reason = alert.outcome, alert.reason
            if hold_reason is not None and alert.routes:
                outcome, reason = FiringOutcome.HELD, hold_reason
            values = (
                alert.fingerprint,
                alert.starts_at,
                alert.alertname,
                _labels_json(alert.labels),
                outcome.value,
                reason,
                copies[key],
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        rows = cur.execute(
            "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels, status,"
            " outcome, reason, received_at, last_seen_at, times_seen)"
            " SELECT f, s, a, l, 'firing', o, r, %s, %s, c FROM unnest("
            "%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::int[]) AS t (f, s, a, l, o, r, c)"
            " ON CONFLICT (starts_at, fingerprint) DO UPDATE"
            " SET last_seen_at = excluded.last_seen_at,"
            " times_seen = alert_firings.times_seen + excluded.times_seen"
            " RETURNING starts_at, fingerprint, xmax = 0",
            (now, now, *columns),
        ).fetchall()
        inserted = {(r[0], r[1]) for r in rows if r[2]}
    # In notification order: the first firing of a runbook, device and mode queues the run.
    routes = [
        (alert, route) for key, alert in first.items() if key in inserted for route in alert.routes
    ]
    queued_items, joined_items = _queue_routes(cur, routes, now, hold_reason)
    results: list[RecordedAlerts] = []
    decided: set[tuple[datetime, str]] = set()
    for batch in notifications:
        new: list[FiringKey] = []
        dups: list[FiringKey] = []
        queued: list[QueueItem] = []
        coalesced: list[JoinedItem] = []
        for alert in batch.firing:
            key = (alert.starts_at, alert.fingerprint)
            firing_key = FiringKey(fingerprint=alert.fingerprint, starts_at=alert.starts_at)
            if key not in inserted or key in decided:
                dups.append(firing_key)
                continue
            decided.add(key)
            new.append(firing_key)
            for route in alert.routes:
                route_key = (*key, route.runbook)
                if route_key in queued_items:
                    queued.append(queued_items[route_key])
                else:
                    coalesced.append(joined_items[route_key])
        queued.sort(key=lambda item: item.item_id)
        held = hold_reason is not None
        results.append(
            RecordedAlerts(
                new=tuple(new),
                deduplicated=tuple(dups),
                queued=() if held else tuple(queued),
                held=tuple(queued) if held else (),
                coalesced=tuple(coalesced),
            )
        )
    return results


def _record_batch(
    cur: Cursor,
    firing: Sequence[FiringInput],
    resolved: Sequence[ResolvedInput],
    now: datetime,
    hold_reason: str | None,
) -> RecordedAlerts:
    """One notification's inserts and updates, inside the caller's transaction."""
    new: list[FiringKey] = []
    dups: list[FiringKey] = []
    done: list[FiringKey] = []
    cancelled: list[QueueItem] = []
    fresh: list[FiringInput] = []
    for alert in firing:
        key = FiringKey(fingerprint=alert.fingerprint, starts_at=alert.starts_at)
        outcome, reason = alert.outcome, alert.reason
        if hold_reason is not None and alert.routes:
            outcome, reason = FiringOutcome.HELD, hold_reason
        (seen,) = cur.execute(
            "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels,"
            " status, outcome, reason, received_at, last_seen_at, times_seen)"
            " VALUES (%s, %s, %s, %s, 'firing', %s, %s, %s, %s, 1)"
            " ON CONFLICT (starts_at, fingerprint) DO UPDATE"
            " SET last_seen_at = excluded.last_seen_at,"
            " times_seen = alert_firings.times_seen + 1"
            " RETURNING times_seen",
            (
                alert.fingerprint,
                alert.starts_at,
                alert.alertname,
                _labels_json(alert.labels),
                outcome.value,
                reason,
                now,
                now,
            ),
        ).fetchone() or (0,)
        if seen > 1:
            dups.append(key)
            continue
        new.append(key)
        fresh.append(alert)
    routes = [(alert, route) for alert in fresh for route in alert.routes]
    queued_items, joined_items = _queue_routes(cur, routes, now, hold_reason)
    queued = sorted(queued_items.values(), key=lambda item: item.item_id)
    coalesced = [
        joined_items[key]
        for key in ((a.starts_at, a.fingerprint, r.runbook) for a, r in routes)
        if key in joined_items
    ]
    for gone in resolved:
        key = FiringKey(fingerprint=gone.fingerprint, starts_at=gone.starts_at)
        params = (gone.starts_at, gone.fingerprint)
        row = cur.execute(
            "SELECT status FROM alert_firings WHERE starts_at = %s AND fingerprint = %s FOR UPDATE",
            params,
        ).fetchone()
        if row is not None and row[0] == "resolved":
            cur.execute(
                "UPDATE alert_firings SET last_seen_at = %s, times_seen = times_seen + 1"
                " WHERE starts_at = %s AND fingerprint = %s",
                (now, *params),
            )
            dups.append(key)
            continue
        if row is None:
            inserted = cur.execute(
                "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels,"
                " status, outcome, reason, received_at, last_seen_at, times_seen,"
                " resolved_at) VALUES (%s, %s, %s, %s, 'resolved', %s, %s, %s, %s, 1, %s)"
                " ON CONFLICT (starts_at, fingerprint) DO NOTHING RETURNING 1",
                (
                    gone.fingerprint,
                    gone.starts_at,
                    gone.alertname,
                    _labels_json(gone.labels),
                    FiringOutcome.RESOLVED.value,
                    "resolved before any firing notification was received",
                    now,
                    now,
                    now,
                ),
            ).fetchone()
            if inserted is None:  # another replica recorded it meanwhile
                dups.append(key)
            else:
                done.append(key)
            continue
        done.append(key)
        cur.execute(
            "UPDATE alert_firings SET status = 'resolved', resolved_at = %s,"
            " last_seen_at = %s, times_seen = times_seen + 1"
            " WHERE starts_at = %s AND fingerprint = %s",
            (now, now, *params),
        )
        cancelled += _cancel_resolved(cur, params, now)
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


def _cancel_resolved(cur: Cursor, firing: tuple[datetime, str], now: datetime) -> list[QueueItem]:
    """Cancel the queued runs of a firing just resolved that no firing still firing wants.

    The items are locked first, then checked by a statement of their own (a fresh snapshot):
    two replicas resolving an item's last two firings at once take turns, and the second sees
    the first's resolution; a firing joining an item locks it too.
    """
    ids = [
        int(r[0])
        for r in cur.execute(
            "SELECT item_id FROM alert_queue WHERE state = %s AND item_id IN (SELECT item_id"
            " FROM queue_firings WHERE starts_at = %s AND fingerprint = %s)"
            " ORDER BY item_id FOR UPDATE",
            (QueueState.QUEUED.value, *firing),
        ).fetchall()
    ]
    if not ids:
        return []
    rows = cur.execute(
        "UPDATE alert_queue SET state = %s, reason = %s, finished_at = %s"  # noqa: S608 - constant columns
        " WHERE item_id = ANY(%s) AND state = %s AND NOT EXISTS (SELECT 1"
        " FROM queue_firings l JOIN alert_firings f"
        " ON f.starts_at = l.starts_at AND f.fingerprint = l.fingerprint"
        " WHERE l.item_id = alert_queue.item_id AND f.status = 'firing')"
        f" RETURNING {_QUEUE_COLUMNS}",
        (QueueState.CANCELLED.value, CANCELLED_REASON, now, ids, QueueState.QUEUED.value),
    ).fetchall()
    return sorted((_queue_item(r) for r in rows), key=lambda i: i.item_id)
