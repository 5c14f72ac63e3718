"""Intake: one webhook notification → routed, durably recorded, counted and audited.

The store commit comes first (the HTTP answer depends on it); audit events follow, one per
kind of change per notification, each listing every alert it concerns.  (One event per alert
would cost one fsync each and cap ingest at the audit log's append rate.)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog

from engine.errors import AuditError
from engine.server.alerts import WebhookMessage
from engine.server.breaker import CircuitBreaker
from engine.server.fleet import FleetWatcher
from engine.server.metrics import ServerMetrics
from engine.server.routing import Router
from engine.state import (
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


class Intake:
    """Records notifications; safe to call from many threads (the store serialises)."""

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

    def record(self, message: WebhookMessage) -> RecordedAlerts:
        """Route and record ``message``; raises :class:`StateError` when nothing was recorded."""
        fleet = self._fleet.current
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
        recorded = self._store.record_alerts(
            firing, resolved, now=self._clock(), hold_reason=self._breaker.hold_reason
        )
        self._count(firing, resolved, recorded)
        if recorded.queued:
            self._on_queued()
        try:
            self._audit(message, firing, recorded)
        except AuditError:
            self._metrics.audit_errors.inc()
        return recorded

    def _unrouted(self, firing: list[FiringInput], recorded: RecordedAlerts) -> list[FiringInput]:
        new = {(k.fingerprint, k.starts_at) for k in recorded.new}
        return [f for f in firing if f.outcome in _UNROUTED and (f.fingerprint, f.starts_at) in new]

    def _count(
        self,
        firing: list[FiringInput],
        resolved: list[ResolvedInput],
        recorded: RecordedAlerts,
    ) -> None:
        metrics = self._metrics
        if firing:
            metrics.alerts_received.labels("firing").inc(len(firing))
        if resolved:
            metrics.alerts_received.labels("resolved").inc(len(resolved))
        if recorded.deduplicated:
            metrics.alerts_deduplicated.inc(len(recorded.deduplicated))
        for unrouted in self._unrouted(firing, recorded):
            metrics.alerts_unmatched.labels(unrouted.outcome.value).inc()
        for outcome, items in (
            ("queued", recorded.queued),
            ("held", recorded.held),
            ("cancelled", recorded.cancelled),
        ):
            if items:
                metrics.runs.labels(outcome).inc(len(items))

    def _audit(
        self, message: WebhookMessage, firing: list[FiringInput], recorded: RecordedAlerts
    ) -> None:
        log = structlog.get_logger().bind(group_key=message.group_key, receiver=message.receiver)
        log.info(
            "alert.received",
            status=message.status,
            alerts=[
                {
                    "fingerprint": a.fingerprint,
                    "starts_at": a.starts_at,
                    "status": a.status,
                    "labels": a.labels,
                }
                for a in message.alerts
            ],
        )
        if recorded.deduplicated:
            log.info(
                "alert.deduplicated",
                alerts=[
                    {"fingerprint": k.fingerprint, "starts_at": k.starts_at}
                    for k in recorded.deduplicated
                ],
            )
        unrouted = self._unrouted(firing, recorded)
        if unrouted:
            log.info(
                "alert.unmatched",
                alerts=[
                    {
                        "fingerprint": f.fingerprint,
                        "starts_at": f.starts_at,
                        "outcome": f.outcome.value,
                        "reason": f.reason,
                    }
                    for f in unrouted
                ],
            )
        if recorded.queued:
            log.info("alert.queued", runs=[_item(i) for i in recorded.queued])
        if recorded.held:
            log.warning(
                "alert.held",
                reason=recorded.held[0].reason,
                runs=[_item(i) for i in recorded.held],
            )
        if recorded.resolved:
            log.info(
                "alert.resolved",
                alerts=[
                    {"fingerprint": k.fingerprint, "starts_at": k.starts_at}
                    for k in recorded.resolved
                ],
            )
        if recorded.cancelled:
            log.info(
                "alert.cancelled",
                reason="the alert resolved before the run started",
                runs=[_item(i) for i in recorded.cancelled],
            )
