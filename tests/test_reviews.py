"""Saved plans and drift: digests, expiry, runbook identity, applying exactly what was reviewed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest

from engine.drift import drift_reason
from engine.errors import PlanFileError
from engine.executors.fake import FakeExecutor
from engine.outcomes import HostOutcome, Mode
from engine.pipeline import RunReport, RunRequest, Services, apply_saved_plan, run_runbook
from engine.planfiles import (
    check_applicable,
    load_plan,
    render_markdown,
    save_plan,
    save_plan_pages,
)
from engine.plans import HostPlan, PlannedStep
from engine.redaction import Secrets
from engine.runbooks import Runbook, load_runbook
from engine.state.sqlite import SqliteStateStore
from tests.support.probing import Answer, device

DATA = Path(__file__).resolve().parent / "data"
SICK: dict[str, Answer] = {"free": "5", "rw": "true", "junk": "/junk/a\n/junk/b\n"}
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def runbook() -> Runbook:
    """The pipeline test runbook (approval: destructive, max_hosts_pct 50)."""
    return load_runbook(DATA / "runbooks" / "pipeline.yml")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStateStore]:
    """A real SQLite state store."""
    db = SqliteStateStore(tmp_path / "state.db", clock=lambda: NOW)
    yield db
    db.close()


def _services(executor: FakeExecutor, store: SqliteStateStore, tmp: Path) -> Services:
    ids = count(1)
    return Services(
        executor=executor,
        store=store,
        clock=lambda: NOW,
        new_run_id=lambda: f"run-{next(ids)}",
        artifacts_dir=tmp / "artifacts",
        sleep=lambda _s: None,
    )


def _dry_run(runbook: Runbook, services: Services) -> RunReport:
    """A dry run over the FakeExecutor's host table (it never reads the inventory file)."""
    request = RunRequest(
        inventory=Path("hosts.ini"), mode=Mode.DRY_RUN, trigger="user:ann", user="ann"
    )
    return run_runbook(runbook, request, services, approve=lambda _p: False)


def test_saved_plan_round_trips_and_carries_a_digest(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A saved plan loads back equal, with its digest checked."""
    executor = FakeExecutor(
        scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})}, hosts=["a", "b", "c"]
    )
    report = _dry_run(runbook, _services(executor, store, tmp_path))
    path = tmp_path / "plan.json"
    saved = save_plan(report.plan, path, expires_in=timedelta(hours=1))
    loaded = load_plan(path)
    assert loaded == saved
    assert loaded.expires_at == NOW + timedelta(hours=1)
    assert [s.items for s in loaded.plan.acting[0].steps] == [["/junk/a", "/junk/b"], None]


def test_plan_saved_a_page_at_a_time_is_the_same_file(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A plan written from its hosts one at a time is the file (and digest) save_plan writes."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})})
    report = _dry_run(runbook, _services(executor, store, tmp_path))
    whole, paged = tmp_path / "whole.json", tmp_path / "paged.json"
    saved = save_plan(report.plan, whole, expires_in=timedelta(hours=1))
    meta = report.plan.model_copy(update={"hosts": ()})
    digest, expires_at = save_plan_pages(
        meta, lambda: iter(report.plan.hosts), paged, expires_in=timedelta(hours=1)
    )
    assert (digest, expires_at) == (saved.digest, saved.expires_at)
    assert paged.read_text() == whole.read_text()
    assert load_plan(paged) == saved
    assert paged.stat().st_mode & 0o777 == 0o600


def test_edited_plan_is_refused(runbook: Runbook, store: SqliteStateStore, tmp_path: Path) -> None:
    """Changing one item in the file breaks the digest."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})})
    report = _dry_run(runbook, _services(executor, store, tmp_path))
    path = tmp_path / "plan.json"
    save_plan(report.plan, path, expires_in=timedelta(hours=1))
    path.write_text(path.read_text().replace("/junk/a", "/etc/passwd"))
    with pytest.raises(PlanFileError, match="edited"):
        load_plan(path)


def test_expired_plan_and_changed_runbook_are_refused(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A plan past its expiry, or made from another runbook version, is not applicable."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})})
    report = _dry_run(runbook, _services(executor, store, tmp_path))
    path = tmp_path / "plan.json"
    saved = save_plan(report.plan, path, expires_in=timedelta(minutes=30))
    check_applicable(saved, runbook, NOW + timedelta(minutes=29), path)
    with pytest.raises(PlanFileError, match="expired"):
        check_applicable(saved, runbook, NOW + timedelta(minutes=30), path)
    changed = tmp_path / "runbooks" / "pipeline.yml"
    changed.parent.mkdir()
    changed.write_text((DATA / "runbooks" / "pipeline.yml").read_text() + "# tweak\n")
    other = load_runbook(changed, playbooks_dir=DATA / "playbooks")
    with pytest.raises(PlanFileError, match="changed since the plan"):
        check_applicable(saved, other, NOW, path)


def test_markdown_review_document(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """The markdown names the runbook, digest, steps, items, guards and evidence."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device({**SICK, "free": "50"})})
    report = _dry_run(runbook, _services(executor, store, tmp_path))
    saved = save_plan(report.plan, tmp_path / "p.json", expires_in=timedelta(hours=1))
    text = render_markdown(saved)
    for needle in (
        "# Remediation plan: pipeline-test",
        saved.digest,
        "`clean` (noop.yml) **(destructive)**: remove 2 junk files",
        "item: `/junk/a`",
        "| rw | passed |",
        "| free | 5 |",
        "| b | healthy |",
    ):
        assert needle in text


def _host(steps: list[PlannedStep], outcome: HostOutcome = HostOutcome.PLANNED) -> HostPlan:
    return HostPlan(host="a", outcome=outcome, steps=tuple(steps))


def test_drift_reasons() -> None:
    """Outcome, step list, items and vars changes are drift; evidence alone is not."""
    step = PlannedStep(id="clean", playbook="p.yml", plan="x", items=["/a"], vars={"v": 1})
    reviewed = _host([step])
    assert drift_reason(reviewed, _host([step.model_copy(update={"plan": "y"})])) is None
    assert "now healthy" in str(drift_reason(reviewed, _host([], HostOutcome.HEALTHY)))
    assert "steps changed" in str(drift_reason(reviewed, _host([])))
    new_items = step.model_copy(update={"items": ["/a", "/b"]})
    assert "new: ['/b']" in str(drift_reason(reviewed, _host([new_items])))
    new_vars = step.model_copy(update={"vars": {"v": 2}})
    assert "vars changed" in str(drift_reason(reviewed, _host([new_vars])))


def test_apply_runs_exactly_the_plan_and_refuses_drifted_hosts(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """Between plan and apply one host changed: it is refused, the other gets exactly its steps."""
    states: dict[str, dict[str, Answer]] = {"a": dict(SICK), "b": dict(SICK)}
    hosts = ["a", "b", "c", "d"]
    scripts = {h: device(states.get(h, {**SICK, "free": "50"})) for h in hosts}
    executor = FakeExecutor(scripts=scripts)
    services = _services(executor, store, tmp_path)
    report = _dry_run(runbook, services)
    assert [h.host for h in report.plan.acting] == ["a", "b"]
    saved = save_plan(report.plan, tmp_path / "plan.json", expires_in=timedelta(hours=1))
    states["b"]["junk"] = "/junk/a\n/junk/b\n/junk/c\n"  # a new item appeared on b
    result = apply_saved_plan(
        saved, runbook, services, user="bob", trigger="user:bob", approve=lambda _p: True
    )
    outcomes = {h.host: h for h in result.hosts}
    assert outcomes["b"].outcome is HostOutcome.DRIFTED
    assert "/junk/c" in outcomes["b"].reason
    assert [
        (c.request.hosts, c.request.extravars["remediate_step"]) for c in executor.playbook_calls
    ] == [
        (("a",), "clean"),
        (("a",), "tidy"),
    ]
    assert executor.playbook_calls[0].request.extravars["remediate_items"] == ["/junk/a", "/junk/b"]
    assert set(outcomes) == {"a", "b"}  # only the reviewed hosts are considered
    assert json.dumps(result.model_dump(mode="json"))  # the report serializes


def test_applying_a_refused_plan_is_an_error(
    runbook: Runbook, store: SqliteStateStore, tmp_path: Path
) -> None:
    """A plan whose run was refused (blast radius) cannot be applied."""
    executor = FakeExecutor(scripts={h: device(SICK) for h in ["a", "b"]})
    services = _services(executor, store, tmp_path)
    report = _dry_run(runbook, services)
    assert report.plan.refused
    saved = save_plan(report.plan, tmp_path / "plan.json", expires_in=timedelta(hours=1))
    with pytest.raises(PlanFileError, match="nothing to apply"):
        apply_saved_plan(
            saved, runbook, services, user="bob", trigger="user:bob", approve=lambda _p: True
        )
    assert executor.playbook_calls == []


def test_a_saved_plan_holds_no_secret_and_applies_without_drift(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    """Secrets in step vars are [REDACTED] in the file; the apply still gets the real value."""
    runbook = load_runbook(DATA / "runbooks" / "secret-param.yml")
    secret = runbook.param_values()["token"]
    sick = {"free": "5", "junk": "/junk/a\n"}
    executor = FakeExecutor(scripts={"a": device(sick)})
    services = _services(executor, store, tmp_path)
    report = _dry_run(runbook, services)
    path = tmp_path / "plan.json"
    save_plan(report.plan, path, expires_in=timedelta(hours=1), secrets=Secrets([secret]))
    assert secret not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    applied = apply_saved_plan(
        load_plan(path), runbook, services, user="bob", trigger="user:bob", approve=lambda _p: True
    )
    assert applied.hosts[0].outcome is HostOutcome.NOT_FIXED  # acted (not drifted); fake fix
    (call,) = executor.playbook_calls
    assert call.request.extravars["auth"] == f"Bearer {secret}"


def test_a_plan_made_with_a_secret_override_is_not_applied(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    """A secret given with -e is not in the saved plan, so applying it is refused, not guessed."""
    runbook = load_runbook(DATA / "runbooks" / "secret-param.yml")
    executor = FakeExecutor(scripts={"a": device({"free": "5", "junk": "/junk/a\n"})})
    services = _services(executor, store, tmp_path)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[all]\na\n")
    request = RunRequest(
        inventory=inventory,
        overrides={"token": "given-on-the-command-line-0123"},
        mode=Mode.DRY_RUN,
        trigger="user:ann",
        user="ann",
    )
    report = run_runbook(runbook, request, services, approve=lambda _p: False)
    path = tmp_path / "plan.json"
    save_plan(report.plan, path, expires_in=timedelta(hours=1))
    assert "given-on-the-command-line" not in path.read_text()
    with pytest.raises(PlanFileError, match=r"secret parameter\(s\) token given with -e"):
        apply_saved_plan(
            load_plan(path), runbook, services, user="bob", trigger="t", approve=lambda _p: True
        )
    assert executor.playbook_calls == []
