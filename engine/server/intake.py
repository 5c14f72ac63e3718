"""Intake: one webhook notification → routed, durably recorded, counted and audited.

The store commit comes first (the HTTP answer depends on it); then one audit event,
``alert.received``, lists each notification committed together and every alert in it with
its ``outcome`` (``queued``, ``held``, ``unmatched``, ``unresolved``, ``resolved`` or
``deduplicated``), the labels of new ones, the runs each queued, held or cancelled (item,
runbook, host, modes) and the reason when a route found no host or the breaker held them.

(An event per alert, or per kind of outcome, would cost an append and an fsync each.)
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from engine.errors import AuditError, StateError
from engine.server.alerts import WebhookMessage
from engine.server.breaker import CircuitBreaker
from engine.server.fleet import Fleet, FleetWatcher
from engine.server.metrics import ServerMetrics
from engine.server.queue import (
    AlertBatch,
    FiringInput,
    FiringOutcome,
    QueueItem,
    RecordedAlerts,
    ResolvedInput,
)
from engine.server.routing import Router
from engine.state import AlertStore

_UNROUTED = (FiringOutcome.UNMATCHED, FiringOutcome.UNRESOLVED)


def _iso(moment: datetime) -> str:
    """``moment`` as the audit log writes datetimes (UTC ISO-8601), done once per alert."""
    return moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class _Pending:
    """One notification waiting for a group commit, and where its answer goes."""

    message: WebhookMessage
    answer: Future[RecordedAlerts]


#: Most notifications one group commit takes.
MAX_GROUP = 64


class Intake:
    """Records notifications; safe to use from many threads and event loops at once.

    One committer thread records whatever is waiting when it is free (group commit: one
    SQLite transaction and one set of audit events for all of them), so that concurrent
    notifications share a commit and its fsyncs, and each answer is set once its
    notification is committed and audited.  The thread starts with the first notification
    and ends on :meth:`close`.
    """

    def __init__(
        self,
        store: AlertStore,
        router: Router,
        fleet: FleetWatcher,
        breaker: CircuitBreaker,
        metrics: ServerMetrics,
        *,
        clock: Callable[[], datetime],
        on_queued: Callable[[], None] = lambda: None,
        on_answered: Callable[[int], None] = lambda _notifications: None,
    ) -> None:
        self._store = store
        self._router = router
        self._fleet = fleet
        self._breaker = breaker
        self._metrics = metrics
        self._clock = clock
        self._on_queued = on_queued
        self._on_answered = on_answered
        self._ready = threading.Condition(threading.Lock())
        self._waiting: deque[_Pending] = deque()
        self._committer: threading.Thread | None = None
        self._closed = False

    def submit(self, message: WebhookMessage) -> Future[RecordedAlerts]:
        """Queue ``message`` for the next group commit; the future says what was recorded.

        The future's exception, when it has one, means the notification was not recorded
        (:class:`~engine.errors.StateError` from the store, or the intake is closed).
        """
        answer: Future[RecordedAlerts] = Future()
        with self._ready:
            if self._closed:
                answer.set_exception(StateError("the intake is closed: the server is stopping"))
                return answer
            self._waiting.append(_Pending(message, answer))
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._commit_waiting, name="remediate-intake", daemon=True
                )
                self._committer.start()
            self._ready.notify()
        return answer

    def record(self, message: WebhookMessage) -> RecordedAlerts:
        """Route and durably record ``message``; raises when it was not recorded."""
        return self.submit(message).result()

    def close(self, timeout: float = 30.0) -> None:
        """Record what is waiting, then stop the committer thread; later submissions fail."""
        with self._ready:
            self._closed = True
            self._ready.notify()
            committer = self._committer
        if committer is not None:
            committer.join(timeout)

    def _commit_waiting(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if not self._waiting:
                    return
                count = min(MAX_GROUP, len(self._waiting))
                group = [self._waiting.popleft() for _ in range(count)]
            try:
                self._commit(group)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one group
                for pending in group:
                    if not pending.answer.done():
                        pending.answer.set_exception(exc)

    def _commit(self, group: list[_Pending]) -> None:
        messages = [p.message for p in group]
        try:
            fleet = self._fleet.current
            batches = [self._route(m, fleet) for m in messages]
            results = self._store.record_notifications(
                batches,
                now=self._clock(),
                hold_reason=self._breaker.hold_reason,
                audit=lambda recorded: self._audit_once(messages, batches, recorded),
            )
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, who raises it
            for pending in group:
                pending.answer.set_exception(exc)
            return
        for batch, result in zip(batches, results, strict=True):
            self._count(batch, result)
        if any(r.queued for r in results):
            self._on_queued()
        for pending, result in zip(group, results, strict=True):
            pending.answer.set_result(result)
        self._on_answered(len(group))

    def _route(self, message: WebhookMessage, fleet: Fleet) -> AlertBatch:
        firing: list[FiringInput] = []
        resolved: list[ResolvedInput] = []
        for alert in message.alerts:
            if alert.status == "resolved":
                resolved.append(
                    ResolvedInput(
                        fingerprint=alert.fingerprint,
                        starts_at=alert.starts_at,
                        alertname=alert.alertname,
                        labels=alert.labels,
                    )
                )
                continue
            routing = self._router.route(alert, fleet)
            firing.append(
                FiringInput(
                    fingerprint=alert.fingerprint,
                    starts_at=alert.starts_at,
                    alertname=alert.alertname,
                    labels=alert.labels,
                    outcome=routing.outcome,
                    reason=routing.reason,
                    routes=routing.routes,
                )
            )
        return AlertBatch(firing=tuple(firing), resolved=tuple(resolved))

    def _count(self, batch: AlertBatch, recorded: RecordedAlerts) -> None:
        metrics = self._metrics
        if batch.firing:
            metrics.alerts_received.labels("firing").inc(len(batch.firing))
        if batch.resolved:
            metrics.alerts_received.labels("resolved").inc(len(batch.resolved))
        if recorded.deduplicated:
            metrics.alerts_deduplicated.inc(len(recorded.deduplicated))
        new = {(k.fingerprint, k.starts_at) for k in recorded.new}
        unrouted = Counter(
            firing.outcome.value
            for firing in batch.firing
            if firing.outcome in _UNROUTED and (firing.fingerprint, firing.starts_at) in new
        )
        for outcome, count in unrouted.items():
            metrics.alerts_unmatched.labels(outcome).inc(count)
        for outcome, items in (
            ("queued", recorded.queued),
            ("held", recorded.held),
            ("cancelled", recorded.cancelled),
        ):
            if items:
                metrics.runs.labels(outcome).inc(len(items))

    def _audit_once(
        self,
        messages: list[WebhookMessage],
        batches: list[AlertBatch],
        results: list[RecordedAlerts],
    ) -> None:
        """Audit the group (the store calls this in its commit, or right after it)."""
        try:
            self._audit(messages, batches, results)
        except AuditError:  # the file could not be written; the records are committed
            self._metrics.audit_errors.inc()

    def _audit(
        self,
        messages: list[WebhookMessage],
        batches: list[AlertBatch],
        results: list[RecordedAlerts],
    ) -> None:
        structlog.get_logger().info(
            "alert.received",
            notifications=[
                {
                    "group_key": message.group_key,
                    "receiver": message.receiver,
                    "status": message.status,
                    "alerts": _outcomes(message, batch, result),
                }
                for message, batch, result in zip(messages, batches, results, strict=True)
            ],
        )


def _outcomes(
    message: WebhookMessage, batch: AlertBatch, recorded: RecordedAlerts
) -> list[dict[str, object]]:
    """Every alert of the notification with what became of it.

    New firings carry their labels verbatim (untrusted data, recorded as data), the runs
    they queued (or held) and, when a route found no host or the breaker held them, the
    reason; resolved alerts carry the runs they cancelled; an alert already recorded is only
    named (its labels were audited when it was new).
    """
    routed = {(f.fingerprint, f.starts_at): f for f in batch.firing}
    fresh = {(k.fingerprint, k.starts_at) for k in (*recorded.new, *recorded.resolved)}
    runs = _runs_by_firing(recorded.queued)
    held = _runs_by_firing(recorded.held)
    cancelled = _runs_by_firing(recorded.cancelled)
    entries: list[dict[str, object]] = []
    for alert in message.alerts:
        key = (alert.fingerprint, alert.starts_at)
        entry: dict[str, object] = {
            "fingerprint": alert.fingerprint,
            "starts_at": _iso(alert.starts_at),
            "status": alert.status,
        }
        if key not in fresh:
            entry["outcome"] = "deduplicated"
        elif alert.status == "resolved":
            entry.update(outcome="resolved", labels=alert.labels)
            if key in cancelled:
                entry["cancelled"] = cancelled[key]
        elif key in held:
            entry.update(outcome=FiringOutcome.HELD.value, labels=alert.labels)
            entry.update(reason=recorded.held[0].reason, runs=held[key])
        else:
            decided = routed[key]
            entry.update(outcome=decided.outcome.value, labels=alert.labels)
            if decided.reason:
                entry["reason"] = decided.reason
            if key in runs:
                entry["runs"] = runs[key]
        fresh.discard(key)  # a second copy in the same notification is a duplicate
        entries.append(entry)
    return entries


def _runs_by_firing(
    items: tuple[QueueItem, ...],
) -> dict[tuple[str, datetime], list[dict[str, object]]]:
    """Queue items by the firing they belong to, as the audit log names them."""
    runs: dict[tuple[str, datetime], list[dict[str, object]]] = {}
    for item in items:
        runs.setdefault((item.fingerprint, item.starts_at), []).append(
            {
                "item": item.item_id,
                "runbook": item.runbook,
                "host": item.host,
                "trigger_mode": item.trigger_mode,
                "mode": item.mode.value,
            }
        )
    return runs
