"""Guards every acting runbook shares, on lab devices: OS updates, unwritable data partitions.

Each test gives one device every runbook's symptom at once (a full data partition, an orphaned
layer dir, a stale probe folder, and a stopped engine, which also stops the Supervisor), adds
the condition, and runs every runbook with ``--apply --yes`` (side by side: all of them only
read): each must skip the device with its guard's message, before any step.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from engine.lab import Device
from engine.lab import faults as lab_faults
from engine.lab.faults import DataRoForm, FillKind
from tests.support.cli import run_remediate
from tests.support.lab import LabInventory

pytestmark = [pytest.mark.lab, pytest.mark.integration]

#: Every runbook that restarts or deletes something, with the extra vars that let the lab's
#: seconds-old faults count (orphan dirs are new, probe folders are backdated one hour).
ACTING: dict[str, tuple[str, ...]] = {
    "data-partition-full": (),
    "orphaned-layers": ("-e", "min_age=0s"),
    "stale-probe-scratch": ("-e", "min_age=10m"),
    "supervisor-unhealthy": ("-e", "settle=0s"),
    "engine-unresponsive": ("-e", "settle=0s"),
}
#: The runbooks that write to /mnt/data.
WRITERS = ("data-partition-full", "orphaned-layers", "supervisor-unhealthy", "engine-unresponsive")
STALE = "/tmp/.remediate-probe.Abc123"
OVERLAY2 = "/var/lib/docker/overlay2"


def _apply(runbook: str, inventory: Path, state: Path) -> tuple[str, str, list[Any]]:
    """``run RUNBOOK --apply --yes`` on the inventory's one host: (outcome, reason, steps)."""
    args = ["run", runbook, "-i", str(inventory), "--apply", "--yes", "-o", "json"]
    proc = run_remediate([*args, *ACTING[runbook]], state / runbook)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    (host,) = json.loads(proc.stdout)["hosts"]
    return host["outcome"], host["reason"], host["steps"]


def _run_all(runbooks: tuple[str, ...], inventory: Path, state: Path) -> dict[str, Any]:
    """Every runbook's (outcome, reason, steps) on the device, the runs side by side."""
    with ThreadPoolExecutor(max_workers=len(runbooks)) as pool:
        results = pool.map(lambda rb: _apply(rb, inventory, state), runbooks)
        return dict(zip(runbooks, results, strict=True))


def _give_symptoms(dev: Device, orphan: str) -> None:
    """Every runbook's symptom but the stopped engine: fill, orphan dir, stale probe folder."""
    lab_faults.fill_data(dev, 95, FillKind.VOLUME)
    dev.sh(
        'mkdir -p "$1/$2/diff" && echo x > "$1/$2/diff/f" && mkdir "$3"'
        ' && touch -d "@$(( $(date +%s) - 3600 ))" "$3"',
        OVERLAY2,
        orphan,
        STALE,
    )


def _stop_engine(dev: Device) -> dict[str, str]:
    """Stop the engine (and with it the Supervisor's container); the unit state to compare."""
    dev.run(["systemctl", "stop", "balena.service"])
    return _engine(dev)


def _engine(dev: Device) -> dict[str, str]:
    out = dev.sh("systemctl show -p ActiveState -p ExecMainStartTimestamp balena.service").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def device(lab_device: Device) -> Iterator[tuple[Device, str]]:
    """One lab device and the name of the orphan dir to make; both cleaned afterwards."""
    orphan = secrets.token_hex(32)
    try:
        yield lab_device, orphan
    finally:
        lab_faults.clear_all(lab_device)  # repairs the file system, starts the engine
        lab_device.sh('rm -rf -- "$1/$2" "$3"', OVERLAY2, orphan, STALE)


def _expect(seen: dict[str, Any], reason: str) -> None:
    assert {rb: (o, r[: len(reason)], s) for rb, (o, r, s) in seen.items()} == {
        rb: ("skipped", reason, []) for rb in seen
    }


def test_os_update_blocks_every_acting_runbook(
    device: tuple[Device, str], lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A host OS update in progress skips the device in every runbook that restarts or deletes.

    (The rollback breadcrumbs here; a running hostapp-update is the same check's other signal,
    see test_lab's test_os_update_stages_as_the_check_script_sees_them.)
    """
    dev, orphan = device
    _give_symptoms(dev, orphan)
    lab_faults.start_os_update(dev)
    engine = _stop_engine(dev)
    seen = _run_all(tuple(ACTING), lab_inventory([dev]), tmp_path)
    _expect(seen, "guard os_update: a host OS update is in progress")
    assert _engine(dev) == engine  # not restarted
    assert dev.path(STALE).is_dir()  # nothing removed or moved
    assert dev.path(f"{OVERLAY2}/{orphan}").is_dir()


def test_emergency_ro_data_partition_is_refused_before_any_step(
    device: tuple[Device, str], lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """An ext4 error (rw,...,emergency_ro): every runbook writing to /mnt/data refuses first."""
    dev, orphan = device
    _give_symptoms(dev, orphan)
    lab_faults.make_data_readonly(dev, DataRoForm.EMERGENCY_RO)
    assert lab_faults.data_mount_options(dev)[:1] == ["rw"]  # what the old check read
    engine = _stop_engine(dev)
    seen = _run_all(WRITERS, lab_inventory([dev]), tmp_path)
    _expect(seen, "guard data_rw: the data partition cannot be written")
    assert all("repair the file system first" in reason for _o, reason, _s in seen.values())
    assert _engine(dev) == engine
    assert "emergency_ro" in lab_faults.data_mount_options(dev)
    assert dev.path(f"{OVERLAY2}/{orphan}").is_dir()
