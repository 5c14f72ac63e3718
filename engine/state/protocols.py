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
from typing import Protocol, Self

from engine.outcomes import RunStatus
from engine.server.queue import (
    AlertBatch,
    BreakerRecord,
    FiringInput,
    FiringOutcome,
    FiringRecord,
    QueueClaim,
    QueueItem,
    QueueState,
    RecordedAlerts,
    ResolvedInput,
)
from engine.state.records import ApprovalRecord, ApprovalStatus, HostRecord, LockRecord, RunRecord


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

    def close(self) -> None:
        """Release the database's resources (stores handed out are closed by their users)."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
