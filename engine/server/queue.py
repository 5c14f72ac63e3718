"""The webhook queue's vocabulary: alert firings, queued runs, the breaker, as values.

The server's part of the state store: one row per alert *firing* (fingerprint + startsAt,
so a re-sent or duplicated notification is recognised), a durable queue of alert-triggered
runs, and the fleet-wide circuit breaker.  Label values are untrusted data: every backend
stores them as JSON and never uses them to build a statement.  The stores
(:mod:`engine.state`) take and return these values; they hold no logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict

from engine.outcomes import Mode, RunStatus


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
