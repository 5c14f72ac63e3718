"""Intake: one webhook notification → routed, durably recorded, counted and audited.

The store commit comes first (the HTTP answer depends on it); audit events follow:

* ``alert.received``, listing each notification committed together and every alert in it
  with its ``outcome`` (``queued``, ``held``, ``unmatched``, ``unresolved``, ``resolved`` or
  ``deduplicated``), the labels of new ones and the reason when nothing was queued;
* ``alert.queued``, ``alert.held``, ``alert.cancelled`` naming the runs concerned.

(An event per alert would cost an fsync each and cap ingest at the audit log's append rate.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from engine.errors import AuditError
from engine.server.alerts import WebhookMessage
from engine.server.breaker import CircuitBreaker
from engine.server.fleet import Fleet, FleetWatcher
from engine.server.metrics import ServerMetrics
from engine.server.routing import Router
from engine.state import (
    AlertBatch,
    AlertStore,
    FiringInput,
    FiringOutcome,
    QueueItem,
    RecordedAlerts,
    ResolvedInput,
)

_UNROUTED = (FiringOutcome.UNMATCHED, FiringOutcome.UNRESOLVED)


def _item(item: QueueItem) -> dict[str, object]:
    return {
        "item": item.item_id,
        "fingerprint": item.fingerprint,
        "starts_at": item.starts_at,
        "runbook": item.runbook,
        "host": item.host,
        "trigger_mode": item.trigger_mode,
        "mode": item.mode.value,
    }


@dataclass
class _Pending:
    """One notification waiting for a group commit."""

    message: WebhookMessage
    result: RecordedAlerts | None = None
    error: Exception | None = None
    done: bool = False


#: Most notifications one group commit takes.
MAX_GROUP = 64


class Intake:
    """Records notifications; safe to call from many threads at once.

    Concurrent calls are group-committed: the first caller to find no commit in progress
    records every notification waiting (one SQLite transaction, one set of audit events) and
    wakes the others.  A caller returns only once its notification is committed.
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
    ) -> None:
        self._store = store
        self._router = router
        self._fleet = fleet
        self._breaker = breaker
        self._metrics = metrics
        self._clock = clock
        self._on_queued = on_queued
        self._turn = threading.Condition(threading.Lock())
        self._waiting: list[_Pending] = []
        self._writing = False

    def record(self, message: WebhookMessage) -> RecordedAlerts:
        """Route and durably record ``message``; raises when it was not recorded."""
        pending = _Pending(message)
        with self._turn:
            self._waiting.append(pending)
            while not pending.done:
                if self._writing:
                    self._turn.wait()
                    continue
                self._writing = True
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                self._turn.release()
                try:
                    self._commit(group)
                finally:
                    self._turn.acquire()
                    self._writing = False
                    self._turn.notify_all()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None  # noqa: S101 - set with done when no error
        return pending.result

    def _commit(self, group: list[_Pending]) -> None:
        try:
            fleet = self._fleet.current
            batches = [self._route(p.message, fleet) for p in group]
            results = self._store.record_notifications(
                batches, now=self._clock(), hold_reason=self._breaker.hold_reason
            )
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, who raises it
            for pending in group:
                pending.error, pending.done = exc, True
            return
        for pending, result in zip(group, results, strict=True):
            pending.result, pending.done = result, True
        for batch, result in zip(batches, results, strict=True):
            self._count(batch, result)
        if any(r.queued for r in results):
            self._on_queued()
        try:
            self._audit([p.message for p in group], batches, results)
        except AuditError:
            self._metrics.audit_errors.inc()

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
        for firing in batch.firing:
            if firing.outcome in _UNROUTED and (firing.fingerprint, firing.starts_at) in new:
                metrics.alerts_unmatched.labels(firing.outcome.value).inc()
        for outcome, items in (
            ("queued", recorded.queued),
            ("held", recorded.held),
            ("cancelled", recorded.cancelled),
        ):
            if items:
                metrics.runs.labels(outcome).inc(len(items))

    def _audit(
        self,
        messages: list[WebhookMessage],
        batches: list[AlertBatch],
        results: list[RecordedAlerts],
    ) -> None:
        log = structlog.get_logger()
        log.info(
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
        queued = [i for r in results for i in r.queued]
        held = [i for r in results for i in r.held]
        cancelled = [i for r in results for i in r.cancelled]
        if queued:
            log.info("alert.queued", runs=[_item(i) for i in queued])
        if held:
            log.warning("alert.held", reason=held[0].reason, runs=[_item(i) for i in held])
        if cancelled:
            log.info(
                "alert.cancelled",
                reason="the alert resolved before the run started",
                runs=[_item(i) for i in cancelled],
            )


def _outcomes(
    message: WebhookMessage, batch: AlertBatch, recorded: RecordedAlerts
) -> list[dict[str, object]]:
    """Every alert of the notification with what became of it.

    New firings carry their labels verbatim (untrusted data, recorded as data) and, when
    nothing was queued, the reason; an alert already recorded is only named (its labels were
    audited when it was new).
    """
    routed = {(f.fingerprint, f.starts_at): f for f in batch.firing}
    fresh = {(k.fingerprint, k.starts_at) for k in (*recorded.new, *recorded.resolved)}
    held = {(i.fingerprint, i.starts_at) for i in recorded.held}
    entries: list[dict[str, object]] = []
    for alert in message.alerts:
        key = (alert.fingerprint, alert.starts_at)
        entry: dict[str, object] = {
            "fingerprint": alert.fingerprint,
            "starts_at": alert.starts_at,
            "status": alert.status,
        }
        if key not in fresh:
            entry["outcome"] = "deduplicated"
        elif alert.status == "resolved":
            entry.update(outcome="resolved", labels=alert.labels)
        else:
            decided = routed[key]
            outcome = FiringOutcome.HELD if key in held else decided.outcome
            entry.update(outcome=outcome.value, labels=alert.labels)
            if decided.reason:
                entry["reason"] = decided.reason
        fresh.discard(key)  # a second copy in the same notification is a duplicate
        entries.append(entry)
    return entries
