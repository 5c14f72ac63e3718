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


class LockRecord(_Record):
    """A live per-device lock."""

    host: str
    run_id: str
    acquired_at: AwareDatetime
    expires_at: AwareDatetime


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
