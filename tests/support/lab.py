"""Pytest fixtures for the device lab (``engine.lab``): real devices shared across a session.

* ``lab`` (session): a running :class:`~engine.lab.Lab`, torn down at the end of the session
  even when tests fail; skipped with the reason when the machine cannot run it (not root,
  missing Debian packages).
* ``lab_devices`` (session): a factory; ``lab_devices(3)`` returns the first three shared
  devices (starting more when needed), each with every fault cleared.
* ``lab_device`` (function): one shared device, faults cleared before and after the test.
* ``lab_pair`` (function): the first two shared devices, faults cleared before and after.
* ``lab_inventory`` (function): a factory writing an inventory for some devices into tmp_path.

:func:`run_step_playbook` runs one of the project's playbooks on devices directly, as a step
of a plan made before the device changed would.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import ansible_runner
import pytest

from engine.lab import Device, Lab, missing_requirements
from engine.lab import faults as lab_faults

ROOT = Path(__file__).resolve().parents[2]
LabDevices = Callable[[int], list[Device]]
LabInventory = Callable[[Sequence[Device]], Path]


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    problems = missing_requirements()
    return "device lab unavailable: " + "; ".join(problems) if problems else None


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A running lab (no devices until ``lab_devices`` asks for them), torn down at the end."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    running = Lab.up(tmp_path_factory.mktemp("lab"), devices=0)
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(scope="session")
def lab_devices(lab: Lab) -> LabDevices:
    """Factory: ``lab_devices(n)`` -> the first ``n`` shared devices, faults cleared."""

    def get(count: int) -> list[Device]:
        missing = count - len(lab.devices)
        if missing > 0:
            lab.add_devices(missing)
        chosen = lab.devices[:count]
        for dev in chosen:
            lab_faults.clear_all(dev)
        return chosen

    return get


@pytest.fixture
def lab_device(lab_devices: LabDevices) -> Iterator[Device]:
    """One shared device with no faults; whatever the test injected is cleared afterwards."""
    dev = lab_devices(1)[0]
    try:
        yield dev
    finally:
        lab_faults.clear_all(dev)


@pytest.fixture
def lab_pair(lab_devices: LabDevices) -> Iterator[list[Device]]:
    """Two shared devices with no faults; whatever the test injected is cleared afterwards."""
    devices = lab_devices(2)
    try:
        yield devices
    finally:
        for dev in devices:
            lab_faults.clear_all(dev)


@pytest.fixture
def lab_inventory(lab: Lab, tmp_path: Path) -> LabInventory:
    """Factory: write an inventory (group ``balena_fleet``) for the given devices."""

    def write(devices: Sequence[Device]) -> Path:
        return lab.write_inventory(tmp_path / "inventory.yml", devices)

    return write


def run_step_playbook(
    playbook: str, inventory: Path, extravars: Mapping[str, str], private: Path
) -> tuple[str, list[tuple[str, str]]]:
    """Run ``playbooks/PLAYBOOK`` with ansible-runner: its status and (task, stdout) that failed."""
    private.mkdir(parents=True)
    run = ansible_runner.run(
        private_data_dir=str(private),
        playbook=str(ROOT / "playbooks" / playbook),
        inventory=str(inventory),
        extravars=dict(extravars),
        quiet=True,
        envvars={"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])},
    )
    failed = [e["event_data"] for e in run.events if e.get("event") == "runner_on_failed"]
    return str(run.status), [(e["task"], str(e["res"].get("stdout", ""))) for e in failed]
