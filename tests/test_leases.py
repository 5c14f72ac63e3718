"""Runs on several controllers at once: device leases, fencing and fleet-wide admission.

The pipeline with a FakeExecutor on each state backend: two runs of one runbook cannot
together exceed its blast radius; a run that loses a device's lease stops acting on it,
its late results are refused, and it ends interrupted, with the lease's token audited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from structlog.testing import capture_logs

from engine.errors import StateError
from engine.executors.base import HostStatus, PlaybookRequest, PlaybookResult
from engine.executors.fake import FakeExecutor
from engine.leases import LeaseKeeper
from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.pipeline import RunReport, RunRequest, Services, run_runbook
from engine.runbooks import Runbook, load_runbook
from engine.state import AlertStore, Lease, LeaseGrant, StateStore
from tests.support.probing import Answer, device
from tests.support.stores import Backend

DATA = Path(__file__).resolve().parent / "data"
SICK: dict[str, Answer] = {"free": "5", "rw": "true", "junk": ""}
HEALTHY: dict[str, Answer] = {"free": "50", "rw": "true", "junk": ""}
HOSTS = ["a", "b", "c", "d"]


@pytest.fixture
def runbook() -> Runbook:
    """The pipeline test runbook (max_hosts_pct 50, serial 2)."""
    return load_runbook(DATA / "runbooks" / "pipeline.yml")


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    """Four hosts."""
    path = tmp_path / "hosts.ini"
    path.write_text("\n".join(["[all]", *HOSTS]) + "\n")
    return path


def _executor(act: Callable[[PlaybookRequest, str], PlaybookResult]) -> FakeExecutor:
    states = {h: dict(SICK) for h in HOSTS}

    def answer(request: PlaybookRequest, host: str) -> PlaybookResult:
        result = act(request, host)
        states[host].update(HEALTHY)
        return result

    return FakeExecutor(
        scripts={h: device(states[h]) for h in HOSTS}, playbooks=dict.fromkeys(HOSTS, answer)
    )


def _services(
    executor: FakeExecutor, store: StateStore, backend: Backend, tmp: Path, name: str
) -> Services:
    ids = count(1)
    return Services(
        executor=executor,
        store=store,
        clock=backend.clock,
        new_run_id=lambda: f"{name}-{next(ids)}",
        artifacts_dir=tmp / "artifacts",
        sleep=lambda _seconds: None,
        holder=name,
        lease_ttl=timedelta(seconds=1),
    )


def _run(runbook: Runbook, services: Services, inventory: Path, limit: str) -> RunReport:
    request = RunRequest(
        inventory=inventory,
        limit=limit,
        mode=Mode.APPLY,
        trigger="user:test",
        user="test",
        fleet=len(HOSTS),
    )
    return run_runbook(runbook, request, services, approve=lambda _plan: True)


def _ok(_request: PlaybookRequest, host: str) -> PlaybookResult:
    return PlaybookResult(host=host, status=HostStatus.OK)


def test_two_runs_of_one_runbook_cannot_together_exceed_its_blast_radius(
    backend: Backend, runbook: Runbook, inventory: Path, tmp_path: Path
) -> None:
    """While one run acts on 2 of 4 hosts (max 50 %), a second on a third host is refused."""
    acting, release = threading.Event(), threading.Event()

    def slow(request: PlaybookRequest, host: str) -> PlaybookResult:
        acting.set()
        release.wait(30)
        return _ok(request, host)

    first_store, second_store = backend.store(), backend.store()
    first = _services(_executor(slow), first_store, backend, tmp_path, "ctl1")
    second = _services(_executor(_ok), second_store, backend, tmp_path, "ctl2")
    reports: list[RunReport] = []
    thread = threading.Thread(target=lambda: reports.append(_run(runbook, first, inventory, "a:b")))
    thread.start()
    try:
        assert acting.wait(30)
        refused = _run(runbook, second, inventory, "c")
    finally:
        release.set()
        thread.join(30)
    assert refused.status is RunStatus.REFUSED
    assert refused.plan.refused is not None
    assert "other runs of pipeline-test act on 2 (a, b)" in refused.plan.refused
    assert {h.outcome for h in reports[0].hosts} == {HostOutcome.FIXED}
    after = _run(runbook, second, inventory, "c")  # the first run's hosts are free again
    assert after.status is RunStatus.SUCCEEDED
    first_store.close()
    second_store.close()


class _Partitioned:
    """A real store whose lease renewals fail once ``cut`` is set (a network partition)."""

    def __init__(self, store: AlertStore) -> None:
        self._store = store
        self.cut = threading.Event()

    def renew_leases(self, leases: Any, ttl: timedelta) -> Any:
        if self.cut.is_set():
            raise StateError("partitioned: cannot reach the database")
        return self._store.renew_leases(leases, ttl)

    def renew_admission(self, run_id: str, ttl: timedelta) -> bool:
        if self.cut.is_set():
            raise StateError("partitioned: cannot reach the database")
        return self._store.renew_admission(run_id, ttl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_run_that_loses_its_lease_stops_and_its_late_results_are_refused(
    backend: Backend, runbook: Runbook, inventory: Path, tmp_path: Path
) -> None:
    """Cut off mid-step, a run's lease expires and passes on: it ends interrupted, not fixed."""
    store = _Partitioned(backend.store())
    other = backend.store()
    taken: list[Any] = []

    def cut_off(request: PlaybookRequest, host: str) -> PlaybookResult:
        store.cut.set()
        backend.advance(timedelta(seconds=1.5))  # the lease expires on the store's clock
        taken.append(other.acquire_lease(host, "rescuer", holder="ctl2", ttl=timedelta(hours=1)))
        return _ok(request, host)

    services = _services(_executor(cut_off), cast("StateStore", store), backend, tmp_path, "ctl1")
    with capture_logs() as events:
        report = _run(runbook, services, inventory, "a")
    (grant,) = taken
    assert grant.lease is not None
    (interrupted,) = grant.interrupted
    run_id = report.plan.run_id
    assert interrupted.run_id == run_id
    ((host,),) = [(h.host,) for h in report.hosts]
    assert host == "a"
    assert report.hosts[0].outcome is HostOutcome.INTERRUPTED
    assert "lease lost" in report.hosts[0].reason
    assert report.status is RunStatus.INTERRUPTED
    stored = other.get_run(run_id)
    assert stored is not None
    assert stored.status is RunStatus.INTERRUPTED
    assert other.last_acted("pipeline-test", "a") is None  # the fenced cool-down was refused
    acquired = next(e for e in events if e["event"] == "lease.acquired")
    assert acquired["token"] < grant.lease.token
    assert any(e["event"] == "lease.lost" and e["host"] == "a" for e in events)
    store.cut.clear()
    other.close()


def test_leases_are_renewed_while_a_playbook_runs(
    backend: Backend, runbook: Runbook, inventory: Path, tmp_path: Path
) -> None:
    """A step longer than the lease's time to live keeps the device: the lease is renewed."""
    store = backend.store()
    other = backend.store()
    seen: list[Any] = []

    def long_step(request: PlaybookRequest, host: str) -> PlaybookResult:
        for _ in range(3):
            backend.advance(timedelta(seconds=0.6))
            seen.append(other.acquire_lease(host, "intruder", holder="x", ttl=timedelta(1)).lease)
        return _ok(request, host)

    services = _services(_executor(long_step), store, backend, tmp_path, "ctl1")
    if backend.name == "sqlite":  # the injected clock moves with no time passing: renew now
        services = _renewing_on_advance(services, backend)
    report = _run(runbook, services, inventory, "a")
    assert seen == [None, None, None]
    assert report.status is RunStatus.SUCCEEDED
    structlog.reset_defaults()
    store.close()
    other.close()


def _renewing_on_advance(services: Services, backend: Backend) -> Services:
    """For SQLite's injected clock: moving it on lets the renewer thread run first."""
    advance = backend.advance

    def advance_and_wait(delta: timedelta) -> None:
        threading.Event().wait(0.4)  # a renewal (every third of 1 s) happens meanwhile
        advance(delta)

    backend.advance = advance_and_wait  # type: ignore[method-assign]
    return services


class _DatabaseAway:
    """A store whose database went away once a lease was taken: every renewal fails."""

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.lease = Lease(
            host="a", run_id="r1", holder="ctl", token=7, acquired_at=now, expires_at=now
        )

    def acquire_lease(self, *_args: object, **_kwargs: object) -> LeaseGrant:
        return LeaseGrant(lease=self.lease)

    def renew_leases(self, *_args: object) -> list[Lease]:
        raise StateError("postgresql://db/remediate: state store cannot renew: connection refused")

    def renew_admission(self, *_args: object) -> None:
        raise AssertionError("not reached: the lease renewal failed first")

    def release_lease(self, *_args: object) -> None:
        raise StateError(
            "postgresql://db/remediate: state store cannot release: connection refused"
        )


def _audit_away(_logger: object, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """An audit processor whose database (the same one) is away too."""
    if event["event"] != "lease.acquired":
        raise StateError("postgresql://db/remediate: cannot append to the audit chain")
    return event


def test_renewer_outlives_an_audit_log_that_is_away_with_its_database(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Renewals and their warnings both failing: the renewer goes on and marks the lease lost."""
    structlog.configure(processors=[_audit_away, structlog.processors.JSONRenderer()])
    try:
        keeper = LeaseKeeper(
            cast("StateStore", _DatabaseAway()),
            run_id="r1",
            holder="ctl",
            ttl=timedelta(seconds=0.3),
            max_hold=timedelta(minutes=5),
        )
        with keeper:
            assert keeper.acquire("a").lease is not None
            deadline = time.monotonic() + 10
            while "a" not in keeper.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            renewer = [t for t in threading.enumerate() if t.name == "remediate-leases-r1"]
            assert [t.is_alive() for t in renewer] == [True]
        assert "could not renew it" in keeper.lost["a"]
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "lease.renew_failed" in err
    assert "lease.lost" in err
    assert "not audited: postgresql://db/remediate: cannot append" in err
