"""The pipeline with a FakeExecutor: decisions, guards, blast radius, acting, verify, audit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from engine.audit import AuditLog, configure_audit
from engine.errors import ExecutorError, InventoryError, StateError
from engine.executors.base import (
    CommandResult,
    Executor,
    HostStatus,
    PlaybookRequest,
    PlaybookResult,
    Selection,
    SelectionResult,
)
from engine.executors.fake import FakeExecutor, FakeReply
from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.pipeline import RunReport, RunRequest, Services, run_runbook
from engine.probes import start_probe
from engine.redaction import REDACTED
from engine.runbooks import Runbook, load_runbook
from engine.state.sqlite import SqliteStateStore
from engine.targets import runbook_selection
from tests.support.probing import Answer, device

DATA = Path(__file__).resolve().parent / "data"
SICK: dict[str, Answer] = {"free": "5", "rw": "true", "junk": "/junk/a\n/junk/b\n"}
HEALTHY: dict[str, Answer] = {"free": "50", "rw": "true", "junk": ""}


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def runbook() -> Runbook:
    """The pipeline test runbook."""
    return load_runbook(DATA / "runbooks" / "pipeline.yml")


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SqliteStateStore]:
    """A real SQLite state store in tmp_path."""
    db = SqliteStateStore(tmp_path / "state.db", clock=clock)
    yield db
    db.close()


#: The inventory the runs name.  A FakeExecutor never reads it: its host table is the inventory.
INVENTORY = Path("hosts.ini")


def _inventory(tmp_path: Path, hosts: list[str]) -> Path:
    """A real inventory file, for the runs that resolve their targets with Ansible."""
    path = tmp_path / "hosts.ini"
    path.write_text("\n".join(["[all]", *hosts]) + "\n")
    return path


def _services(executor: Executor, store: SqliteStateStore, clock: Clock, tmp: Path) -> Services:
    ids = count(1)
    return Services(
        executor=executor,
        store=store,
        clock=clock,
        new_run_id=lambda: f"run-{next(ids)}",
        artifacts_dir=tmp / "artifacts",
        sleep=lambda _seconds: None,
    )


def _run(
    runbook: Runbook,
    services: Services,
    inventory: Path,
    mode: Mode = Mode.APPLY,
    *,
    approve: bool = True,
) -> RunReport:
    request = RunRequest(inventory=inventory, mode=mode, trigger="user:test", user="test")
    return run_runbook(runbook, request, services, approve=lambda _plan: approve)


def _outcomes(report: RunReport) -> dict[str, HostOutcome]:
    return {h.host: h.outcome for h in report.hosts}


def _fixing(
    states: dict[str, dict[str, Answer]],
) -> Callable[[PlaybookRequest, str], PlaybookResult]:
    """A playbook answer that makes the host healthy (the next probe sees it)."""

    def answer(_request: PlaybookRequest, host: str) -> PlaybookResult:
        states[host].update(HEALTHY)
        return PlaybookResult(host=host, status=HostStatus.OK)

    return answer


def test_dry_run_plans_without_running_any_playbook(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A dry run plans sick hosts, leaves healthy ones, and starts no playbook."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device(HEALTHY)})
    with capture_logs() as events:
        report = _run(
            runbook,
            _services(executor, store, clock, tmp_path),
            INVENTORY,
            Mode.DRY_RUN,
        )
    assert _outcomes(report) == {"a": HostOutcome.PLANNED, "b": HostOutcome.HEALTHY}
    assert executor.playbook_calls == []
    assert len(executor.script_calls) == 1  # one probe call for all hosts and checks
    (host_a,) = report.plan.acting
    assert [s.id for s in host_a.steps] == ["clean", "tidy"]
    assert host_a.steps[0].items == ["/junk/a", "/junk/b"]
    assert host_a.steps[0].plan == "remove 2 junk files"
    assert host_a.evidence["free"] == 5
    names = [e["event"] for e in events]
    for expected in (
        "run.started",
        "targets.resolved",
        "probe.finished",
        "plan.created",
        "run.finished",
    ):
        assert expected in names
    assert report.status is RunStatus.SUCCEEDED


def test_apply_fixes_and_verifies_on_fresh_probes(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """Apply runs the planned steps in order, re-probes, and ends the host fixed."""
    states = {"a": dict(SICK), "b": dict(HEALTHY)}
    executor = FakeExecutor(
        scripts={h: device(s) for h, s in states.items()},
        playbooks={"a": _fixing(states)},
    )
    with capture_logs() as events:
        report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    assert _outcomes(report) == {"a": HostOutcome.FIXED, "b": HostOutcome.HEALTHY}
    steps = [
        (c.request.hosts, c.request.extravars["remediate_step"]) for c in executor.playbook_calls
    ]
    assert steps == [(("a",), "clean"), (("a",), "tidy")]
    clean = executor.playbook_calls[0].request.extravars
    assert clean["remediate_items"] == ["/junk/a", "/junk/b"]
    tidy = executor.playbook_calls[1].request.extravars
    assert tidy["level"] == "10"
    assert store.last_acted("pipeline-test", "a") == clock.now
    assert store.lock_holder("a") is None
    assert [e["event"] for e in events if e["event"].startswith(("step.", "verify."))] == [
        "step.started",
        "step.finished",
        "step.started",
        "step.finished",
        "verify.finished",
    ]
    run = store.get_run(report.plan.run_id)
    assert run is not None
    assert run.status is RunStatus.SUCCEEDED


def test_guard_blocks_with_its_id_and_message(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """The first blocking guard skips the host and says why; nothing runs."""
    executor = FakeExecutor(scripts={"a": device({**SICK, "rw": "false"})})
    with capture_logs() as events:
        report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    (host,) = report.hosts
    assert host.outcome is HostOutcome.SKIPPED
    assert host.reason == "guard rw: data partition is read-only"
    assert executor.playbook_calls == []
    denied = [e for e in events if e["event"] == "guard.denied"]
    assert denied[0]["guard"] == "rw"


def test_cooldown_skips_a_device_acted_on_recently(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A second run within the cool-down skips the device; after it, the device is acted on."""
    store.mark_acted("pipeline-test", "a", clock.now)
    executor = FakeExecutor(scripts={"a": device(SICK)})
    services = _services(executor, store, clock, tmp_path)
    clock.now += timedelta(minutes=10)
    report = _run(runbook, services, INVENTORY, Mode.DRY_RUN)
    assert report.hosts[0].outcome is HostOutcome.SKIPPED
    assert "cooldown" in report.hosts[0].reason
    assert "last acted 10m ago" in report.hosts[0].reason
    clock.now += timedelta(minutes=25)
    assert _run(runbook, services, INVENTORY, Mode.DRY_RUN).hosts[0].outcome is HostOutcome.PLANNED


def test_lock_held_by_another_run_skips_the_device(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A device locked by another run is skipped, at plan time and at act time."""
    assert store.acquire_lease("a", "other-run", holder="ctl", ttl=timedelta(minutes=5)).lease
    executor = FakeExecutor(scripts={"a": device(SICK)})
    report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    assert report.hosts[0].outcome is HostOutcome.SKIPPED
    assert "other-run" in report.hosts[0].reason
    assert executor.playbook_calls == []


def test_blast_radius_refuses_the_whole_run(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """More sick hosts than max_hosts_pct allows refuses the run; no host is acted on."""
    hosts = [f"h{i}" for i in range(6)]
    executor = FakeExecutor(
        scripts={h: device(SICK if i < 4 else HEALTHY) for i, h in enumerate(hosts)}
    )
    report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    assert report.status is RunStatus.REFUSED
    assert report.plan.refused is not None
    assert "4 hosts need action, the policy allows 3 of 6" in report.plan.refused
    assert {h.outcome for h in report.hosts[:4]} == {HostOutcome.REFUSED}
    assert executor.playbook_calls == []


def test_declined_approval_refuses_destructive_steps(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A destructive plan without approval does not act."""
    executor = FakeExecutor(scripts={"a": device(SICK)})
    report = _run(
        runbook,
        _services(executor, store, clock, tmp_path),
        INVENTORY,
        approve=False,
    )
    assert report.status is RunStatus.REFUSED
    assert report.hosts[0].outcome is HostOutcome.REFUSED
    assert executor.playbook_calls == []


def test_failed_step_stops_the_host_and_the_failure_budget_stops_the_run(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A failing step fails its host; above max_fail_pct later batches do not start."""
    hosts = ["a", "b", "c", "d"]
    executor = FakeExecutor(
        scripts={h: device(SICK if h in {"a", "b"} else HEALTHY) for h in hosts},
        playbooks={"a": HostStatus.FAILED, "b": HostStatus.OK},
    )
    report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    outcomes = _outcomes(report)
    assert outcomes["a"] is HostOutcome.FAILED
    assert outcomes["b"] is HostOutcome.NOT_FIXED  # steps ran, the device still reports sick
    assert report.hosts[0].steps[0].step == "clean"
    assert len(report.hosts[0].steps) == 1  # no step after the failed one
    assert report.status is RunStatus.DEGRADED


def test_failure_budget_skips_later_batches(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """With max_fail_pct 0 and batches of 2, a failure in batch 1 skips batch 2."""
    hosts = [f"h{i}" for i in range(8)]
    scripts = {h: device(SICK if i < 4 else HEALTHY) for i, h in enumerate(hosts)}
    executor = FakeExecutor(scripts=scripts, playbooks={"h0": HostStatus.FAILED})
    report = _run(runbook, _services(executor, store, clock, tmp_path), INVENTORY)
    outcomes = _outcomes(report)
    assert outcomes["h0"] is HostOutcome.FAILED
    assert outcomes["h2"] is HostOutcome.SKIPPED
    assert outcomes["h3"] is HostOutcome.SKIPPED
    assert "max_fail_pct" in report.hosts[2].reason
    assert report.status is RunStatus.ABORTED
    assert all("h2" not in c.request.hosts for c in executor.playbook_calls)


def test_unreachable_and_failed_checks_are_outcomes(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """An unreachable host and a failing symptom check end as outcomes, not exceptions."""
    executor = FakeExecutor(
        scripts={"a": FakeReply(unreachable="ssh: connect refused"), "b": device({"rw": "true"})}
    )
    report = _run(
        runbook,
        _services(executor, store, clock, tmp_path),
        INVENTORY,
        Mode.DRY_RUN,
    )
    outcomes = _outcomes(report)
    assert outcomes == {"a": HostOutcome.UNREACHABLE, "b": HostOutcome.ERROR}
    assert "check 'free' failed" in report.hosts[1].reason
    assert report.status is RunStatus.DEGRADED


def test_secret_params_are_redacted_in_plan_and_audit(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A param marked secret never appears in the plan or the audit events."""
    executor = FakeExecutor(scripts={"a": device(SICK)})
    with capture_logs() as events:
        report = _run(
            runbook,
            _services(executor, store, clock, tmp_path),
            INVENTORY,
            Mode.DRY_RUN,
        )
    assert report.plan.params["token"] == REDACTED
    started = next(e for e in events if e["event"] == "run.started")
    assert started["secret_keys"] == ["token"]


def test_secret_values_reach_the_playbook_and_nothing_that_is_kept(
    store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A secret param goes to the playbook as is, and as [REDACTED] to reports, records, audit."""
    secret = "s3cr3t-override-0123456789"  # noqa: S105 - a test secret
    runbook = load_runbook(DATA / "runbooks" / "secret-param.yml")
    # The device's own evidence shows the secret too (a file named after it).
    sick = {"free": "5", "junk": f"/junk/{secret}.tmp\n"}

    def refused(request: PlaybookRequest, host: str) -> PlaybookResult:
        return PlaybookResult(
            host=host,
            status=HostStatus.FAILED,
            message=f"curl: 401 with Authorization: {request.extravars['auth']}",
        )

    executor = FakeExecutor(scripts={"a": device(sick)}, playbooks={"a": refused})
    audit = tmp_path / "audit.jsonl"
    configure_audit(AuditLog(audit), clock=clock)
    try:
        request = RunRequest(
            inventory=INVENTORY,
            overrides={"token": secret},
            mode=Mode.APPLY,
            trigger="user:test",
            user="test",
        )
        report = run_runbook(
            runbook, request, _services(executor, store, clock, tmp_path), approve=lambda _p: True
        )
    finally:
        structlog.reset_defaults()
    (call,) = executor.playbook_calls
    assert call.request.extravars["auth"] == f"Bearer {secret}"
    assert call.request.extravars["remediate_items"] == [f"/junk/{secret}.tmp"]
    assert secret in call.request.secret_values
    assert report.hosts[0].outcome is HostOutcome.FAILED
    assert report.hosts[0].reason.endswith(f"Authorization: Bearer {REDACTED}")
    assert report.plan.hosts[0].steps[0].vars == {"auth": f"Bearer {REDACTED}"}
    assert secret not in report.model_dump_json()
    (record,) = store.host_records(report.plan.run_id)
    assert secret not in record.reason
    assert REDACTED in record.reason
    assert secret not in audit.read_text()
    assert f"/junk/{REDACTED}.tmp" in audit.read_text()


def test_recheck_skips_a_step_no_longer_needed(
    store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A step marked recheck is skipped when a fresh probe shows the symptom gone."""
    text = (DATA / "runbooks" / "pipeline.yml").read_text()
    text = text.replace('    plan: "tidy up"', '    plan: "tidy up"\n    recheck: true')
    text = text.replace(
        'verify: "checks.free >= params.free_min"',
        "verify:\n  expr: checks.free >= params.free_min\n"
        '  explain: "{{ checks.free }}% free, {{ checks.junk | length }} junk files left"',
    )
    path = tmp_path / "runbooks" / "pipeline.yml"
    path.parent.mkdir()
    path.write_text(text)
    rechecking = load_runbook(path, playbooks_dir=DATA / "playbooks")
    states = {"a": dict(SICK), "b": dict(SICK)}
    executor = FakeExecutor(
        scripts={h: device(s) for h, s in states.items()},
        playbooks={"a": _fixing(states)},  # "clean" fixes a; b stays sick
        hosts=["a", "b", "c", "d"],  # c and d do not answer: they count for the blast radius
    )
    report = _run(
        rechecking,
        _services(executor, store, clock, tmp_path),
        INVENTORY,
    )
    by_host = {h.host: h for h in report.hosts}
    assert [(s.step, s.status) for s in by_host["a"].steps] == [
        ("clean", HostStatus.OK),
        ("tidy", None),
    ]
    assert [s.step for s in by_host["b"].steps] == ["clean", "tidy"]
    assert by_host["a"].outcome is HostOutcome.FIXED
    assert by_host["b"].outcome is HostOutcome.NOT_FIXED
    assert by_host["b"].reason.endswith("; 5% free, 2 junk files left")


class PlainExecutor:
    """An executor that runs scripts and playbooks but cannot select hosts itself."""

    def __init__(self, inner: FakeExecutor) -> None:
        self.inner = inner

    def run_script(
        self, inventory: Path, hosts: Sequence[str], script: str, *, timeout: float
    ) -> Mapping[str, CommandResult]:
        return self.inner.run_script(inventory, hosts, script, timeout=timeout)

    def run_playbook(
        self, inventory: Path, request: PlaybookRequest, *, artifacts_dir: Path
    ) -> Mapping[str, PlaybookResult]:
        return self.inner.run_playbook(inventory, request, artifacts_dir=artifacts_dir)


class BrokenSelector(FakeExecutor):
    """A selecting executor whose host selection fails as a tool would."""

    def select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> SelectionResult:
        del script, timeout
        raise ExecutorError(f"ansible-playbook failed on {selection.inventory}")


def test_targets_and_first_probe_come_from_one_executor_call(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A selecting executor resolves the targets and probes them in one call, audited as before."""
    executor = FakeExecutor(scripts={"a": device(SICK), "b": device(HEALTHY)})
    with capture_logs() as events:
        _run(
            runbook,
            _services(executor, store, clock, tmp_path),
            INVENTORY,
            Mode.DRY_RUN,
        )
    (call,) = executor.script_calls
    assert call.hosts == ("a", "b")
    names = [e["event"] for e in events]
    assert names.index("targets.resolved") < names.index("probe.finished")
    resolved = next(e for e in events if e["event"] == "targets.resolved")
    assert resolved["hosts"] == ["a", "b"]


def test_executor_without_host_selection_resolves_then_probes(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """An executor that cannot select hosts gets the resolved targets to probe, in one call."""
    inner = FakeExecutor(scripts={"a": device(SICK), "b": device(HEALTHY)})
    report = _run(
        runbook,
        _services(PlainExecutor(inner), store, clock, tmp_path),
        _inventory(tmp_path, ["a", "b"]),
        Mode.DRY_RUN,
    )
    assert _outcomes(report) == {"a": HostOutcome.PLANNED, "b": HostOutcome.HEALTHY}
    (call,) = inner.script_calls
    assert call.hosts == ("a", "b")


def test_failed_selection_names_the_bad_inventory(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """When selecting fails, a bad inventory is the InventoryError; otherwise the tool's error."""
    services = _services(BrokenSelector(), store, clock, tmp_path)
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unclosed\n")
    with pytest.raises(InventoryError, match=r"bad\.yml: .*[Ff]ailed to parse"):
        _run(runbook, services, bad, Mode.DRY_RUN)
    with pytest.raises(ExecutorError, match="ansible-playbook failed"):
        _run(runbook, services, _inventory(tmp_path, ["a"]), Mode.DRY_RUN)


class _Pending:
    """A background call of :class:`BackgroundSelector`: runs when collected, records a cancel."""

    def __init__(self, executor: BackgroundSelector, selection: Selection, script: str) -> None:
        self.executor, self.selection, self.script = executor, selection, script
        self.collected = self.cancelled = False

    def result(self) -> SelectionResult:
        self.collected = True
        return FakeExecutor.select_and_run_script(
            self.executor, self.selection, self.script, timeout=1
        )

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def fate(self) -> tuple[bool, bool]:
        """(collected, cancelled)."""
        return self.collected, self.cancelled


class BackgroundSelector(FakeExecutor):
    """A selecting executor that can start its selection ahead, as the Ansible one does."""

    def __init__(self, scripts: Mapping[str, FakeReply | Callable[[str], object]]) -> None:
        super().__init__(scripts=scripts)  # type: ignore[arg-type]
        self.started: list[_Pending] = []

    def select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> SelectionResult:
        del selection, script, timeout
        raise AssertionError("the pipeline collects the started call instead")

    def start_select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> _Pending:
        del timeout
        self.started.append(_Pending(self, selection, script))
        return self.started[-1]


def test_first_probe_started_ahead_is_collected_after_run_started(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A probe an entry point started ahead is the run's only probe, audited after run.started."""
    executor = BackgroundSelector(scripts={"a": device(SICK), "b": device(HEALTHY)})
    selection = runbook_selection(runbook, INVENTORY, None)
    with (
        start_probe(executor, selection, runbook.spec.checks, runbook.param_values()) as first,
        capture_logs() as events,
    ):
        (pending,) = executor.started
        assert pending.fate == (False, False)
        request = RunRequest(inventory=INVENTORY, mode=Mode.DRY_RUN, trigger="user:t", user="t")
        report = run_runbook(
            runbook,
            request,
            _services(executor, store, clock, tmp_path),
            approve=lambda _plan: False,
            first_probe=first,
        )
    assert pending.fate == (True, False)
    assert executor.started == [pending]
    assert _outcomes(report) == {"a": HostOutcome.PLANNED, "b": HostOutcome.HEALTHY}
    names = [e["event"] for e in events]
    assert names[0] == "run.started"
    assert names.index("targets.resolved") < names.index("probe.finished")


def test_first_probe_of_another_request_is_refused_and_stopped(
    runbook: Runbook, store: SqliteStateStore, clock: Clock, tmp_path: Path
) -> None:
    """A probe started for other hosts or params is never taken for this run's; it is stopped."""
    executor = BackgroundSelector(scripts={"a": device(SICK), "b": device(HEALTHY)})
    request = RunRequest(inventory=INVENTORY, mode=Mode.DRY_RUN, trigger="user:t", user="t")
    services = _services(executor, store, clock, tmp_path)
    checks, params = runbook.spec.checks, runbook.param_values()
    for selection, probe_params in (
        (runbook_selection(runbook, INVENTORY, "a"), params),
        (runbook_selection(runbook, INVENTORY, None), {**params, "free_min": 99}),
    ):
        with (
            pytest.raises(ValueError, match="started for another run"),
            start_probe(executor, selection, checks, probe_params) as first,
        ):
            run_runbook(runbook, request, services, approve=lambda _p: False, first_probe=first)
        assert executor.started[-1].fate == (False, True)


def test_first_probe_left_uncollected_is_cancelled(runbook: Runbook) -> None:
    """Leaving the block of a started probe without its result (a store that failed) stops it."""
    executor = BackgroundSelector(scripts={"a": device(SICK)})
    selection = runbook_selection(runbook, INVENTORY, None)
    with (
        pytest.raises(StateError),
        start_probe(executor, selection, runbook.spec.checks, runbook.param_values()),
    ):
        raise StateError("state store: cannot open")
    (pending,) = executor.started
    assert pending.fate == (False, True)
