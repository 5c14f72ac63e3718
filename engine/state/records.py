"""The state store's records: runs, host outcomes, device leases, approvals."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict

from engine.outcomes import HostOutcome, Mode, RunStatus


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunRecord(_Record):
    """One run of one runbook, as the state store keeps it."""

    run_id: str
    runbook: str
    runbook_digest: str
    mode: Mode
    trigger: str  # "user:alice" or "alert:<fingerprint>"
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    status: RunStatus = RunStatus.RUNNING
    summary: dict[str, int] = {}  # host outcome -> count


class HostRecord(_Record):
    """Where one host ended in one run."""

    run_id: str
    host: str
    outcome: HostOutcome
    reason: str
    steps: list[str]  # ids of the steps executed, in order
    finished_at: AwareDatetime


class Lease(_Record):
    """A run's lease on one device: held until ``expires_at`` unless renewed.

    ``expires_at`` comes from the database's clock (PostgreSQL's; the injected clock for
    SQLite, which has none of its own that processes share).  ``token`` is the fencing
    token: a number from a sequence, higher for every lease granted, that writes of the
    device's outcome carry and the store checks (a holder whose lease expired and passed on
    cannot write over its successor's results).  ``holder`` names the controller process.
    """

    host: str
    run_id: str
    holder: str
    token: int
    acquired_at: AwareDatetime
    expires_at: AwareDatetime


def lease_expired_reason(lease: Lease) -> str:
    """Why a run whose lease on a device expired is marked interrupted (every backend's words)."""
    return (
        f"the lease on {lease.host} (token {lease.token}, held by {lease.holder or '?'}) "
        f"expired at {lease.expires_at.isoformat()}: its controller stopped renewing it"
    )


class Interruption(_Record):
    """A run the store marked interrupted because its controller stopped renewing it."""

    run_id: str
    runbook: str
    trigger: str
    reason: str
    host: str | None = None  # the device whose lease expired, if that is how it was found
    token: int | None = None  # that lease's fencing token
    item_id: int | None = None  # the queue item it ran for, if any


class LeaseGrant(_Record):
    """What :meth:`~engine.state.StateStore.acquire_lease` got: the lease, or who holds it.

    ``interrupted``: runs whose expired leases on this device were found (and reaped) on
    the way; their controllers stopped renewing them mid-run.
    """

    lease: Lease | None = None
    held_by: Lease | None = None
    interrupted: tuple[Interruption, ...] = ()


class Admission(_Record):
    """Whether a run may act on its hosts under the runbook's fleet-wide blast radius."""

    admitted: bool
    allowed: int  # hosts the policy allows at once
    in_flight: tuple[str, ...] = ()  # hosts other running runs of the runbook were admitted to


class ApprovalStatus(StrEnum):
    """Where an approval stands."""

    PENDING = "pending"
    APPROVED = "approved"  # decided; a server worker will apply it
    APPLYING = "applying"  # being applied (by the approver's CLI or a server worker)
    APPLIED = "applied"  # the plan was applied (the run's own outcome is in history)
    FAILED = "failed"  # applying it failed as a tool (plan refused, engine fault)
    DENIED = "denied"
    EXPIRED = "expired"


class ApprovalRecord(_Record):
    """A saved plan waiting for (or past) a person's decision; see :mod:`engine.approvals`."""

    approval_id: str
    runbook: str
    source: str  # "user:<name>" or "alert:<fingerprint>"
    requested_by: str
    requested_at: AwareDatetime
    expires_at: AwareDatetime
    four_eyes: bool
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_by: str | None = None
    decided_at: AwareDatetime | None = None
    reason: str = ""
    plan: dict[str, Any]  # the saved plan as JSON data, digest included
