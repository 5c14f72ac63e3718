"""engine-unresponsive on lab devices: hung and stopped engines restarted, every guard holding."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.lab import Device
from engine.lab import faults as lab_faults
from engine.lab.images import APP_CONTAINER, SUPERVISOR_CONTAINER
from tests.support.cli import run_remediate
from tests.support.lab import LabDevices, LabInventory, run_step_playbook

pytestmark = [pytest.mark.lab, pytest.mark.integration]

RUNBOOK = "engine-unresponsive"
UNIT = "balena.service"
#: A container with restart policy "always": the engine itself starts it again after a restart.
ALWAYS = "engine_rb_always"
#: Lab engines were (re)started moments ago by the lab or a previous test; tests that are not
#: about the ``settling`` guard turn its grace period off.
NO_SETTLE = ("-e", "settle=0s")


def _cli(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    return run_remediate(args, state)


def _apply(inventory: Path, state: Path, *extra: str) -> dict[str, Any]:
    """``run --apply --yes -o json`` of the runbook; the report as data."""
    args = ["run", RUNBOOK, "-i", str(inventory), "--apply", "--yes", "-o", "json", *extra]
    proc = _cli(args, state)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def _host(report: dict[str, Any], name: str) -> dict[str, Any]:
    hosts: list[dict[str, Any]] = report["hosts"]
    return next(h for h in hosts if h["host"] == name)


def _engine(dev: Device) -> dict[str, str]:
    """The engine unit's state as systemd inside the device reports it."""
    out = dev.sh(
        "systemctl show -p ActiveState -p NRestarts -p MainPID -p ExecMainStartTimestamp " + UNIT
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _ps_answers(dev: Device) -> bool:
    return dev.sh("timeout 10 balena ps >/dev/null", check=False).returncode == 0


def _running(dev: Device) -> set[str]:
    return set(dev.sh("balena ps --format '{{.Names}}'").stdout.split())


def _stop_engine(dev: Device) -> None:
    dev.run(["systemctl", "stop", UNIT])
    assert _engine(dev)["ActiveState"] == "inactive"


def _restore(dev: Device) -> None:
    """Undo what these tests leave beyond the lab's faults: a stopped engine, NRestarts, ALWAYS."""
    lab_faults.resume_engine(dev)
    dev.sh(f"systemctl is-active -q {UNIT} || systemctl start {UNIT}", check=False)
    lab_faults.clear_all(dev)
    if _engine(dev)["NRestarts"] != "0":
        dev.run(["systemctl", "restart", UNIT])  # a manual restart flushes systemd's counter
        dev.wait_engine(timeout=60)
    dev.balena("rm", "-f", ALWAYS, check=False)
    lab_faults.clear_all(dev)


@pytest.fixture
def device(lab_device: Device) -> Iterator[Device]:
    """One lab device, restored afterwards."""
    try:
        yield lab_device
    finally:
        _restore(lab_device)


@pytest.fixture
def two_devices(lab_devices: LabDevices) -> Iterator[list[Device]]:
    """Two lab devices, restored afterwards."""
    devices = lab_devices(2)
    try:
        yield devices
    finally:
        for dev in devices:
            _restore(dev)


def _events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((folder / "job_events").glob("*.json"))]


def _assert_ran_as_planned(run_dir: Path, hung: Device, hung_before: dict[str, str]) -> None:
    """Exactly the planned playbooks ran, on exactly the planned host, evidence first."""
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "batch1-capture_evidence-0",
        "batch1-restart-0",
    ]
    for folder in run_dir.iterdir():
        hosts = {e["event_data"]["host"] for e in _events(folder) if "host" in e["event_data"]}
        assert hosts == {hung.name}
    evidence = "\n".join(
        e["event_data"]["res"]["stdout"]
        for e in _events(run_dir / "batch1-capture_evidence-0")
        if e["event"] == "runner_on_ok"
    )
    assert "balenad[" in evidence  # journal lines of the engine
    assert "State:\tT (stopped)" in evidence  # dockerd as the restart found it
    assert f"MainPID={hung_before['MainPID']}" in evidence


def test_hung_engine_is_restarted_exactly_as_planned(
    two_devices: list[Device], lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Hung engine: planned, evidence saved, restarted and verified; the healthy one untouched."""
    hung, healthy = two_devices
    inventory = lab_inventory(two_devices)
    state = tmp_path / "state"
    hung.balena(
        "run", "-d", "--name", ALWAYS, "--restart", "always", "--network", "none", "lab/sidecar:1"
    )
    assert _running(hung) == {APP_CONTAINER, ALWAYS, SUPERVISOR_CONTAINER}
    lab_faults.hang_engine(hung)
    assert not _ps_answers(hung)
    hung_before, healthy_before = _engine(hung), _engine(healthy)

    plan_file = tmp_path / "plan.json"
    args = ["plan", RUNBOOK, "-i", str(inventory), *NO_SETTLE, "--out", str(plan_file)]
    planned = _cli([*args, "-o", "json"], state)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    plan = {h["host"]: h for h in json.loads(planned.stdout)["plan"]["hosts"]}
    assert plan[hung.name]["outcome"] == "planned"
    assert plan[hung.name]["evidence"]["ps_rc"] == 124  # timeout(1) stopped it
    assert plan[hung.name]["evidence"]["containers"]["source"] == "disk"
    assert [s["id"] for s in plan[hung.name]["steps"]] == ["capture_evidence", "restart"]
    restart_line = plan[hung.name]["steps"][1]["plan"]
    # NRestarts is whatever earlier tests on this shared device left (crash faults keep it).
    assert re.match(rf"restart {UNIT} \(active, NRestarts \d+, balena ps rc 124", restart_line)
    starts_again = restart_line.split("the engine starts again: ")[1].split(";")[0]
    assert set(starts_again.split(", ")) == {ALWAYS, SUPERVISOR_CONTAINER}
    assert f"stay stopped (no restart policy): {APP_CONTAINER}" in restart_line
    assert plan[healthy.name]["outcome"] == "healthy"
    assert plan[healthy.name]["steps"] == []
    assert _engine(hung) == hung_before  # the dry run changed nothing

    applied = _cli(["apply", str(plan_file), "--yes", "-o", "json"], state)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    report = json.loads(applied.stdout)
    result = _host(report, hung.name)
    assert result["outcome"] == "fixed", result["reason"]
    assert [(s["step"], s["status"]) for s in result["steps"]] == [
        ("capture_evidence", "ok"),
        ("restart", "ok"),
    ]
    assert [h["host"] for h in report["hosts"]] == [hung.name]  # only the planned host

    # Seen from inside the devices: a new engine process that answers, the always-container
    # back; the healthy device's engine is the same process as before.
    hung_after = _engine(hung)
    assert hung_after["ActiveState"] == "active"
    assert hung_after["MainPID"] != hung_before["MainPID"]
    assert hung_after["ExecMainStartTimestamp"] != hung_before["ExecMainStartTimestamp"]
    assert _ps_answers(hung)
    assert {ALWAYS, SUPERVISOR_CONTAINER} <= _running(hung)
    assert hung.supervisor_code() == 200
    assert _engine(healthy) == healthy_before

    _assert_ran_as_planned(state / "artifacts" / report["plan"]["run_id"], hung, hung_before)
    audit = _cli(["audit", "verify"], state)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_stopped_engine_is_started_then_cooldown_skips_a_second_run(
    device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A stopped engine is started; stopped again right after, the cool-down skips the device."""
    inventory = lab_inventory([device])
    state = tmp_path / "state"
    _stop_engine(device)

    first = _host(_apply(inventory, state, *NO_SETTLE), device.name)
    assert first["outcome"] == "fixed", first["reason"]
    assert [s["step"] for s in first["steps"]] == ["capture_evidence", "restart"]
    assert _engine(device)["ActiveState"] == "active"
    assert _ps_answers(device)

    _stop_engine(device)
    second = _host(_apply(inventory, state, *NO_SETTLE), device.name)
    assert second["outcome"] == "skipped"
    assert second["reason"].startswith("guard cooldown: this runbook restarted this device")
    assert second["steps"] == []
    assert _engine(device)["ActiveState"] == "inactive"  # nothing started it


def test_healthy_engine_is_left_alone(
    device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A healthy engine: outcome healthy, no playbook ran, the engine process is unchanged."""
    inventory = lab_inventory([device])
    state = tmp_path / "state"
    before = _engine(device)
    report = _apply(inventory, state)
    result = _host(report, device.name)
    assert result["outcome"] == "healthy"
    assert result["steps"] == []
    assert report["status"] == "succeeded"
    assert _engine(device) == before
    assert not (state / "artifacts" / report["plan"]["run_id"]).exists()


def _lock_and_stop(dev: Device) -> None:
    lab_faults.hold_update_lock(dev)
    _stop_engine(dev)


def _lock_file_and_stop(dev: Device) -> None:
    """A lock file no process holds flock on (as the Supervisor's own): held all the same."""
    lab_faults.place_update_lock_file(dev)
    _stop_engine(dev)


def _pull_and_hang(dev: Device) -> None:
    lab_faults.start_pull(dev)
    lab_faults.hang_engine(dev)


def _fill_and_stop(dev: Device) -> None:
    lab_faults.fill_data(dev, 97)
    _stop_engine(dev)


def _crash_and_hang(dev: Device) -> None:
    lab_faults.crash_engine(dev, 1)
    lab_faults.hang_engine(dev)


@pytest.mark.parametrize(
    ("inject", "guard", "message", "extra"),
    [
        (_lock_and_stop, "update_lock", "an app holds its update lock", NO_SETTLE),
        (_lock_file_and_stop, "update_lock", "an app holds its update lock", NO_SETTLE),
        (_pull_and_hang, "pull", "a pull or image import is in progress", NO_SETTLE),
        (lab_faults.break_engine, "crash_loop", "the engine is crash-looping", NO_SETTLE),
        (_fill_and_stop, "data_space", "the data partition is nearly full", NO_SETTLE),
        (_crash_and_hang, "settling", "systemd is starting the engine or (re)started it", ()),
    ],
    ids=["update-lock", "update-lock-file", "pull", "crash-loop", "data-full", "just-restarted"],
)
def test_guard_blocks_the_restart(
    device: Device,
    lab_inventory: LabInventory,
    tmp_path: Path,
    inject: Callable[[Device], object],
    guard: str,
    message: str,
    extra: tuple[str, ...],
) -> None:
    """Each guard skips a sick device with its message, and the engine is not touched."""
    inventory = lab_inventory([device])
    inject(device)
    before = _engine(device)
    report = _apply(inventory, tmp_path / "state", *extra)
    result = _host(report, device.name)
    assert result["outcome"] == "skipped"
    assert result["reason"].startswith(f"guard {guard}: {message}")
    assert result["steps"] == []
    assert _engine(device) == before


def test_override_lock_restarts_despite_the_update_lock(
    device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """override_lock=true lets the restart through; the app's lock itself is left held."""
    inventory = lab_inventory([device])
    _lock_and_stop(device)
    report = _apply(inventory, tmp_path / "state", *NO_SETTLE, "-e", "override_lock=true")
    result = _host(report, device.name)
    assert result["outcome"] == "fixed", result["reason"]
    assert _engine(device)["ActiveState"] == "active"
    assert _ps_answers(device)
    held = device.sh(f"flock -nx {lab_faults.update_lock_path()} true", check=False)
    assert held.returncode != 0


@pytest.mark.parametrize(
    ("inject", "refusal"),
    [
        (_lock_and_stop, "refusing: update lock held"),
        (_lock_file_and_stop, "refusing: update lock held"),
        (lab_faults.start_pull, "refusing: pull or import in progress"),
        (lab_faults.start_os_update, "refusing: host OS update in progress"),
    ],
    ids=["update-lock", "update-lock-file", "pull", "os-update"],
)
def test_restart_playbook_checks_the_device_again_before_acting(
    device: Device,
    lab_inventory: LabInventory,
    tmp_path: Path,
    inject: Callable[[Device], object],
    refusal: str,
) -> None:
    """A lock or pull that appears after the probe: the playbook refuses, the engine untouched."""
    inject(device)
    before = _engine(device)
    status, failed = run_step_playbook(
        "engine-restart.yml",
        lab_inventory([device]),
        {"engine_unit": UNIT, "override_lock": "False", "device_override_lock": "True"},
        tmp_path / "runner",
    )
    assert status == "failed"
    assert [task for task, _out in failed] == [
        "Refuse when an update lock is held, a pull or OS update runs, or /mnt/data is unwritable"
    ]
    assert failed[0][1].startswith(refusal)
    assert _engine(device) == before


def test_device_override_lock_counts_only_when_asked(
    device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """The device's own SUPERVISOR_OVERRIDE_LOCK counts only with device_override_lock=true."""
    inventory = lab_inventory([device])
    _lock_file_and_stop(device)
    config = device.path("/tmp/balena-supervisor/target-state-config")
    config.write_text('{"HOST_CONFIG_gpu_mem":"16","SUPERVISOR_OVERRIDE_LOCK":"1"}')
    try:
        state = tmp_path / "state"
        default = _apply(inventory, state, *NO_SETTLE)
        result = _host(default, device.name)
        assert result["outcome"] == "skipped"
        assert result["reason"].startswith("guard update_lock: an app holds its update lock")
        evidence = _host(default["plan"], device.name)["evidence"]["update_locks"]
        assert evidence["override"] is True
        assert evidence["override_setting"] == "SUPERVISOR_OVERRIDE_LOCK=1"
        assert [lock["path"] for lock in evidence["held"]] == [lab_faults.update_lock_path()]
        assert evidence["held"][0]["flocked"] is False
        assert evidence["held"][0]["owner_uid"] == lab_faults.SUPERVISOR_LOCK_UID
        assert _engine(device)["ActiveState"] == "inactive"

        honoured = _apply(inventory, state, *NO_SETTLE, "-e", "device_override_lock=true")
        result = _host(honoured, device.name)
        assert result["outcome"] == "fixed", result["reason"]
        assert _ps_answers(device)
        assert device.path(lab_faults.update_lock_path()).exists()  # the lock itself untouched
    finally:
        config.unlink(missing_ok=True)


def test_older_devices_resin_names_are_read_as_the_balena_ones(
    device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """resin-updates.lock is held, RESIN_OVERRIDE_LOCK is the override, resin_supervisor found."""
    legacy_lock = lab_faults.update_lock_path().replace("/updates.lock", "/resin-updates.lock")
    config = device.path("/tmp/balena-supervisor/target-state-config")
    lab_faults.stop_supervisor(device)
    device.balena("rename", SUPERVISOR_CONTAINER, "resin_supervisor")
    try:
        device.sh('mkdir -p "${1%/*}" && : > "$1"', legacy_lock)
        config.write_text('{"RESIN_OVERRIDE_LOCK":"true"}')
        args = ["plan", RUNBOOK, "-i", str(lab_inventory([device])), "-o", "json"]
        proc = _cli(args, tmp_path / "state")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        evidence = _host(json.loads(proc.stdout)["plan"], device.name)["evidence"]
        locks, supervisor = evidence["update_locks"], evidence["supervisor"]
        assert [(lock["path"], lock["flocked"]) for lock in locks["held"]] == [(legacy_lock, False)]
        assert (locks["override"], locks["override_setting"]) == (True, "RESIN_OVERRIDE_LOCK=true")
        assert (supervisor["container"], supervisor["container_state"]) == (
            "resin_supervisor",
            "exited",
        )
    finally:
        config.unlink(missing_ok=True)
        device.path(legacy_lock).unlink(missing_ok=True)
        device.balena("rename", "resin_supervisor", SUPERVISOR_CONTAINER)
