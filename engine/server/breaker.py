"""The fleet-wide circuit breaker: an alert storm must not become a remediation storm.

It opens when, within ``window``:

* more than ``max_failures`` alert-triggered runs ended unsuccessfully, or
* more than ``max_alerting_pct`` % of the fleet (and at least ``min_alerting_devices``
  devices) started alerting.

While it is open nothing is run: new runs are recorded ``held``, and queued ones are set
``held`` when a worker would have claimed them.  Held runs are never run later; they stay
visible (``GET /queue?state=held``).  It closes after ``cool_off``, or by ``POST
/breaker/reset``; closing starts the counting afresh.  Its state is kept in the store, so a
restart does not close it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict

from engine.server.config import Breaker
from engine.server.metrics import ServerMetrics
from engine.server.queue import BreakerRecord
from engine.state import AlertStore


class BreakerStatus(BaseModel):
    """The breaker as ``/healthz`` shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    open: bool
    reason: str = ""
    opened_at: AwareDatetime | None = None
    closes_at: AwareDatetime | None = None


class _RecentlyQueued:
    """When a run was last queued for each host: an upper bound of the alerting devices.

    Counting the devices alerting in the window takes a query over every run queued in it,
    which grows with the window and ran on every refresh.  This bound (hosts with any run
    queued in the window, resolved or not) is kept up to date from the runs queued since the
    last refresh only; when it is below the threshold the breaker cannot trip and the exact
    count is not needed.
    """

    def __init__(self) -> None:
        self._last_item = 0
        self._latest: dict[str, datetime] = {}

    def count(self, store: AlertStore, since: datetime) -> int:
        """Hosts with a run queued at or after ``since`` (a superset of the alerting ones)."""
        self._last_item, latest = store.latest_queued_per_host(self._last_item)
        for host, at in latest.items():
            known = self._latest.get(host)
            if known is None or at > known:
                self._latest[host] = at
        return sum(1 for at in self._latest.values() if at >= since)


class CircuitBreaker:
    """Decides from the store whether the server may act; thread-safe."""

    def __init__(
        self,
        config: Breaker,
        *,
        clock: Callable[[], datetime],
        fleet_size: Callable[[], int],
        metrics: ServerMetrics,
    ) -> None:
        self.config = config
        self._clock = clock
        self._fleet_size = fleet_size
        self._metrics = metrics
        self._lock = threading.Lock()
        self._record = BreakerRecord(open=False, reason="")
        self._refreshed = -float("inf")
        self._recently_queued = _RecentlyQueued()

    @property
    def status(self) -> BreakerStatus:
        """Open or closed, why, and when it closes."""
        record = self._record
        if not record.open:
            return BreakerStatus(open=False)
        closes = record.opened_at + self.config.cool_off if record.opened_at else None
        return BreakerStatus(
            open=True, reason=record.reason, opened_at=record.opened_at, closes_at=closes
        )

    @property
    def hold_reason(self) -> str | None:
        """Why runs are held now, or None when the server may act."""
        record = self._record
        return f"circuit breaker open: {record.reason}" if record.open else None

    def load(self, store: AlertStore) -> BreakerStatus:
        """Take the saved state (a restart keeps an open breaker open)."""
        with self._lock:
            self._record = store.breaker_state() or BreakerRecord(open=False, reason="")
            self._metrics.breaker_open.set(int(self._record.open))
        return self.status

    def refresh(self, store: AlertStore, *, min_interval: float = 0.0) -> BreakerStatus:
        """Open on a storm or failures; close after the cool-off.

        With ``min_interval`` (seconds), skip the store queries when the last refresh is more
        recent than that (the intake's hot path); workers refresh before every claim.
        """
        with self._lock:
            started = time.monotonic()
            if started - self._refreshed < min_interval:
                return self.status
            self._refreshed = started
            now = self._clock()
            record = self._record
            if record.open:
                opened = record.opened_at or now
                if now - opened >= self.config.cool_off:
                    self._close(store, now, "cool-off elapsed")
                return self.status
            cause, reason = self._trip(store, now, record)
            if cause is not None:
                self._record = BreakerRecord(
                    open=True, reason=reason, opened_at=now, reset_at=record.reset_at
                )
                store.save_breaker(self._record)
                self._metrics.breaker_open.set(1)
                self._metrics.breaker_trips.labels(cause).inc()
                structlog.get_logger().warning("breaker.opened", cause=cause, reason=reason)
        return self.status

    def reset(self, store: AlertStore, *, by: str) -> BreakerStatus:
        """Close now (an operator's decision) and count afresh."""
        with self._lock:
            self._close(store, self._clock(), f"reset by {by}")
        return self.status

    def _close(self, store: AlertStore, now: datetime, why: str) -> None:
        was_open = self._record.open
        self._record = BreakerRecord(open=False, reason="", opened_at=None, reset_at=now)
        store.save_breaker(self._record)
        self._metrics.breaker_open.set(0)
        if was_open:
            structlog.get_logger().info("breaker.closed", reason=why)

    def _trip(
        self, store: AlertStore, now: datetime, record: BreakerRecord
    ) -> tuple[str | None, str]:
        config = self.config
        since = now - config.window
        if record.reset_at is not None and record.reset_at > since:
            since = record.reset_at
        failures = store.count_failed_items(since)
        if failures > config.max_failures:
            return "failures", (
                f"{failures} alert-triggered runs failed within {config.window} "
                f"(more than max_failures {config.max_failures})"
            )
        fleet = self._fleet_size()
        if fleet <= 0:
            return None, ""
        # The smallest count above both limits; counting stops there.
        over_pct = fleet * config.max_alerting_pct // 100 + 1
        threshold = max(over_pct, config.min_alerting_devices)
        if self._recently_queued.count(store, since) < threshold:
            return None, ""  # fewer hosts than that had any run queued: no storm
        alerting = store.count_alerting_devices(since, stop_at=threshold)
        if alerting >= threshold:
            return "storm", (
                f"at least {alerting} of {fleet} devices started alerting within "
                f"{config.window} (more than max_alerting_pct {config.max_alerting_pct}%)"
            )
        return None, ""
