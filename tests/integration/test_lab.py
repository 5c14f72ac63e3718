"""The device lab: real devices seen by real Ansible over SSH, and every fault seen from inside."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import ansible_runner
import pytest
from ruamel.yaml import YAML

from engine.lab import Device, Lab
from engine.lab import faults as lab_faults
from engine.lab.images import APP_CONTAINER, IMAGES, SUPERVISOR_CONTAINER
from tests.support.lab import LabDevices, LabInventory, lab_skip_reason

pytestmark = [pytest.mark.lab, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]

REFERENCED = (
    "cat /var/lib/docker/image/overlay2/layerdb/sha256/*/cache-id"
    " /var/lib/docker/image/overlay2/layerdb/mounts/*/mount-id"
    " /var/lib/docker/image/overlay2/layerdb/mounts/*/init-id 2>/dev/null"
)


def _ssh_out(dev: Device, command: str) -> str:
    res = dev.ssh(command)
    assert res.returncode == 0, f"{dev.name}: {command}: {res.stderr}"
    return res.stdout


def _run_playbook(tmp_path: Path, inventory: Path, playbook: str) -> list[dict[str, Any]]:
    project = tmp_path / "runner" / "project"
    project.mkdir(parents=True)
    (project / "site.yml").write_text(playbook)
    run = ansible_runner.run(
        private_data_dir=str(tmp_path / "runner"),
        playbook="site.yml",
        inventory=str(inventory),
        quiet=True,
        envvars={
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        },
    )
    events: list[dict[str, Any]] = list(run.events)
    return events


def _results(events: list[dict[str, Any]], task: str, event: str) -> dict[str, dict[str, Any]]:
    return {
        e["event_data"]["host"]: e["event_data"]["res"]
        for e in events
        if e.get("event") == event and e["event_data"].get("task") == task
    }


PLAYBOOK = """
- hosts: balena_fleet
  gather_facts: false
  tasks:
    - name: data partition
      ansible.builtin.raw: df -B1 --output=size /mnt/data | tail -1; cat /mnt/data/lab-marker
    - name: images
      ansible.builtin.raw: balena images --format '{% raw %}{{.Repository}}:{{.Tag}}{% endraw %}'
    - name: module
      ansible.builtin.ping:
      ignore_errors: true
"""


def test_three_devices_answer_raw_tasks_and_fail_module_tasks(
    lab: Lab, lab_devices: LabDevices, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """ansible-runner raw tasks see each device's own data partition and images; ping fails."""
    devices = lab_devices(3)
    for dev in devices:
        dev.path("/mnt/data/lab-marker").write_text(f"marker-{dev.balena_uuid}\n")
    devices[0].balena("tag", "lab/base:1", "lab/only-first:1")
    try:
        events = _run_playbook(tmp_path, lab_inventory(devices), PLAYBOOK)
    finally:
        devices[0].balena("rmi", "lab/only-first:1")
    data = _results(events, "data partition", "runner_on_ok")
    images = _results(events, "images", "runner_on_ok")
    failed = _results(events, "module", "runner_on_failed")
    assert set(data) == set(images) == set(failed) == {d.name for d in devices}
    for dev in devices:
        size_line, marker = data[dev.name]["stdout"].split()
        expected = lab.state.data_mb * 1024 * 1024
        assert 0.8 * expected < int(size_line) <= expected
        assert marker == f"marker-{dev.balena_uuid}"
        names = set(images[dev.name]["stdout"].split())
        assert set(IMAGES) <= names
        assert ("lab/only-first:1" in names) == (dev is devices[0])
        assert "python" in json.dumps(failed[dev.name]).lower()


def test_devices_run_containers_side_by_side(lab_devices: LabDevices) -> None:
    """Two devices' engines run containers at the same time without sharing state."""
    first, second = lab_devices(2)
    for dev in (first, second):
        assert _ssh_out(dev, f"balena ps --filter name={APP_CONTAINER} -q").strip()
    procs = [
        subprocess.Popen(
            dev.ssh_args("balena run --rm --network none lab/base:1 sh -c 'sleep 1; hostname'"),
            stdout=subprocess.PIPE,
            text=True,
        )
        for dev in (first, second)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(out.strip() for out in outputs)
    ids = [_ssh_out(d, "balena ps -q --no-trunc").split() for d in (first, second)]
    assert not set(ids[0]) & set(ids[1])


def test_inventory_describes_balena_hosts(lab: Lab, lab_devices: LabDevices) -> None:
    """The lab inventory carries the balenaOS connection settings and a balena_uuid per host."""
    devices = lab_devices(3)
    inv = YAML(typ="safe").load(lab.inventory_path)["all"]["children"]["balena_fleet"]
    assert inv["vars"]["ansible_port"] == 22222
    assert inv["vars"]["ansible_user"] == "root"
    assert inv["vars"]["ansible_python_interpreter"] == "/nonexistent/python3"
    assert Path(inv["vars"]["ansible_ssh_private_key_file"]).exists()
    for dev in devices:
        host = inv["hosts"][dev.name]
        assert host["ansible_host"].startswith("127.")
        assert len(host["balena_uuid"]) == 32
        int(host["balena_uuid"], 16)


@pytest.mark.parametrize("kind", list(lab_faults.FillKind))
def test_fill_shows_in_df(lab_device: Device, kind: lab_faults.FillKind) -> None:
    """A fill of each kind brings df's Use% of /mnt/data to the target, seen over SSH."""
    result = lab_faults.fill_data(lab_device, 92, kind)
    use = int(_ssh_out(lab_device, "df /mnt/data | awk 'NR==2{print $5+0}'"))
    assert use >= 92
    if kind is lab_faults.FillKind.DANGLING_IMAGE:
        assert result.path in _ssh_out(lab_device, "balena images -f dangling=true -q --no-trunc")
    else:
        size = int(_ssh_out(lab_device, f"stat -c %s {shlex.quote(result.path)}"))
        assert size >= result.bytes_written
    lab_faults.clear_fill(lab_device)
    assert int(_ssh_out(lab_device, "df /mnt/data | awk 'NR==2{print $5+0}'")) < 50


def test_orphan_layer_is_referenced_by_no_metadata(lab_device: Device) -> None:
    """A dockerd killed mid-import leaves an overlay2 dir no cache-id/mount-id/init-id names."""
    layer = lab_faults.make_orphan_layer(lab_device)
    listing = _ssh_out(lab_device, "ls /var/lib/docker/overlay2").split()
    referenced = _ssh_out(lab_device, REFERENCED).split()
    assert layer in listing
    assert layer not in referenced
    assert _ssh_out(lab_device, f"du -sm /var/lib/docker/overlay2/{layer} | cut -f1").strip() != "0"
    assert _ssh_out(lab_device, "systemctl is-active balena").strip() == "active"


def test_hung_engine_is_active_but_silent(lab_device: Device) -> None:
    """A SIGSTOPped engine keeps its unit active while `timeout 5 balena ps` fails."""
    lab_faults.hang_engine(lab_device)
    assert lab_device.ssh("timeout 5 balena ps").returncode != 0
    assert _ssh_out(lab_device, "systemctl is-active balena").strip() == "active"
    lab_faults.resume_engine(lab_device)
    assert lab_device.ssh("timeout 5 balena ps").returncode == 0


def test_crashes_raise_nrestarts(lab_device: Device) -> None:
    """Each engine crash is answered by systemd: NRestarts and ExecMainStartTimestamp change."""
    show = "systemctl show -p NRestarts -p ExecMainStartTimestamp balena"
    before = dict(ln.split("=", 1) for ln in _ssh_out(lab_device, show).splitlines())
    lab_faults.crash_engine(lab_device, times=2)
    after = dict(ln.split("=", 1) for ln in _ssh_out(lab_device, show).splitlines())
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 2
    assert after["ExecMainStartTimestamp"] != before["ExecMainStartTimestamp"]
    assert lab_device.ssh("/usr/lib/balena/balena-healthcheck").returncode == 0


def test_engine_down_is_not_active(lab_device: Device) -> None:
    """A crash-looping engine ends not active, with the reason in journalctl -t balenad."""
    lab_faults.break_engine(lab_device)
    res = lab_device.ssh("systemctl is-active balena")
    assert res.returncode != 0
    assert res.stdout.strip() != "active"
    journal = _ssh_out(lab_device, "journalctl -u balena.service -t balenad -n 50 --no-pager")
    assert "daemon.json" in journal
    assert lab_device.ssh("timeout 5 balena ps").returncode != 0


def test_update_lock_is_held_inside_one_device(lab_devices: LabDevices) -> None:
    """A held updates.lock makes `flock -nx` fail on that device only (/tmp is per device)."""
    first, second = lab_devices(2)
    try:
        lock = lab_faults.hold_update_lock(first)
        found = _ssh_out(first, "find /tmp/balena-supervisor/services -name updates.lock")
        assert lock in found.split()
        assert first.ssh(f"flock -nx {lock} true").returncode != 0
        assert second.ssh(f"test -e {lock}").returncode != 0
        lab_faults.release_update_lock(first)
        assert first.ssh(f"flock -nx {lock} true").returncode == 0
    finally:
        lab_faults.clear_all(first)


def test_pull_in_progress_shows_an_untar(lab_device: Device) -> None:
    """A slow import shows a docker-untar process and an unreferenced layer dir until it ends."""
    lab_faults.start_pull(lab_device)
    procs = _ssh_out(lab_device, "ps -eo args")
    assert "docker-untar" in procs
    assert "balena import" in procs or "docker import" in procs
    in_flight = lab_faults.layer_dirs(lab_device) - lab_faults.referenced_layers(lab_device)
    assert len(in_flight) == 1  # a layer being loaded looks exactly like an orphan
    lab_faults.stop_pull(lab_device)
    assert "docker-untar" not in _ssh_out(lab_device, "ps -eo args")
    assert not lab_faults.layer_dirs(lab_device) & in_flight


def test_readonly_data_partition_shows_ro(lab_device: Device) -> None:
    """/proc/mounts shows /mnt/data ro and writes to it fail; clearing restores the engine."""
    lab_faults.make_data_readonly(lab_device)
    opts = _ssh_out(lab_device, "awk '($2==\"/mnt/data\"){print $4}' /proc/mounts")
    assert opts.split(",")[0] == "ro"
    assert lab_device.ssh("touch /mnt/data/probe").returncode != 0
    lab_faults.make_data_writable(lab_device)
    assert lab_device.ssh("touch /mnt/data/probe && rm /mnt/data/probe").returncode == 0
    assert lab_device.ssh("timeout 10 balena ps").returncode == 0


def _curl(dev: Device, path: str) -> tuple[int, str]:
    """(HTTP status or 0, body) of GET path on the device's 127.0.0.1:48484, asked over SSH."""
    res = dev.ssh(f"curl -sS --max-time 5 -w ' %{{http_code}}' http://127.0.0.1:48484{path}")
    body, _, code = res.stdout.rpartition(" ")
    return int(code or "0"), body


def test_supervisor_stand_in_answers_on_each_device_own_loopback(lab_devices: LabDevices) -> None:
    """Each device's balena_supervisor answers /ping and /v1/healthy on its own 127.0.0.1."""
    devices = lab_devices(2)
    for dev in devices:
        assert _curl(dev, "/ping") == (200, "OK")
        assert _curl(dev, "/v1/healthy") == (200, "OK")
        inspect = _ssh_out(
            dev,
            f"balena inspect -f '{{{{.HostConfig.RestartPolicy.Name}}}} "
            f"{{{{.HostConfig.NetworkMode}}}} {{{{.State.Running}}}}' {SUPERVISOR_CONTAINER}",
        )
        assert inspect.split() == ["always", "host", "true"]
        assert _ssh_out(dev, "systemctl is-active balena-supervisor").strip() == "active"
    lab_faults.make_supervisor_unhealthy(devices[0])
    try:
        assert _curl(devices[0], "/v1/healthy") == (500, "Unhealthy")
        assert _curl(devices[1], "/v1/healthy") == (200, "OK")  # a loopback of its own
    finally:
        lab_faults.clear_all(devices[0])
    with socket.socket() as sock:  # and none of them on the machine running the lab
        assert sock.connect_ex(("127.0.0.1", 48484)) != 0


def test_supervisor_faults_and_their_undo(lab_device: Device) -> None:
    """Unhealthy: 500 until its unit restarts it; down: unit inactive, container exited."""
    lab_faults.make_supervisor_unhealthy(lab_device)
    assert _ssh_out(lab_device, "systemctl is-active balena-supervisor").strip() == "active"
    assert lab_device.ssh("systemctl restart balena-supervisor").returncode == 0
    assert _curl(lab_device, "/v1/healthy") == (200, "OK")
    lab_faults.stop_supervisor(lab_device)
    assert lab_device.ssh("systemctl is-active balena-supervisor").stdout.strip() == "inactive"
    state = f"balena inspect -f '{{{{.State.Status}}}}' {SUPERVISOR_CONTAINER}"
    assert _ssh_out(lab_device, state).strip() == "exited"
    assert _curl(lab_device, "/ping")[0] == 0
    lab_faults.clear(lab_device, lab_faults.Fault.SUPERVISOR_DOWN)
    assert _curl(lab_device, "/v1/healthy") == (200, "OK")


def test_update_lock_file_exists_with_no_flock(lab_device: Device) -> None:
    """update-lock-file: the lock file exists, owned by the Supervisor's uid, nobody flocks it."""
    lock = lab_faults.place_update_lock_file(lab_device)
    assert _ssh_out(lab_device, f"stat -c %u {lock}").strip() == "65534"
    assert lab_device.ssh(f"flock -nx {lock} true").returncode == 0  # free to flock(1) ...
    lab_faults.clear(lab_device, lab_faults.Fault.UPDATE_LOCK_FILE)
    assert lab_device.ssh(f"test -e {lock}").returncode != 0  # ... held until it is gone


def test_os_update_stages_as_the_check_script_sees_them(lab_device: Device) -> None:
    """os-update: the rollback breadcrumbs, or a running hostapp-update, in checks/os-update.sh."""
    script = shlex.quote((ROOT / "runbooks" / "checks" / "os-update.sh").read_text())
    assert _ssh_out(lab_device, f"sh -c {script}") == ""
    lab_faults.start_os_update(lab_device)
    assert _ssh_out(lab_device, f"sh -c {script}").splitlines() == [
        f"breadcrumb {crumb}" for crumb in lab_faults.BREADCRUMBS
    ]
    lab_faults.finish_os_update(lab_device)
    lab_faults.start_os_update(lab_device, lab_faults.OsUpdateStage.RUNNING)
    (line,) = _ssh_out(lab_device, f"sh -c {script}").splitlines()
    assert line.startswith("process ")
    assert line.endswith(f"/bin/sh {lab_faults.HOSTAPP_UPDATE}")
    lab_faults.finish_os_update(lab_device)
    assert _ssh_out(lab_device, f"sh -c {script}") == ""
    assert lab_device.ssh("test -e /mnt/state").returncode != 0


def test_emergency_ro_data_partition_and_its_fsck(lab_device: Device) -> None:
    """An ext4 error keeps /mnt/data "rw" with emergency_ro; clearing it fscks and remounts."""
    errors = "cat /sys/fs/ext4/$(basename $(readlink /sys/dev/block/$(awk"
    errors += " '$5 == \"/mnt/data\" {print $3}' /proc/self/mountinfo)))/errors_count"
    lab_faults.make_data_readonly(lab_device, lab_faults.DataRoForm.EMERGENCY_RO)
    opts = _ssh_out(lab_device, "awk '($2==\"/mnt/data\"){print $4}' /proc/mounts").strip()
    assert opts.split(",")[0] == "rw"
    assert opts.split(",")[-1] == "emergency_ro"
    assert _ssh_out(lab_device, errors).strip() == "1"
    assert lab_device.ssh("touch /mnt/data/probe").returncode != 0
    assert lab_device.ssh("timeout 10 balena ps").returncode == 0  # the engine keeps running
    lab_faults.make_data_writable(lab_device)
    opts = _ssh_out(lab_device, "awk '($2==\"/mnt/data\"){print $4}' /proc/mounts").strip()
    assert "emergency_ro" not in opts
    assert _ssh_out(lab_device, errors).strip() == "0"
    assert lab_device.ssh("touch /mnt/data/probe && rm /mnt/data/probe").returncode == 0
    assert lab_device.ssh("timeout 10 balena ps").returncode == 0
    assert _curl(lab_device, "/v1/healthy") == (200, "OK")


def test_teardown_leaves_nothing_behind(tmp_path: Path) -> None:
    """Down after faults leaves no process, mount, loop device, cgroup or listener."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    own = Lab.up(tmp_path / "lab", devices=2, data_mb=64)
    try:
        lab_faults.hold_update_lock(own.devices[0])
        lab_faults.start_pull(own.devices[1])
        lab_faults.hang_engine(own.devices[1])
        assert own.find_leftovers()
    finally:
        own_state = own.state
        own.down()
    leftovers = own.find_leftovers()
    from engine.lab.devices import find_leftovers  # noqa: PLC0415

    leftovers += find_leftovers(own.lab_dir, own_state.slot, own_state.devices)
    assert leftovers == []
    assert not (tmp_path / "lab" / "lab-state.json").exists()


def test_cli_up_inject_down_across_processes(tmp_path: Path) -> None:
    """`lab up` prints the inventory; `inject`, `status` and `down` work from other processes."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    lab_dir = tmp_path / "cli-lab"
    cli = [sys.executable, "-m", "engine.lab.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args, "--lab-dir", str(lab_dir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    up = run("up", "--devices", "1", "--data-mb", "64")
    assert up.returncode == 0, up.stderr
    inventory = Path(up.stdout.strip().splitlines()[-1])
    assert inventory.exists()
    state = Lab.load(lab_dir).state
    try:
        assert run("inject", "dev1", "update-lock").returncode == 0
        assert run("inject", "dev7", "pull").returncode == 2
        status = run("status")
        assert '"locks"' in status.stdout
        assert '"supervisor_healthy": 200' in status.stdout
        assert run("clear", "dev1", "update-lock").returncode == 0
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    from engine.lab.devices import find_leftovers  # noqa: PLC0415

    assert find_leftovers(lab_dir, state.slot, state.devices) == []
