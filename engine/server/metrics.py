"""Prometheus metrics of one server process, in its own registry (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.server.queue import QueueState

#: Run durations: alert runs probe, act and verify, from seconds to many minutes.
RUN_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Webhook handling: milliseconds.
WEBHOOK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _QueueDepth(Collector):
    """Queue items per state, read from the store at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[QueueState, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "remediate_queue_items",
            "Alert-triggered runs in the queue, by state.",
            labels=["state"],
        )
        for state, count in self._counts().items():
            family.add_metric([state.value], count)
        yield family


class ServerMetrics:
    """Every metric the server exposes on ``/metrics``."""

    def __init__(self, queue_counts: Callable[[], Mapping[QueueState, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.alerts_received = Counter(
            "remediate_alerts_received",
            "Alerts received in webhook notifications, by alert status.",
            ["status"],
            registry=r,
        )
        self.alerts_deduplicated = Counter(
            "remediate_alerts_deduplicated",
            "Alerts already recorded (a re-sent or duplicated notification).",
            registry=r,
        )
        self.alerts_unmatched = Counter(
            "remediate_alerts_unmatched",
            "New firings that start no run: no matching trigger, or no single device.",
            ["outcome"],
            registry=r,
        )
        self.runs = Counter(
            "remediate_runs",
            "Alert-triggered runs by outcome (run status, or what happened to the queue item).",
            ["outcome"],
            registry=r,
        )
        self.run_duration = Histogram(
            "remediate_run_duration_seconds",
            "Duration of alert-triggered runs.",
            ["runbook"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.breaker_open = Gauge(
            "remediate_circuit_breaker_open",
            "1 while the circuit breaker is open (runs are held, not run).",
            registry=r,
        )
        self.breaker_trips = Counter(
            "remediate_circuit_breaker_trips",
            "Times the circuit breaker opened, by cause.",
            ["cause"],
            registry=r,
        )
        self.webhook_requests = Counter(
            "remediate_webhook_requests",
            "Webhook requests by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "remediate_webhook_duration_seconds",
            "Time to authenticate, parse and durably record a webhook notification.",
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )
        self.audit_errors = Counter(
            "remediate_audit_errors",
            "Audit events that could not be written after the alerts were recorded.",
            registry=r,
        )
        r.register(_QueueDepth(queue_counts))

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
