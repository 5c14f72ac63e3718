"""Approvals: request, four eyes, expiry, deny, and applying exactly the approved plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.approvals import (
    ApprovalError,
    apply_approved,
    decide,
    expire_approvals,
    request_approval,
    saved_plan,
)
from engine.errors import EngineError, StateError
from engine.executors.fake import FakeExecutor
from engine.outcomes import HostOutcome, Mode
from engine.pipeline import RunRequest, Services, apply_saved_plan, run_runbook
from engine.planfiles import SavedPlan
from engine.runbooks import Runbook, load_runbook
from engine.state import ApprovalStatus
from engine.state.sqlite import SqliteStateStore
from tests.support.probing import Answer, device
from tests.support.stores import FaultyStore

DATA = Path(__file__).resolve().parent / "data"
SICK: dict[str, Answer] = {"free": "5", "rw": "true", "junk": "/junk/a\n"}
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def runbook(tmp_path: Path) -> Runbook:
    """The pipeline test runbook with four eyes required."""
    text = (DATA / "runbooks" / "pipeline.yml").read_text()
    path = tmp_path / "runbooks" / "pipeline.yml"
    path.parent.mkdir()
    path.write_text(text.replace("approval: destructive}", "approval: always, four_eyes: true}"))
    return load_runbook(path, playbooks_dir=DATA / "playbooks")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    """A real SQLite state store."""
    db = SqliteStateStore(tmp_path / "state.db", clock=lambda: NOW)
    yield db
    db.close()


def _pending(
    runbook: Runbook, store: SqliteStateStore, tmp: Path
) -> tuple[str, Services, FakeExecutor]:
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})})
    ids = count(len(store.list_runs()) + 1)
    services = Services(
        executor=executor,
        store=store,
        clock=lambda: NOW,
        new_run_id=lambda: f"run-{next(ids)}",
        artifacts_dir=tmp / "artifacts",
        sleep=lambda _s: None,
    )
    request = RunRequest(
        inventory=Path("hosts.ini"), mode=Mode.DRY_RUN, trigger="user:alice", user="alice"
    )
    report = run_runbook(runbook, request, services, approve=lambda _p: False)
    saved = SavedPlan(plan=report.plan, expires_at=NOW + timedelta(hours=1)).sealed()
    record = request_approval(store, saved, runbook, source="user:alice", now=NOW)
    return record.approval_id, services, executor


def test_requester_cannot_approve_under_four_eyes(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """With four eyes, the requester's approval is refused and the approval stays pending."""
    approval_id, _, executor = _pending(runbook, store, tmp_path)
    with pytest.raises(ApprovalError, match="four eyes"):
        decide(store, approval_id, approver="alice", approve=True, now=NOW)
    record = store.get_approval(approval_id)
    assert record is not None
    assert record.status is ApprovalStatus.PENDING
    assert executor.playbook_calls == []


def test_another_person_approves_and_exactly_the_plan_runs(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """Bob approves Alice's request; the approval is audited and the plan is applied as saved."""
    approval_id, services, executor = _pending(runbook, store, tmp_path)
    with capture_logs() as events:
        record = decide(store, approval_id, approver="bob", approve=True, now=NOW)
    assert record.status is ApprovalStatus.APPROVED
    assert record.decided_by == "bob"
    granted = next(e for e in events if e["event"] == "approval.granted")
    assert granted["approver"] == "bob"
    assert granted["decided_at"] == NOW
    report = apply_saved_plan(
        saved_plan(record),
        runbook,
        services,
        user="bob",
        trigger=f"approval:{approval_id}",
        approve=lambda _p: True,
    )
    assert [h.host for h in report.hosts] == ["a"]
    assert report.hosts[0].outcome is HostOutcome.NOT_FIXED  # the fake device stays sick
    assert [c.request.extravars["remediate_step"] for c in executor.playbook_calls] == [
        "clean",
        "tidy",
    ]
    with pytest.raises(ApprovalError, match="already approved by bob"):
        decide(store, approval_id, approver="carol", approve=True, now=NOW)


def test_expired_approval_is_denied_as_expired(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """Past its expiry an approval cannot be approved; listing closes it as expired."""
    approval_id, _, _ = _pending(runbook, store, tmp_path)
    later = NOW + timedelta(hours=2)
    with pytest.raises(ApprovalError, match="expired"):
        decide(store, approval_id, approver="bob", approve=True, now=later)
    record = store.get_approval(approval_id)
    assert record is not None
    assert record.status is ApprovalStatus.EXPIRED
    other_id, _, _ = _pending(runbook, store, tmp_path)
    (expired,) = expire_approvals(store, later)
    assert expired.approval_id == other_id


def test_deny_closes_the_approval(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A denied approval records who and why, and can no longer be approved."""
    approval_id, _, _ = _pending(runbook, store, tmp_path)
    record = decide(store, approval_id, approver="alice", approve=False, now=NOW, reason="not now")
    assert record.status is ApprovalStatus.DENIED
    assert record.reason == "not now"
    with pytest.raises(ApprovalError, match="already denied"):
        decide(store, approval_id, approver="bob", approve=True, now=NOW)


def test_tampered_stored_plan_is_refused(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A plan edited inside the store no longer matches its digest."""
    approval_id, _, _ = _pending(runbook, store, tmp_path)
    record = store.get_approval(approval_id)
    assert record is not None
    plan = dict(record.plan)
    plan["expires_at"] = "2030-01-01T00:00:00Z"
    with pytest.raises(ApprovalError, match="edited"):
        saved_plan(record.model_copy(update={"plan": plan}))


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (RuntimeError("the disk controller caught fire"), "internal error: RuntimeError"),
        (StateError("state.db: state store cannot start run: disk I/O error"), "disk I/O error"),
    ],
)
def test_an_approval_that_fails_to_apply_ends_failed_with_the_reason(
    runbook: Runbook,
    store: SqliteStateStore,
    tmp_path: Path,
    fault: Exception,
    reason: str,
) -> None:
    """Whatever breaks while applying, the approval ends failed, with why; the traceback is kept."""
    approval_id, services, executor = _pending(runbook, store, tmp_path)
    record = decide(store, approval_id, approver="bob", approve=True, now=NOW, claim=True)
    faulty = FaultyStore(store, {"start_run": [fault]})
    with capture_logs() as events, pytest.raises(type(fault)):
        apply_approved(
            faulty, record, runbook, dataclasses.replace(services, store=faulty), now=NOW
        )
    assert faulty.raised == ["start_run"]
    failed = store.get_approval(approval_id)
    assert failed is not None
    assert failed.status is ApprovalStatus.FAILED
    assert reason in failed.reason
    (event,) = [e for e in events if e["event"] == "approval.failed"]
    assert reason in event["error"]
    if not isinstance(fault, EngineError):  # an engine fault, not an expected failure: why
        assert event["exc_info"] is fault
    assert executor.playbook_calls == []
