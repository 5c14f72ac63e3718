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
from pathlib import Path

import structlog
from pydantic import ValidationError

from engine.errors import EngineError, InputError, StateError
from engine.pipeline import RunReport, Services, apply_saved_plan
from engine.planfiles import SavedPlan, check_applicable
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
            decided = store.transition_approval(
                approval.approval_id,
                from_status=ApprovalStatus.PENDING,
                to_status=ApprovalStatus.EXPIRED,
                at=now,
                reason="expired",
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
    claim: bool = False,
) -> ApprovalRecord:
    """Approve or deny a pending approval, enforcing expiry and four eyes; audited.

    With ``claim`` an approval goes straight to ``applying``: the caller applies it now, and
    no server worker will pick it up as well.
    """
    approval = store.get_approval(approval_id)
    if approval is None:
        raise ApprovalError(f"no approval {approval_id!r}")
    if approval.status is not ApprovalStatus.PENDING:
        by = f" by {approval.decided_by}" if approval.decided_by else ""
        raise ApprovalError(f"approval {approval_id} is already {approval.status.value}{by}")
    log = structlog.get_logger()
    if approval.expires_at <= now:
        store.transition_approval(
            approval_id,
            from_status=ApprovalStatus.PENDING,
            to_status=ApprovalStatus.EXPIRED,
            at=now,
            reason="expired",
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
    if not approve:
        status = ApprovalStatus.DENIED
    else:
        status = ApprovalStatus.APPLYING if claim else ApprovalStatus.APPROVED
    decided = store.transition_approval(
        approval_id,
        from_status=ApprovalStatus.PENDING,
        to_status=status,
        at=now,
        reason=reason,
        by=approver,
    )
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


def apply_approved(
    store: StateStore,
    record: ApprovalRecord,
    runbook: Runbook,
    services: Services,
    *,
    now: datetime,
) -> RunReport:
    """Apply an approval in ``applying`` state; mark it applied, or failed with why.

    Whatever stops it (an engine error, a fault of the engine's own, Ctrl-C) ends the
    approval ``failed`` with the reason before the exception goes on; a fault that is not an
    :class:`~engine.errors.EngineError` is logged with its traceback.
    """
    log = structlog.get_logger()
    try:
        saved = saved_plan(record)
        check_applicable(saved, runbook, now, Path(f"approval {record.approval_id}"))
        report = apply_saved_plan(
            saved,
            runbook,
            services,
            user=record.decided_by or "unknown",
            trigger=f"approval:{record.approval_id}",
            approve=lambda _plan: True,  # approved already, by decided_by
        )
    except BaseException as exc:  # recorded as the approval's end, then raised on
        _record_failure(store, record, services, now, exc)
        raise
    store.transition_approval(
        record.approval_id,
        from_status=ApprovalStatus.APPLYING,
        to_status=ApprovalStatus.APPLIED,
        at=now,
        reason=f"run {report.plan.run_id} {report.status.value}",
    )
    log.info(
        "approval.applied",
        approval_id=record.approval_id,
        run_id=report.plan.run_id,
        status=report.status.value,
    )
    return report


def _record_failure(
    store: StateStore, record: ApprovalRecord, services: Services, now: datetime, exc: BaseException
) -> None:
    """End the approval ``failed`` with why ``exc`` stopped it; log it (with the traceback)."""
    if isinstance(exc, EngineError):
        reason = str(exc)
    elif isinstance(exc, Exception):
        reason = f"internal error: {type(exc).__name__}: {exc}"
    else:  # Ctrl-C, SIGTERM
        reason = f"interrupted ({type(exc).__name__})"
    reason = services.secrets.scrub(reason)  # an error's text may quote one
    log = structlog.get_logger()
    try:
        store.transition_approval(
            record.approval_id,
            from_status=ApprovalStatus.APPLYING,
            to_status=ApprovalStatus.FAILED,
            at=now,
            reason=reason,
        )
    except StateError as state:  # the database is away: it stays applying, said here
        log.warning("approval.fail_unrecorded", approval_id=record.approval_id, error=str(state))
    if isinstance(exc, EngineError) or not isinstance(exc, Exception):
        log.warning("approval.failed", approval_id=record.approval_id, error=reason)
    else:
        log.error("approval.failed", approval_id=record.approval_id, error=reason, exc_info=exc)
