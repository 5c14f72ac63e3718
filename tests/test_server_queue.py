"""The durable queue, the worker pool and the circuit breaker, with a FakeExecutor."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from engine.audit import AuditLog, configure_audit
from engine.executors.base import HostStatus, PlaybookRequest, PlaybookResult
from engine.executors.fake import FakeExecutor
from engine.outcomes import Mode, RunStatus
from engine.server.app import create_app
from engine.server.breaker import CircuitBreaker
from engine.server.config import ServerConfig
from engine.server.metrics import ServerMetrics
from engine.server.queue import FiringInput, FiringOutcome, QueueRoute, QueueState, ResolvedInput
from engine.server.runtime import WebhookServer
from engine.state import ApprovalStatus
from engine.state.sqlite import SqliteAlertStore
from engine.state.sqlite.migrations import MIGRATIONS
from tests.support.probing import encode_records
from tests.support.webhook import (
    ENGINE_RUNBOOK,
    FLEET,
    TOKEN,
    AppClient,
    Project,
    alert,
    body,
    fake_resolver,
    fleet_executor,
    wait_for,
    write_project,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _firing(fingerprint: str, host: str, runbook: str = "engine-down") -> FiringInput:
    return FiringInput(
        fingerprint=fingerprint,
        starts_at=T0,
        alertname="BalenaEngineDown",
        labels={"instance": host},
        outcome=FiringOutcome.QUEUED,
        reason="",
        routes=(QueueRoute(runbook=runbook, host=host, trigger_mode="apply", mode=Mode.APPLY),),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteAlertStore]:
    """A real SQLite alert store."""
    with SqliteAlertStore(tmp_path / "state.db", clock=lambda: T0) as db:
        yield db


def test_rebuilding_the_alert_tables_keeps_rows_ids_and_references(tmp_path: Path) -> None:
    """Migration 4 (start time first) keeps firings, queue rows, the id counter, dedup, cascade."""
    path = tmp_path / "state.db"
    with SqliteAlertStore(path, clock=lambda: T0, migrations=MIGRATIONS[:3]) as old:
        stamp = T0.isoformat(timespec="microseconds")
        for fingerprint, host in (("a1", "dev-a"), ("a2", "dev-b"), ("a3", "dev-c")):
            old._db.execute(  # what the engine of migration 3 wrote
                "INSERT INTO alert_firings VALUES (?, ?, 'X', '{}', 'firing', 'queued', '',"
                " ?, ?, 1, NULL)",
                (fingerprint, stamp, stamp, stamp),
            )
            old._db.execute(
                "INSERT INTO alert_queue (fingerprint, starts_at, runbook, host, trigger_mode,"
                " mode, state, reason, enqueued_at)"
                " VALUES (?, ?, 'engine-down', ?, 'apply', 'apply', 'queued', '', ?)",
                (fingerprint, stamp, host, stamp),
            )
        firings, items = old.list_firings(), old.list_queue()
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("DELETE FROM alert_queue WHERE item_id = ?", (items[0].item_id,))
    with SqliteAlertStore(path, clock=lambda: T0) as new:
        assert new.schema_version() == len(MIGRATIONS)
        assert new.list_firings() == firings
        assert new.list_queue() == items[1:]
        again = new.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
        assert again.deduplicated
        assert not again.queued
        fresh = new.record_alerts([_firing("a4", "dev-d")], [], now=T0, hold_reason=None)
        assert fresh.queued[0].item_id == items[0].item_id + 1  # the deleted id is not reused
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        key = raw.execute("PRAGMA index_info(sqlite_autoindex_alert_firings_1)").fetchall()
        assert [column for _, _, column in key] == ["starts_at", "fingerprint"]
        raw.execute("PRAGMA foreign_keys = ON")
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        raw.execute("DELETE FROM alert_firings WHERE fingerprint = 'a2'")
        hosts = {h for (h,) in raw.execute("SELECT host FROM alert_queue").fetchall()}
    assert hosts == {"dev-a", "dev-d"}  # dev-b's item went with its firing; dev-c's was deleted


def test_alert_store_commits_with_synchronous_full(store: SqliteAlertStore) -> None:
    """Every commit syncs the write-ahead log (PRAGMA synchronous = FULL)."""
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)


def _breaker(store: SqliteAlertStore, clock: Clock) -> CircuitBreaker:
    config = ServerConfig.model_validate(
        {
            "inventory": "hosts.ini",
            "auth": {"token": TOKEN},
            "breaker": {"max_alerting_pct": 50, "min_alerting_devices": 2},
        }
    )
    return CircuitBreaker(
        config.breaker,
        clock=clock,
        fleet_size=lambda: 3,
        metrics=ServerMetrics(store.queue_counts),
    )


def _resolved(fingerprint: str) -> ResolvedInput:
    return ResolvedInput(
        fingerprint=fingerprint, starts_at=T0, alertname="BalenaEngineDown", labels={}
    )


def test_devices_whose_alerts_resolved_do_not_count_towards_a_storm(
    store: SqliteAlertStore,
) -> None:
    """Two devices had runs queued but both alerts resolved: the exact count says no storm."""
    clock = Clock()
    breaker = _breaker(store, clock)
    store.record_alerts(
        [_firing("a1", "dev-a"), _firing("b1", "dev-b")], [], now=T0, hold_reason=None
    )
    store.record_alerts([], [_resolved("a1"), _resolved("b1")], now=T0, hold_reason=None)
    assert not breaker.refresh(store).open
    store.record_alerts(
        [_firing("c1", "dev-c"), _firing("a2", "dev-a")], [], now=T0, hold_reason=None
    )
    status = breaker.refresh(store)
    assert status.open
    assert "at least 2 of 3 devices" in status.reason


def test_runs_queued_before_the_window_do_not_count_towards_a_storm(
    store: SqliteAlertStore,
) -> None:
    """Hosts whose last run was queued before the window are not alerting now."""
    clock = Clock()
    breaker = _breaker(store, clock)
    store.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
    assert not breaker.refresh(store).open
    clock.now = T0 + timedelta(minutes=11)
    store.record_alerts([_firing("b1", "dev-b")], [], now=clock.now, hold_reason=None)
    assert not breaker.refresh(store).open
    store.record_alerts([_firing("c1", "dev-c")], [], now=clock.now, hold_reason=None)
    assert breaker.refresh(store).open


# --------------------------------------------------------------------------- with workers


class Device:
    """A fake engine-down device: probes say down until a playbook restarts it (if it can)."""

    def __init__(self, *, fixable: bool = True) -> None:
        self.up = False
        self.fixable = fixable
        self.gate: threading.Event | None = None

    def probe(self, script: str) -> str:
        return encode_records(script, {"up": "true" if self.up else "false"})

    def act(self, request: PlaybookRequest, host: str) -> PlaybookResult:
        del request
        if self.gate is not None:
            self.gate.wait(30)
        self.up = self.fixable
        return PlaybookResult(host=host, status=HostStatus.OK)


ServerFactory = Callable[..., tuple[WebhookServer, AppClient]]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """The engine-down runbook (apply) over a three-device fleet."""
    return write_project(tmp_path, runbooks={"engine.yml": ENGINE_RUNBOOK})


@pytest.fixture
def audit_path(tmp_path: Path) -> Iterator[Path]:
    """Events go to a real audit log."""
    path = tmp_path / "audit.jsonl"
    configure_audit(AuditLog(path))
    yield path
    structlog.reset_defaults()


@pytest.fixture
def make_server(project: Project, audit_path: Path) -> Iterator[ServerFactory]:
    """A started server whose workers use a FakeExecutor."""
    del audit_path
    made: list[tuple[WebhookServer, AppClient]] = []

    def make(
        executor: FakeExecutor, clock: Clock | None = None, **fields: Any
    ) -> tuple[WebhookServer, AppClient]:
        config = ServerConfig.model_validate(
            {"inventory": project.inventory, "auth": {"token": TOKEN}, **fields}
        )
        server = WebhookServer(
            config,
            project.settings(),
            clock=clock or Clock(),
            executor=executor,
            resolve=fake_resolver(FLEET),
        )
        server.start()
        client = AppClient(create_app(server))
        made.append((server, client))
        return server, client

    yield make
    for server, client in made:
        client.close()
        server.stop(timeout=30)
        server.close()


def _down(host_edge: str, fingerprint: str) -> dict[str, Any]:
    return alert(
        {"alertname": "BalenaEngineDown", "instance": f"{host_edge}:9100", "job": "node"},
        fingerprint=fingerprint,
    )


def _executor(devices: dict[str, Device]) -> FakeExecutor:
    return fleet_executor(
        scripts={name: d.probe for name, d in devices.items()},
        playbooks={name: d.act for name, d in devices.items()},
    )


def _settled(server: WebhookServer, count: int) -> Callable[[], bool]:
    ended = {QueueState.DONE, QueueState.FAILED}
    return lambda: sum(i.state in ended for i in server.store.list_queue()) >= count


def test_a_worker_runs_the_queued_item_once_on_exactly_that_host(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """The queued apply run acts on the one routed host, as alertmanager, and is recorded done."""
    devices = {name: Device() for name in FLEET}
    executor = _executor(devices)
    server, client = make_server(executor, workers=2)
    assert (
        client.post("/webhook", json=body(_down("b1b2c3d.balena", "f1")), headers=AUTH).json()[
            "queued"
        ]
        == 1
    )
    wait_for("the run to finish", _settled(server, 1))
    (item,) = server.store.list_queue()
    assert (item.state, item.run_status) == (QueueState.DONE, RunStatus.SUCCEEDED)
    assert [c.request.hosts for c in executor.playbook_calls] == [("dev-b",)]
    run = server.store.get_run(item.run_id or "")
    assert run is not None
    assert (run.trigger, run.mode) == ("alert:f1", Mode.APPLY)
    assert devices["dev-b"].up
    assert not devices["dev-a"].up
    events = [json.loads(line)["event"] for line in audit_path.read_text().splitlines()]
    assert {
        "alert.received",
        "queue.started",
        "run.started",
        "run.finished",
        "queue.finished",
    } <= set(events)
    metrics = client.get("/metrics").text
    assert 'remediate_runs_total{outcome="succeeded"} 1.0' in metrics
    assert 'remediate_run_duration_seconds_count{runbook="engine-down"} 1.0' in metrics


def test_failures_open_the_breaker_and_later_runs_are_held(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """More failed runs than max_failures open the breaker; new firings are recorded held."""
    devices = {name: Device(fixable=False) for name in FLEET}
    executor = _executor(devices)
    server, client = make_server(
        executor,
        workers=1,
        breaker={"max_failures": 1, "min_alerting_devices": 3, "max_alerting_pct": 100},
    )
    client.post("/webhook", json=body(_down("a1b2c3d.balena", "f1")), headers=AUTH)
    wait_for("the first run", _settled(server, 1))
    client.post("/webhook", json=body(_down("b1b2c3d.balena", "f2")), headers=AUTH)
    wait_for("the second run", _settled(server, 2))
    wait_for("the breaker to open", lambda: client.get("/healthz").json()["breaker"]["open"])
    health = client.get("/healthz").json()
    assert health["status"] == "breaker-open"
    assert "2 alert-triggered runs failed" in health["breaker"]["reason"]
    third = client.post("/webhook", json=body(_down("c1b2c3d.balena", "f3")), headers=AUTH).json()
    assert (third["queued"], third["held"]) == (0, 1)
    assert len(executor.playbook_calls) == 2
    assert "remediate_circuit_breaker_open 1.0" in client.get("/metrics").text
    (held,) = server.store.list_queue(QueueState.HELD)
    assert held.reason.startswith("circuit breaker open")
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    *_, last = [r for r in records if r["event"] == "alert.received"]
    (entry,) = last["notifications"][0]["alerts"]
    assert (entry["outcome"], entry["reason"]) == ("held", held.reason)
    assert [run["item"] for run in entry["runs"]] == [held.item_id]
    reset = client.post("/breaker/reset", headers=AUTH)
    assert reset.json()["breaker"]["open"] is False
    assert "remediate_circuit_breaker_open 0.0" in client.get("/metrics").text


def test_an_alert_storm_opens_the_breaker_before_anything_runs(make_server: ServerFactory) -> None:
    """Most of the fleet alerting at once opens the breaker; the storm's runs are all held."""
    devices = {name: Device() for name in FLEET}
    executor = _executor(devices)
    server, client = make_server(
        executor, workers=2, breaker={"max_alerting_pct": 50, "min_alerting_devices": 2}
    )
    storm = body(_down("a1b2c3d.balena", "s1"), _down("b1b2c3d.balena", "s2"))
    answer = client.post("/webhook", json=storm, headers=AUTH).json()
    assert answer["queued"] == 2
    wait_for(
        "the storm's runs to be held",
        lambda: len(server.store.list_queue(QueueState.HELD)) == 2,
    )
    assert executor.playbook_calls == []
    assert client.get("/healthz").json()["breaker"]["open"]


def test_the_breaker_closes_after_the_cool_off_and_survives_a_restart(
    make_server: ServerFactory,
) -> None:
    """An open breaker is still open after a restart, and closes once the cool-off passed."""
    clock = Clock()
    breaker = {"max_alerting_pct": 50, "min_alerting_devices": 2, "cool_off": "10m"}
    server, client = make_server(FakeExecutor(), clock, workers=0, breaker=breaker)
    client.post(
        "/webhook",
        json=body(_down("a1b2c3d.balena", "s1"), _down("b1b2c3d.balena", "s2")),
        headers=AUTH,
    )
    wait_for("the breaker to open", lambda: server.breaker.status.open)
    again, again_client = make_server(FakeExecutor(), clock, workers=0, breaker=breaker)
    assert again.breaker.status.open
    clock.now += timedelta(minutes=11)
    assert again_client.get("/healthz").json()["breaker"]["open"] is False


def test_stop_waits_then_interrupts_a_run_that_outlives_the_timeout(
    make_server: ServerFactory, audit_path: Path
) -> None:
    """On stop, a run past the shutdown timeout is marked interrupted; queued items stay queued."""
    devices = {name: Device() for name in FLEET}
    gate = threading.Event()
    devices["dev-a"].gate = gate
    executor = _executor(devices)
    server, client = make_server(executor, workers=1)
    client.post("/webhook", json=body(_down("a1b2c3d.balena", "f1")), headers=AUTH)
    wait_for("the run to act", lambda: len(executor.playbook_calls) == 1)
    client.post("/webhook", json=body(_down("b1b2c3d.balena", "f2")), headers=AUTH)
    interrupted = server.stop(timeout=0.2)
    gate.set()
    assert [i.fingerprint for i in interrupted] == ["f1"]
    states = {i.fingerprint: i.state for i in server.store.list_queue()}
    assert states == {"f1": QueueState.INTERRUPTED, "f2": QueueState.QUEUED}
    run = server.store.get_run(interrupted[0].run_id or "")
    assert run is not None
    assert run.status is RunStatus.INTERRUPTED
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    (event,) = [r for r in records if r["event"] == "run.interrupted"]
    assert event["run_id"] == run.run_id


APPROVER_TOKEN = "alice-token-0123456789"  # noqa: S105 - a test credential


def test_approve_mode_waits_for_an_approver_then_applies_the_plan(
    project: Project, make_server: ServerFactory, audit_path: Path
) -> None:
    """An approve trigger plans and waits; only an approver's token decides; then it applies."""
    runbook = project.runbooks / "engine.yml"
    runbook.write_text(ENGINE_RUNBOOK.replace("mode: apply", "mode: approve"))
    devices = {name: Device() for name in FLEET}
    executor = _executor(devices)
    server, client = make_server(
        executor, workers=1, approvals={"approvers": {"alice": APPROVER_TOKEN}}
    )
    client.post("/webhook", json=body(_down("b1b2c3d.balena", "f1")), headers=AUTH)
    wait_for("the dry run", _settled(server, 1))
    assert executor.playbook_calls == []
    listed = client.get("/approvals?status=pending", headers=AUTH).json()["approvals"]
    (pending,) = listed
    assert pending["source"] == "alert:f1"
    approval_id = pending["approval_id"]
    path = f"/approvals/{approval_id}/approve"
    assert client.post(path, headers=AUTH).status_code == 401  # webhook credentials cannot decide
    assert client.post(path).status_code == 401
    decided = client.post(
        path, headers={"Authorization": f"Bearer {APPROVER_TOKEN}"}, json={"reason": "ok"}
    )
    assert decided.status_code == 200
    assert decided.json()["decided_by"] == "alice"

    def applied() -> bool:
        record = server.store.get_approval(approval_id)
        return record is not None and record.status is ApprovalStatus.APPLIED

    wait_for("the approved plan to be applied", applied)
    assert [c.request.hosts for c in executor.playbook_calls] == [("dev-b",)]
    assert devices["dev-b"].up
    again = client.post(path, headers={"Authorization": f"Bearer {APPROVER_TOKEN}"})
    assert again.status_code == 409
    events = [json.loads(line) for line in audit_path.read_text().splitlines()]
    granted = next(e for e in events if e["event"] == "approval.granted")
    assert granted["approver"] == "alice"
    assert any(e["event"] == "approval.applied" for e in events)
