"""supervisor-unhealthy on lab devices: a sick Supervisor restarted, every guard holding.

An unhealthy or stopped Supervisor is restarted through its unit and nothing else is touched.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.lab import Device
from engine.lab import faults as lab_faults
from engine.lab.device import wait_for
from engine.lab.images import APP_CONTAINER, SUPERVISOR_CONTAINER, SUPERVISOR_UNIT
from tests.support.cli import apply_runbook, report_of, run_remediate
from tests.support.lab import LabInventory, run_step_playbook

pytestmark = [pytest.mark.lab, pytest.mark.integration]

RUNBOOK = "supervisor-unhealthy"
#: The lab restarted the Supervisor moments ago; tests not about `settle` turn it off.
NO_SETTLE = ("-e", "settle=0s")
HTTP_OK, HTTP_ERROR = 200, 500


def _cli(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    return run_remediate(args, state)


def _apply(inventory: Path, state: Path, *extra: str) -> dict[str, Any]:
    return apply_runbook(RUNBOOK, inventory, state, *extra)


def _host(hosts: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(h for h in hosts if h["host"] == name)


def _snapshot(dev: Device) -> dict[str, str]:
    """What the runbook must never change, or change only as planned, seen inside the device."""
    fmt = "{{.Id}} {{.Image}} {{.State.StartedAt}}"
    out = dev.sh(
        f"balena inspect -f '{fmt}' {SUPERVISOR_CONTAINER} {APP_CONTAINER};"
        " systemctl show -p MainPID --value balena.service;"
        " systemctl show -p ActiveState --value balena-supervisor.service;"
        " find /mnt/data/resin-data -exec stat -c '%n %Y %s' {} + | sort | sha256sum"
    ).stdout.split("\n")
    supervisor, app, engine_pid, unit, resin_data = out[:5]
    sup_id, sup_image, sup_started = supervisor.split()
    return {
        "supervisor_id": sup_id,
        "supervisor_image": sup_image,
        "supervisor_started": sup_started,
        "app": app,  # id, image and start time: the app container is never restarted
        "engine_pid": engine_pid,
        "unit": unit,
        "resin_data": resin_data,
    }


def _events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "job_events").glob("*.json"))]


def test_unhealthy_supervisor_is_restarted_exactly_as_planned(
    lab_pair: list[Device], lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """/v1/healthy 500: planned, evidence saved, only the Supervisor's unit restarted, verified."""
    pair = lab_pair
    sick, healthy = pair
    inventory = lab_inventory(pair)
    state = tmp_path / "state"
    lab_faults.make_supervisor_unhealthy(sick)
    before = {dev.name: _snapshot(dev) for dev in pair}

    plan_file = tmp_path / "plan.json"
    args = ["plan", RUNBOOK, "-i", str(inventory), *NO_SETTLE, "--out", str(plan_file)]
    plan = {h["host"]: h for h in report_of(_cli([*args, "-o", "json"], state))["plan"]["hosts"]}
    assert plan[sick.name]["outcome"] == "planned"
    evidence = plan[sick.name]["evidence"]["supervisor"]
    assert evidence["healthy_code"] == HTTP_ERROR
    assert evidence["healthy_rc"] == 22
    assert evidence["running"] is True
    assert evidence["ping"] is True
    assert [s["id"] for s in plan[sick.name]["steps"]] == ["capture_evidence", "restart"]
    restart_line = plan[sick.name]["steps"][1]["plan"]
    assert restart_line.startswith("systemctl restart balena-supervisor (unit active")
    assert f"/v1/healthy {HTTP_ERROR})" in restart_line
    assert restart_line.endswith(f"keep running ({APP_CONTAINER})")
    assert plan[healthy.name]["outcome"] == "healthy"
    assert {dev.name: _snapshot(dev) for dev in pair} == before  # the dry run changed nothing

    applied = report_of(_cli(["apply", str(plan_file), "--yes", "-o", "json"], state))
    result = _host(applied["hosts"], sick.name)
    assert result["outcome"] == "fixed", result["reason"]
    assert [(s["step"], s["status"]) for s in result["steps"]] == [
        ("capture_evidence", "ok"),
        ("restart", "ok"),
    ]
    assert [h["host"] for h in applied["hosts"]] == [sick.name]

    # Inside the devices: the same Supervisor container and image, started again and healthy;
    # the engine, the app container and the Supervisor's database untouched; the healthy
    # device unchanged.
    after = _snapshot(sick)
    assert sick.supervisor_code() == HTTP_OK
    assert after["supervisor_started"] != before[sick.name]["supervisor_started"]
    unchanged = ("supervisor_id", "supervisor_image", "app", "engine_pid", "unit", "resin_data")
    assert {k: after[k] for k in unchanged} == {k: before[sick.name][k] for k in unchanged}
    assert _snapshot(healthy) == before[healthy.name]

    run_dir = state / "artifacts" / applied["plan"]["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "batch1-capture_evidence-0",
        "batch1-restart-0",
    ]
    evidence_text = "\n".join(
        e["event_data"]["res"]["stdout"]
        for e in _events(run_dir / "batch1-capture_evidence-0")
        if e["event"] == "runner_on_ok"
    )
    assert "GET /v1/healthy 500" in evidence_text  # the Supervisor's journal lines
    assert f'"Name": "/{SUPERVISOR_CONTAINER}"' in evidence_text  # balena inspect
    assert "ActiveState=active" in evidence_text  # its unit's state
    audit = _cli(["audit", "verify"], state)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_stopped_supervisor_is_started(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A stopped Supervisor (unit inactive, container exited) is started and answers 200."""
    lab_faults.stop_supervisor(lab_device)
    before = _snapshot(lab_device)
    assert before["unit"] == "inactive"
    report = _apply(lab_inventory([lab_device]), tmp_path / "state", *NO_SETTLE)
    evidence = _host(report["plan"]["hosts"], lab_device.name)["evidence"]["supervisor"]
    assert (evidence["container_state"], evidence["healthy_code"]) == ("exited", 0)
    result = _host(report["hosts"], lab_device.name)
    assert result["outcome"] == "fixed", result["reason"]
    after = _snapshot(lab_device)
    assert after["unit"] == "active"
    assert lab_device.supervisor_code() == HTTP_OK
    assert after["supervisor_id"] == before["supervisor_id"]  # started, not re-created
    assert (after["app"], after["engine_pid"]) == (before["app"], before["engine_pid"])


def _stop_supervisor_and_break_engine(dev: Device) -> None:
    """The Supervisor stopped, then the engine crash-looping into failed (it stays down)."""
    lab_faults.stop_supervisor(dev)
    lab_faults.break_engine(dev)


def _kill_supervisor_once(dev: Device) -> None:
    """The Supervisor's container dies; systemd restarts its unit 10 s later (NRestarts 1)."""
    dev.balena("kill", SUPERVISOR_CONTAINER)
    wait_for(
        lambda: dev.unit_property("NRestarts", SUPERVISOR_UNIT) == "1",
        timeout=30,
        what="systemd to restart the Supervisor",
    )
    dev.wait_supervisor(timeout=30)
    lab_faults.make_supervisor_unhealthy(dev)


@pytest.mark.parametrize(
    ("inject", "guard", "message", "extra"),
    [
        (
            _stop_supervisor_and_break_engine,
            "engine_healthy",
            "the engine is not healthy",
            NO_SETTLE,
        ),
        (
            lab_faults.make_supervisor_unhealthy,
            "settling",
            "systemd is (re)starting the Supervisor or changed its state less than",
            (),
        ),
        (
            _kill_supervisor_once,
            "crash_loop",
            "systemd keeps restarting the Supervisor",
            (*NO_SETTLE, "-e", "max_restarts=1"),
        ),
    ],
    ids=["engine-down", "just-started", "crash-loop"],
)
def test_guard_skips_the_device(
    lab_device: Device,
    lab_inventory: LabInventory,
    tmp_path: Path,
    inject: Callable[[Device], object],
    guard: str,
    message: str,
    extra: tuple[str, ...],
) -> None:
    """Each guard skips a device with a sick Supervisor with its message; nothing restarts."""
    inject(lab_device)
    before = lab_device.sh(
        "systemctl show -p ActiveState -p NRestarts -p ExecMainStartTimestamp"
        " balena.service balena-supervisor.service"
    ).stdout
    report = _apply(lab_inventory([lab_device]), tmp_path / "state", *extra)
    result = _host(report["hosts"], lab_device.name)
    assert result["outcome"] == "skipped"
    assert result["reason"].startswith(f"guard {guard}: {message}")
    assert result["steps"] == []
    after = lab_device.sh(
        "systemctl show -p ActiveState -p NRestarts -p ExecMainStartTimestamp"
        " balena.service balena-supervisor.service"
    ).stdout
    assert after == before
    if guard == "engine_healthy":
        assert "runbook engine-unresponsive" in result["reason"]


def _ext4_error(dev: Device) -> None:
    lab_faults.make_data_readonly(dev, lab_faults.DataRoForm.EMERGENCY_RO)


@pytest.mark.parametrize(
    ("inject", "refusal"),
    [
        (lab_faults.start_os_update, "refusing: host OS update in progress"),
        (_ext4_error, "refusing: the data partition cannot be written"),
    ],
    ids=["os-update", "emergency-ro"],
)
def test_restart_playbook_checks_the_device_again_before_acting(
    lab_device: Device,
    lab_inventory: LabInventory,
    tmp_path: Path,
    inject: Callable[[Device], object],
    refusal: str,
) -> None:
    """An OS update or ext4 error that appears after the probe: the playbook restarts nothing."""
    inject(lab_device)
    before = _snapshot(lab_device)
    status, failed = run_step_playbook(
        "supervisor-restart.yml", lab_inventory([lab_device]), {}, tmp_path / "runner"
    )
    assert status == "failed"
    assert [task for task, _out in failed] == [
        "Refuse during a host OS update, on an unwritable /mnt/data, or with a sick engine"
    ]
    assert failed[0][1].startswith(refusal)
    assert _snapshot(lab_device) == before
