"""What the engine needs from a state store, whichever backend keeps it.

:class:`StateStore` is the pipeline's part (runs, host outcomes, cool-downs, device leases,
approvals); :class:`AlertStore` adds the webhook server's (firings, the run queue, the
breaker).  A :class:`StateDatabase` is one backend's database, opened once per process by
:func:`engine.state.open_database`; it hands out stores (one per thread that writes) and
says what it is.  Every backend passes one contract test suite (``tests/test_state.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol, Self

from engine.audit import AuditSink
from engine.outcomes import RunStatus
from engine.server.queue import (
    AlertBatch,
    BreakerRecord,
    FiringInput,
    FiringOutcome,
    FiringRecord,
    ItemFiring,
    QueueClaim,
    QueueItem,
    QueueState,
    RecordedAlerts,
    ResolvedInput,
)
from engine.state.board import RunBoard
from engine.state.records import (
    Admission,
    ApprovalRecord,
    ApprovalStatus,
    HostRecord,
    Interruption,
    Lease,
    LeaseGrant,
    RunRecord,
)


class StateStore(Protocol):
    """What the engine needs from a state store, whichever backend keeps it.

    Writes that report on a device (``record_host``, ``mark_acted``) may carry the
    :class:`Lease` the writer holds on it: they are then fenced, written only while that
    lease is still the device's current one and its run still running.
    """

    def start_run(self, record: RunRecord) -> None:
        """Record a new run; its ``run_id`` must be unused."""

    def finish_run(self, run_id: str, status: RunStatus, summary: Mapping[str, int]) -> RunRecord:
        """Set a run's final status and counts, and end its admission; return the run.

        A run already finished (e.g. marked interrupted when its leases expired) keeps that
        status: the stored run is returned unchanged.
        """

    def record_host(self, record: HostRecord, *, lease: Lease | None = None) -> bool:
        """Record (or replace) one host's outcome in a started run; whether it was written."""

    def record_hosts(self, records: Sequence[HostRecord]) -> None:
        """Record (or replace) hosts' outcomes in started runs, unfenced, all or none.

        One transaction (one commit) for a run's hosts, not one each.
        """

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
        """Return the most recent runs first, optionally only those matching every filter.

        ``host``: runs that recorded an outcome for it; ``since``: started then or later;
        ``id_suffix``: whose id ends so (a short run id).
        """

    def get_run(self, run_id: str) -> RunRecord | None:
        """Return one run, or None if no run has that id."""

    def host_records(self, run_id: str) -> list[HostRecord]:
        """Return the host outcomes of a run, ordered by host."""

    def last_acted(self, runbook: str, host: str) -> datetime | None:
        """Return when ``runbook`` last acted on ``host`` (for cool-downs), or None."""

    def mark_acted(
        self, runbook: str, host: str, at: datetime, *, lease: Lease | None = None
    ) -> bool:
        """Remember that ``runbook`` acted on ``host`` at ``at`` (a later time wins)."""

    def acquire_lease(self, host: str, run_id: str, *, holder: str, ttl: timedelta) -> LeaseGrant:
        """Lease ``host`` to ``run_id`` until the database's now + ``ttl``, with a new token.

        Granted when the device is free, its lease expired, or ``run_id`` holds it already
        (then extended, same token).  An expired lease of a run still running is reaped on
        the way: that run is marked interrupted (and reported in the grant), never silently
        taken over.
        """

    def renew_leases(self, leases: Sequence[Lease], ttl: timedelta) -> list[Lease]:
        """Extend the leases still current to now + ``ttl``; those missing were lost."""

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up if it is still current; return whether it was."""

    def lock_holder(self, host: str) -> Lease | None:
        """Return the live lease on ``host``, or None if it is free or expired."""

    def reap_expired(self) -> list[Interruption]:
        """Remove expired leases; mark their runs, if still running, interrupted; return those."""

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

        One transaction under a row lock per runbook: the distinct hosts other running runs
        of ``runbook`` hold admissions for, with ``hosts``, must not be more than
        ``allowed``.  All or nothing; an admission lasts ``ttl`` unless renewed, and ends
        with its run.
        """

    def renew_admission(self, run_id: str, ttl: timedelta) -> bool:
        """Extend ``run_id``'s admission to now + ``ttl``; whether it still had one."""

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

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


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
        """Record one notification's alerts and queue new firings' runs, in one transaction.

        A new firing whose runbook has a run queued or running on the device, in the same
        trigger mode, joins that run instead (at most one such run exists: the database
        enforces it, across processes); a resolved firing cancels a queued run only when no
        other firing it runs for is still firing.  A running run is never cut short.
        """

    def record_notifications(
        self,
        notifications: Sequence[AlertBatch],
        *,
        now: datetime,
        hold_reason: str | None,
        audit: Callable[[list[RecordedAlerts]], None] | None = None,
    ) -> list[RecordedAlerts]:
        """Record several notifications in one transaction (group commit); one result each.

        ``audit(results)`` runs once they are final: inside the transaction when the backend
        keeps the audit chain (its events commit with the records, or not at all), right
        after the commit otherwise.
        """

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

    def heartbeat(self, owner: str, ttl: timedelta) -> None:
        """Say that controller ``owner`` is alive until the database's now + ``ttl``."""

    def interrupt_orphans(self, *, now: datetime) -> list[QueueItem]:
        """Mark running items (and runs) of controllers whose heartbeat expired interrupted."""

    def get_queue_item(self, item_id: int) -> QueueItem | None:
        """Return one queue item, or None."""

    def list_queue(self, state: QueueState | None = None, limit: int = 100) -> list[QueueItem]:
        """Return queue items, newest first, optionally in one state only."""

    def item_firings(self, item_ids: Sequence[int]) -> list[ItemFiring]:
        """The firings the items run for: each item's own first, then those that joined it."""

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

    def breaker_state(self) -> BreakerRecord | None:
        """Return the saved circuit breaker, or None when never saved."""

    def save_breaker(self, record: BreakerRecord) -> None:
        """Save the circuit breaker."""


class StateDatabase(Protocol):
    """One backend's database, opened once per process; it hands out stores.

    ``single_server``: only one ``remediate serve`` may use it at a time (SQLite: the server
    takes a lock file next to it, and at start-up marks every run left running as
    interrupted); otherwise replicas may share it, and a run is marked interrupted only once
    its controller stopped renewing its leases.
    """

    url: str  #: where it is, without a password
    single_server: bool

    def store(self, *, intake: bool = False) -> AlertStore:
        """A store for one thread (``intake``: it records many small notifications)."""

    def ping(self) -> None:
        """Reach the database now; raise :class:`~engine.errors.StateError` when it cannot."""

    def audit_log(self) -> AuditSink | None:
        """The audit chain this database keeps, or None (the entry point keeps a file)."""

    def run_board(self) -> RunBoard:
        """Where distributed runs keep their hosts and shards (PostgreSQL only).

        Raises :class:`~engine.errors.ConfigError` for a backend that keeps none.
        """

    def migrate(self) -> int:
        """Apply the migrations the database lacks (one transaction); return its version."""

    def grant(self, role: str) -> None:
        """Give ``role`` what the engine needs at run time, and no more (no DDL)."""

    def close(self) -> None:
        """Release the database's resources (stores handed out are closed by their users)."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
