"""Approvals: a saved plan waiting for a person's decision before it may act.

A run whose plan needs approval (``policy.approval`` ``always``, or ``destructive`` with a
destructive step planned) and that nobody can confirm interactively (an alert in ``approve``
mode, or ``remediate plan --request-approval``) becomes a pending approval holding the saved
plan.  ``remediate approvals approve ID`` (or the server's endpoint) records who approved and
when, then applies exactly that plan (drift-checked); ``deny`` closes it.  A pending approval
past its expiry is denied as expired.  With ``policy.four_eyes`` the requester cannot approve.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import structlog
from pydantic import ValidationError

from engine.errors import InputError
from engine.planfiles import SavedPlan
from engine.runbooks import Runbook
from engine.state import ApprovalRecord, ApprovalStatus, StateStore


class ApprovalError(InputError):
    """An approval cannot be decided: unknown, already decided, expired, or four eyes."""


def saved_plan(record: ApprovalRecord) -> SavedPlan:
    """The approval's plan, validated and with its digest checked again."""
    try:
        saved = SavedPlan.model_validate(record.plan)
    except ValidationError as exc:
        raise ApprovalError(
            f"approval {record.approval_id}: stored plan unreadable: {exc}"
        ) from exc
    if saved.digest != saved.computed_digest():
        raise ApprovalError(f"approval {record.approval_id}: stored plan was edited")
    return saved


def new_approval_id() -> str:
    """A short, unguessable approval id."""
    return f"ap-{secrets.token_hex(5)}"


def request_approval(
    store: StateStore, saved: SavedPlan, runbook: Runbook, *, source: str, now: datetime
) -> ApprovalRecord:
    """Record a pending approval for ``saved``; it expires with the plan."""
    approval = ApprovalRecord(
        approval_id=new_approval_id(),
        runbook=runbook.name,
        source=source,
        requested_by=saved.plan.created_by,
        requested_at=now,
        expires_at=saved.expires_at,
        four_eyes=runbook.spec.policy.four_eyes,
        plan=saved.model_dump(mode="json"),
    )
    store.add_approval(approval)
    structlog.get_logger().info(
        "approval.requested",
        approval_id=approval.approval_id,
        runbook=runbook.name,
        plan_digest=saved.digest,
        requested_by=approval.requested_by,
        source=source,
        expires_at=approval.expires_at,
        hosts=[h.host for h in saved.plan.acting],
    )
    return approval


def expire_approvals(store: StateStore, now: datetime) -> list[ApprovalRecord]:
    """Deny every pending approval past its expiry; return them."""
    expired = []
    for approval in store.list_approvals(ApprovalStatus.PENDING):
        if approval.expires_at <= now:
            decided = store.decide_approval(
                approval.approval_id, ApprovalStatus.EXPIRED, by=None, at=now, reason="expired"
            )
            if decided is not None:
                structlog.get_logger().info("approval.expired", approval_id=approval.approval_id)
                expired.append(decided)
    return expired


def decide(
    store: StateStore,
    approval_id: str,
    *,
    approver: str,
    approve: bool,
    now: datetime,
    reason: str = "",
) -> ApprovalRecord:
    """Approve or deny a pending approval, enforcing expiry and four eyes; audited."""
    approval = store.get_approval(approval_id)
    if approval is None:
        raise ApprovalError(f"no approval {approval_id!r}")
    if approval.status is not ApprovalStatus.PENDING:
        by = f" by {approval.decided_by}" if approval.decided_by else ""
        raise ApprovalError(f"approval {approval_id} is already {approval.status.value}{by}")
    log = structlog.get_logger()
    if approval.expires_at <= now:
        store.decide_approval(
            approval_id, ApprovalStatus.EXPIRED, by=None, at=now, reason="expired"
        )
        log.info("approval.expired", approval_id=approval_id)
        raise ApprovalError(f"approval {approval_id} expired at {approval.expires_at.isoformat()}")
    if approve and approval.four_eyes and approver == approval.requested_by:
        log.warning(
            "approval.refused",
            approval_id=approval_id,
            approver=approver,
            reason="four eyes: the requester cannot approve",
        )
        raise ApprovalError(
            f"approval {approval_id}: runbook {approval.runbook!r} needs four eyes; "
            f"{approver} requested it and cannot approve it"
        )
    status = ApprovalStatus.APPROVED if approve else ApprovalStatus.DENIED
    decided = store.decide_approval(approval_id, status, by=approver, at=now, reason=reason)
    if decided is None:
        raise ApprovalError(f"approval {approval_id} was decided by someone else meanwhile")
    log.info(
        "approval.granted" if approve else "approval.denied",
        approval_id=approval_id,
        approver=approver,
        decided_at=now,
        plan_digest=approval.plan.get("digest"),
        reason=reason,
    )
    return decided
