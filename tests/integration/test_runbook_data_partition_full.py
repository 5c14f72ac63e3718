"""data-partition-full on lab devices: real fills freed least risky first, user data untouched."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.lab import Device
from engine.lab import faults as lab_faults
from engine.lab.faults import FillKind
from engine.lab.images import APP_VOLUME
from tests.support.cli import apply_runbook, report_of, run_remediate
from tests.support.lab import LabInventory

pytestmark = [pytest.mark.lab, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = "data-partition-full"
TARGET = 10  # the runbook's default free_pct_min
TMP = "/var/lib/docker/tmp"
HOLD_UNIT = "dpf-test-hold.service"
HELD = f"{TMP}/GetImageBlob-held-by-test"
#: The runbook's steps that each fill kind it can fix must plan (then the read-only report).
STEP_FOR = {
    FillKind.DANGLING_IMAGE: "prune_dangling",
    FillKind.JSON_LOG: "truncate_logs",
    FillKind.ENGINE_TMP: "clean_engine_tmp",
}


def _cli(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    return run_remediate(args, state)


def _apply(inventory: Path, state: Path, *extra: str) -> dict[str, Any]:
    """``run --apply --yes -o json``; the report (its plan included) as data."""
    return apply_runbook(RUNBOOK, inventory, state, *extra)


def _by_host(hosts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in hosts}


def _planned(report: dict[str, Any], host: str) -> dict[str, list[Any] | None]:
    """Planned step id -> its items, for one host of a report's plan."""
    plan = _by_host(report["plan"]["hosts"])[host]
    return {s["id"]: s["items"] for s in plan["steps"]}


def _ran(report: dict[str, Any], host: str) -> list[tuple[str, str | None]]:
    """(step id, status) as the apply ran them on one host; status None: skipped on recheck."""
    return [(s["step"], s["status"]) for s in _by_host(report["hosts"])[host]["steps"]]


def _free_pct(dev: Device) -> int:
    """Free % of /mnt/data as ``df`` inside the device (over SSH) reports it."""
    res = dev.ssh("df -P /mnt/data | awk 'NR == 2 {print 100 - $5}'")
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


@dataclass(frozen=True)
class Listing:
    """What the runbook could touch on a device: images, container logs, engine tmp files."""

    images: frozenset[str]
    logs: dict[str, int]
    tmp: dict[str, int]


def _listing(dev: Device) -> Listing:
    out = dev.sh(
        "balena images -aq --no-trunc | sed 's/^/image /';"
        " find /var/lib/docker/containers -name '*-json.log' -exec stat -c 'log %n %s' {} +;"
        f" find {TMP} -type f -exec stat -c 'tmp %n %s' {{}} +"
    ).stdout.split("\n")
    rows = [line.split() for line in out if line]
    return Listing(
        images=frozenset(r[1] for r in rows if r[0] == "image"),
        logs={r[1]: int(r[2]) for r in rows if r[0] == "log"},
        tmp={r[1]: int(r[2]) for r in rows if r[0] == "tmp"},
    )


def _volume_sums(dev: Device) -> str:
    """sha256 of every file in every volume, as the device computes it."""
    return dev.sh("find /var/lib/docker/volumes -type f -exec sha256sum {} + | sort -k 2").stdout


def _backdate(dev: Device, path: str, seconds: int = 3600) -> None:
    dev.sh('touch -d "@$(( $(date +%s) - $2 ))" "$1"', path, str(seconds))


def _fill(dev: Device, percent: int, kind: FillKind) -> str:
    """Fill /mnt/data to ``percent`` with ``kind``; engine tmp files are left an hour old."""
    path = lab_faults.fill_data(dev, percent, kind).path
    if kind is FillKind.ENGINE_TMP:
        _backdate(dev, path)
    return path


@contextmanager
def _held_open(dev: Device) -> Iterator[str]:
    """An old 1 MiB engine tmp file a process in the device holds open (as a running pull)."""
    dev.sh('head -c 1048576 /dev/zero > "$1"', HELD)
    _backdate(dev, HELD)
    dev.run(
        [
            *("systemd-run", f"--unit={HOLD_UNIT}", "--collect", "--quiet"),
            *("sh", "-c", f"exec 3<{shlex.quote(HELD)}; exec sleep 900"),
        ]
    )
    deadline = time.monotonic() + 20
    while (
        "held"
        not in dev.sh(
            'for f in /proc/[0-9]*/fd/*; do [ "$(readlink "$f")" = "$1" ] && echo held; done; true',
            HELD,
        ).stdout
    ):
        assert time.monotonic() < deadline, "the holder never opened the tmp file"
        time.sleep(0.2)
    try:
        yield HELD
    finally:
        dev.run(["systemctl", "stop", HOLD_UNIT], check=False)
        dev.sh('rm -f -- "$1"', HELD)


@pytest.mark.parametrize("kind", list(STEP_FOR), ids=lambda k: str(k.value))
def test_fixable_fill_is_freed_exactly_as_planned(
    kind: FillKind, lab_pair: list[Device], lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A fill the runbook can fix: the reviewed plan names it, apply touches only it, df agrees."""
    pair = lab_pair
    full, healthy = pair
    inventory = lab_inventory(pair)
    state = tmp_path / "state"
    with _held_open(full) as held:
        filled = _fill(full, 95, kind)
        assert _free_pct(full) < TARGET
        before = {dev.name: _listing(dev) for dev in pair}

        plan_file = tmp_path / "plan.json"
        plan = report_of(
            _cli(
                ["plan", RUNBOOK, "-i", str(inventory), "--out", str(plan_file), "-o", "json"],
                state,
            )
        )
        step = STEP_FOR[kind]
        assert _planned(plan, full.name) == {step: [filled], "report": None}
        assert _by_host(plan["plan"]["hosts"])[healthy.name]["outcome"] == "healthy"
        evidence = _by_host(plan["plan"]["hosts"])[full.name]["evidence"]
        assert {f["path"]: f["open"] for f in evidence["engine_tmp"]["files"]}[held] is True
        assert {dev.name: _listing(dev) for dev in pair} == before  # the dry-run changed nothing

        applied = report_of(_cli(["apply", str(plan_file), "--yes", "-o", "json"], state))
        hosts = _by_host(applied["hosts"])
        assert hosts[full.name]["outcome"] == "fixed", hosts[full.name]["reason"]
        assert _ran(applied, full.name) == [(step, "ok"), ("report", None)]
        assert set(hosts) == {full.name}  # exactly the planned hosts
        assert _free_pct(full) >= TARGET

        after = _listing(full)
        assert _listing(healthy) == before[healthy.name]
        expected = before[full.name]
        if kind is FillKind.DANGLING_IMAGE:
            expected = Listing(expected.images - {filled}, expected.logs, expected.tmp)
        elif kind is FillKind.JSON_LOG:
            expected = Listing(expected.images, {**expected.logs, filled: 0}, expected.tmp)
        else:
            tmp = {p: n for p, n in expected.tmp.items() if p != filled}
            expected = Listing(expected.images, expected.logs, tmp)
        assert after == expected
        assert held in after.tmp


def test_steps_after_the_first_are_skipped_once_it_freed_enough(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Log, tmp file and dangling image all planned; the image alone frees enough: only it goes."""
    log = _fill(lab_device, 20, FillKind.JSON_LOG)
    tmp = _fill(lab_device, 35, FillKind.ENGINE_TMP)
    image = _fill(lab_device, 95, FillKind.DANGLING_IMAGE)
    before = _listing(lab_device)
    assert before.logs[log] > 10 * 1024 * 1024

    report = _apply(lab_inventory([lab_device]), tmp_path / "state")
    assert _planned(report, lab_device.name) == {
        "prune_dangling": [image],
        "truncate_logs": [log],
        "clean_engine_tmp": [tmp],
        "report": None,
    }
    host = _by_host(report["hosts"])[lab_device.name]
    assert host["outcome"] == "fixed", host["reason"]
    assert _ran(report, lab_device.name) == [
        ("prune_dangling", "ok"),
        ("truncate_logs", None),
        ("clean_engine_tmp", None),
        ("report", None),
    ]
    assert all("no longer needed" in s["message"] for s in host["steps"][1:])
    assert _free_pct(lab_device) >= TARGET
    after = _listing(lab_device)
    assert after == Listing(before.images - {image}, before.logs, before.tmp)


def test_volume_data_is_never_touched_and_named_as_the_top_consumer(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A partition full of user data: nothing is removed, not_fixed names the volume."""
    filled = _fill(lab_device, 95, FillKind.VOLUME)
    sums = _volume_sums(lab_device)
    assert filled.rsplit("/", 1)[1] in sums
    before = _listing(lab_device)

    report = _apply(lab_inventory([lab_device]), tmp_path / "state")
    assert _planned(report, lab_device.name) == {"report": None}
    host = _by_host(report["hosts"])[lab_device.name]
    assert host["outcome"] == "not_fixed"
    assert _ran(report, lab_device.name) == [("report", "ok")]
    where = host["reason"].split("The space is in: ", 1)[1]
    assert where.startswith("volumes (user data) "), host["reason"]
    assert f"Largest volume: {APP_VOLUME} " in host["reason"]
    assert _volume_sums(lab_device) == sums
    assert _listing(lab_device) == before
    assert _free_pct(lab_device) < TARGET


def test_read_only_data_partition_is_skipped_by_the_rw_guard(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A full partition mounted read-only: the data_rw guard skips the device, nothing runs."""
    _fill(lab_device, 95, FillKind.VOLUME)
    lab_faults.make_data_readonly(lab_device)
    sums = _volume_sums(lab_device)

    report = _apply(lab_inventory([lab_device]), tmp_path / "state")
    host = _by_host(report["hosts"])[lab_device.name]
    assert host["outcome"] == "skipped"
    assert host["reason"].startswith("guard data_rw: the data partition cannot be written")
    assert host["steps"] == []
    assert _planned(report, lab_device.name) == {}
    evidence = _by_host(report["plan"]["hosts"])[lab_device.name]["evidence"]["data_rw"]
    assert (evidence["writable"], evidence["reason"]) == (False, "mounted read-only (ro)")
    mounts = lab_device.sh("awk '$2 == \"/mnt/data\" {print $4}' /proc/mounts").stdout
    assert mounts.startswith("ro")
    assert _volume_sums(lab_device) == sums


@contextmanager
def _persistent_journal_on_data(dev: Device) -> Iterator[None]:
    """Journald writing to /mnt/data/root-overlay/var/log/journal, as with persistentLogging."""
    dev.sh(
        "mkdir -p /mnt/data/root-overlay/var/log/journal"
        " && mount --bind /mnt/data/root-overlay/var/log/journal /var/log/journal"
        " && systemctl restart systemd-journald"
    )
    try:
        yield
    finally:
        dev.sh(
            "umount -l /var/log/journal; systemctl restart systemd-journald;"
            " rm -rf /mnt/data/root-overlay",
            check=False,
        )


def test_journal_on_the_data_partition_is_vacuumed(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A persistent journal on /mnt/data: vacuumed to journal_max_mb, and that frees enough."""
    journal = "/mnt/data/root-overlay/var/log/journal"
    with _persistent_journal_on_data(lab_device):
        lab_device.sh(
            "head -c 6000000 /dev/urandom | base64 -w 600 | systemd-cat -t dpf-test"
            " && journalctl --sync && journalctl --rotate"
        )
        archived = lab_device.sh(f"find {journal} -name 'system@*.journal'").stdout.split()
        assert archived
        _fill(lab_device, 91, FillKind.VOLUME)
        assert _free_pct(lab_device) < TARGET
        before = _listing(lab_device)

        report = _apply(lab_inventory([lab_device]), tmp_path / "state", "-e", "journal_max_mb=1")
        assert _planned(report, lab_device.name) == {"vacuum_journal": None, "report": None}
        host = _by_host(report["hosts"])[lab_device.name]
        assert host["outcome"] == "fixed", host["reason"]
        assert _ran(report, lab_device.name) == [("vacuum_journal", "ok"), ("report", None)]
        assert _free_pct(lab_device) >= TARGET
        left = lab_device.sh(f"find {journal} -name 'system@*.journal'").stdout.split()
        assert not set(archived) & set(left)
        assert lab_device.sh(f"find {journal} -name system.journal").stdout.strip()
        assert _listing(lab_device) == before


def test_orphaned_layer_is_quarantined_with_the_shared_scan_and_playbook(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Volume data plus one orphaned layer: only the orphan goes; images, containers, data stay."""
    orphan = lab_faults.make_orphan_layer(lab_device)
    _fill(lab_device, 92, FillKind.VOLUME)
    assert _free_pct(lab_device) < TARGET
    dirs = lab_faults.layer_dirs(lab_device)
    refs = lab_faults.referenced_layers(lab_device)
    sums = _volume_sums(lab_device)
    before = _listing(lab_device)

    report = _apply(lab_inventory([lab_device]), tmp_path / "state", "-e", "min_age=0s")
    assert _planned(report, lab_device.name) == {"quarantine_orphans": [orphan], "report": None}
    host = _by_host(report["hosts"])[lab_device.name]
    assert host["outcome"] == "fixed", host["reason"]
    assert _ran(report, lab_device.name) == [("quarantine_orphans", "ok"), ("report", None)]
    assert _free_pct(lab_device) >= TARGET
    assert lab_faults.layer_dirs(lab_device) == dirs - {orphan}
    assert lab_faults.referenced_layers(lab_device) == refs
    assert not lab_device.path("/var/lib/docker/orphan-quarantine").exists()
    assert _volume_sums(lab_device) == sums
    assert _listing(lab_device) == before
    lab_device.sh(
        "balena image inspect $(balena images -aq) >/dev/null"
        " && balena container inspect $(balena ps -aq) >/dev/null"
    )


def _untagged_image(dev: Device) -> str:
    """Import a one-file image without a tag; return its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("marker")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"dpf\n"))
    return dev.run(["balena", "import", "-"], input_data=buf.getvalue()).stdout.strip()


def _playbook(
    inventory: Path, playbook: str, extravars: dict[str, Any], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run one of the runbook's playbooks directly with these extra vars (as a stale plan would)."""
    vars_file = tmp_path / f"{playbook}.vars.json"
    vars_file.write_text(json.dumps(extravars))
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            *("-v", "-i", str(inventory), str(ROOT / "playbooks" / playbook)),
            *("-e", f"@{vars_file}"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1"},
        check=False,
        timeout=300,
    )


def test_playbooks_refuse_bad_items_and_keep_what_changed_since_the_plan(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Deleting playbooks re-check on the device: bad shapes act on nothing, stale items stay."""
    dev = lab_device
    inventory = lab_inventory([dev])
    image = _fill(dev, 30, FillKind.DANGLING_IMAGE)
    log = _fill(dev, 45, FillKind.JSON_LOG)
    old_tmp = _fill(dev, 50, FillKind.ENGINE_TMP)
    young_tmp = f"{TMP}/GetImageBlob-young"
    dev.sh('head -c 4096 /dev/zero > "$1"', young_tmp)
    tagged = dev.balena("image", "inspect", "-f", "{{.Id}}", "lab/app:2").stdout.strip()
    used = _untagged_image(dev)
    dev.balena("create", "--name", "dpf_user", "--network", "none", used, "/marker")
    try:
        with _held_open(dev) as held:
            before = _listing(dev)
            evil = "sha256:" + "0" * 64 + "; touch /tmp/dpf-pwned"
            bad_log = f"{log}/../../../volumes/{APP_VOLUME}/_data/x"
            bad_tmp = f"{TMP}/../volumes/{APP_VOLUME}"
            # (playbook, extra vars, what each says: a refusal fails the play, a kept item not)
            runs: list[tuple[str, dict[str, Any], list[str]]] = [
                ("prune-dangling-images.yml", {"remediate_items": [evil, image]}, ["refusing"]),
                (
                    "prune-dangling-images.yml",
                    {"remediate_items": [tagged, used]},
                    [f"kept {tagged}: tagged now", f"kept {used}: used by a container now"],
                ),
                (
                    "dpf-truncate-container-logs.yml",
                    {"remediate_items": [bad_log, log]},
                    ["refusing"],
                ),
                (
                    "dpf-truncate-container-logs.yml",
                    {"remediate_items": [log], "log_max_bytes": str(before.logs[log])},
                    [f"kept {log}: {before.logs[log]} bytes"],
                ),
                ("dpf-clean-engine-tmp.yml", {"remediate_items": [bad_tmp, old_tmp]}, ["refusing"]),
                (
                    "dpf-clean-engine-tmp.yml",
                    {"remediate_items": [young_tmp, held]},
                    [f"kept {young_tmp}: only", f"kept {held}: held open"],
                ),
            ]
            for playbook, extravars, says in runs:
                proc = _playbook(inventory, playbook, extravars, tmp_path)
                assert (proc.returncode == 0) is (says != ["refusing"]), (playbook, proc.stdout)
                for text in says:
                    assert text in proc.stdout, (playbook, text, proc.stdout)
                assert _listing(dev) == before, (playbook, proc.stdout)
            assert dev.sh("test -e /tmp/dpf-pwned", check=False).returncode != 0
            assert dev.balena("ps", "-aq", "--filter", "name=dpf_user").stdout.strip()
    finally:
        dev.balena("rm", "-f", "dpf_user", check=False)
        dev.balena("rmi", used, check=False)
        dev.sh('rm -f -- "$1"', young_tmp)
