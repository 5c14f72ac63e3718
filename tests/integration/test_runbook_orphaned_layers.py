"""orphaned-layers on lab devices: it quarantines exactly the orphans and every image still runs.

Orphans are made the way the field makes them (``faults.make_orphan_layer``: dockerd killed
with SIGKILL during a ``balena import``), so they are seconds old: the runs that must act on
them pass ``-e min_age=0s``.  Every judgement is made from inside the device: the listing of
``overlay2/`` and ``overlay2/l/`` before and after, and a container started from every image.
The layout helpers are public: ``bench/orphan_safety.py`` runs many more layouts with them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.executors.base import HostStatus, PlaybookRequest
from engine.lab import Device
from engine.lab import faults as lab_faults
from engine.lab.images import APP_CONTAINER, IMAGES
from tests.support.cli import run_remediate
from tests.support.lab import LabDevices, LabInventory

pytestmark = [pytest.mark.lab, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = "orphaned-layers"
PLAYBOOK = ROOT / "playbooks" / "quarantine-orphan-layers.yml"
DOCKER = "/var/lib/docker"
QUARANTINE = f"{DOCKER}/orphan-quarantine"
FRESH = "min_age=0s"  # the orphans the lab makes are seconds old
CI_LAYOUTS = 10


# ------------------------------------------------------------------------------- device views
@dataclass(frozen=True)
class LayerListing:
    """What ``overlay2/`` holds, read inside the device: layer dirs and ``l/`` short links."""

    dirs: frozenset[str]
    links: frozenset[str]


def layer_listing(dev: Device) -> LayerListing:
    """The entries of ``overlay2/`` (except ``l``) and of ``overlay2/l/``, seen in the device."""
    out = dev.sh(f"ls -A {DOCKER}/overlay2; echo /; ls -A {DOCKER}/overlay2/l").stdout
    dirs, links = out.split("/\n", 1)
    return LayerListing(frozenset(dirs.split()) - {"l"}, frozenset(links.split()))


def short_link(dev: Device, layer: str) -> str:
    """The ``overlay2/l/`` short name of a layer dir (its ``link`` file)."""
    return dev.sh('cat "$1"', f"{DOCKER}/overlay2/{layer}/link").stdout.strip()


def image_ids(dev: Device) -> list[str]:
    """Every image id the engine lists (tagged and dangling)."""
    return sorted(set(dev.balena("images", "-q", "--no-trunc").stdout.split()))


def broken_images(dev: Device) -> list[str]:
    """Images from which ``balena run --rm --network none <image> true`` does not succeed."""
    broken = []
    for image in image_ids(dev):
        run = dev.balena("run", "--rm", "--network", "none", image, "true", check=False)
        if run.returncode != 0:
            broken.append(f"{image}: {run.stderr.strip()[-300:]}")
    return broken


def uninspectable_containers(dev: Device) -> list[str]:
    """Containers (any state) that ``balena container inspect`` fails on."""
    ids = dev.balena("ps", "-aq", "--no-trunc").stdout.split()
    return [c for c in ids if dev.balena("container", "inspect", c, check=False).returncode]


# ------------------------------------------------------------------------------- the CLI
def remediate(args: Sequence[str], state_dir: Path) -> dict[str, Any]:
    """Run the real CLI from the repository root with ``-o json``; its parsed output."""
    proc = run_remediate([*args, "-o", "json"], state_dir)
    assert proc.returncode in {0, 1}, f"remediate {' '.join(args)}: {proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def run_apply(inventory: Path, host: str, state_dir: Path, *extra: str) -> dict[str, Any]:
    """``remediate run orphaned-layers --apply --yes`` on one host; the run report."""
    args = ["run", RUNBOOK, "-i", str(inventory), "--limit", host, "--apply", "--yes"]
    for value in extra:
        args += ["-e", value]
    return remediate(args, state_dir)


def planned_items(host_plan: dict[str, Any]) -> list[str]:
    """The ids a host's plan would quarantine (its only step's items)."""
    steps = host_plan["steps"]
    return list(steps[0]["items"]) if steps else []


# ------------------------------------------------------------------------------- layouts
LAB_IMAGES = tuple(IMAGES)


@dataclass
class Layout:
    """One randomized device state: extra images, containers in every state, orphans."""

    seed: int
    actions: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def _build_image(dev: Device, rng: random.Random, layout: Layout) -> None:
    base = rng.choice([*LAB_IMAGES, *layout.images])
    tag = f"lab/layout-{layout.seed}-{len(layout.images)}:1"
    lines = [f"FROM {base}"]
    for n in range(rng.randint(1, 3)):
        op = rng.choice(("blob", "text", "whiteout", "env"))
        if op == "blob":
            kib = rng.randint(1, 512)
            lines.append(f"RUN dd if=/dev/urandom of=/blob{n} bs=1024 count={kib} 2>/dev/null")
        elif op == "text":
            lines.append(
                f"RUN mkdir -p /etc/layout && echo {rng.getrandbits(64):016x} > /etc/layout/{n}"
            )
        elif op == "whiteout":
            lines.append("RUN rm -f /bin/vi /bin/ed")
        else:
            lines.append(f"ENV LAYOUT_{n}={rng.randint(0, 999)}")
    dockerfile = "\n".join(lines) + "\n"
    dev.run(
        ["balena", "build", "--network", "none", "-q", "-t", tag, "-"],
        input_data=dockerfile.encode(),
        timeout=300,
    )
    layout.images.append(tag)
    layout.actions.append(f"image {tag} from {base} ({len(lines) - 1} instructions)")


def _add_container(dev: Device, rng: random.Random, layout: Layout) -> None:
    image = rng.choice([*LAB_IMAGES, *layout.images])
    name = f"layout-{layout.seed}-{len(layout.containers)}"
    state = rng.choice(("created", "running", "stopped"))
    base = ["--name", name, "--network", "none"]
    if state == "created":
        dev.balena("create", *base, image, "sleep", "3600")
    elif state == "running":
        dev.balena("run", "-d", "--restart", "always", *base, image, "sleep", "3600")
    else:
        dev.balena("run", *base, image, "true")
    layout.containers.append(name)
    layout.actions.append(f"container {name} {state} from {image}")


def make_layout(dev: Device, seed: int) -> Layout:
    """Give ``dev`` a random layout: 1-3 images on random stacks, 1-3 containers, 0-2 orphans."""
    rng = random.Random(seed)  # noqa: S311 - a seed must reproduce a layout, not be secret
    layout = Layout(seed)
    kinds = ["image"] * rng.randint(1, 3) + ["container"] * rng.randint(1, 3)
    kinds += ["orphan"] * rng.randint(0, 2)
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "image":
            _build_image(dev, rng, layout)
        elif kind == "container":
            _add_container(dev, rng, layout)
        else:
            orphan = lab_faults.make_orphan_layer(dev, size_mb=rng.randint(1, 3))
            layout.orphans.append(orphan)
            layout.actions.append(f"orphan {orphan} (engine killed mid-import)")
    # The engine kills of the orphans stopped the app container (it has no restart policy).
    if not dev.balena("ps", "-q", "--filter", f"name={APP_CONTAINER}").stdout.strip():
        dev.balena("start", APP_CONTAINER)
    return layout


def remove_layout(dev: Device, layout: Layout) -> None:
    """Remove what :func:`make_layout` added (containers, then images, newest first)."""
    if layout.containers:
        dev.balena("rm", "-f", *layout.containers, check=False)
    for tag in reversed(layout.images):
        dev.balena("rmi", tag, check=False)


def layout_problems(
    dev: Device,
    layout: Layout,
    report: dict[str, Any],
    before: LayerListing,
    links: dict[str, str],
    *,
    kept: bool = False,
) -> list[str]:
    """Everything wrong in how ``report`` (a ``run --apply``) treated ``layout``; [] if nothing.

    ``before`` is the listing just before the run, ``links`` the orphans' short links; with
    ``kept`` (``keep_quarantine=true``) the run's quarantine must hold exactly the orphans.
    """
    problems: list[str] = []
    after = layer_listing(dev)
    (host,) = report["hosts"]
    (host_plan,) = report["plan"]["hosts"]
    orphans = set(layout.orphans)
    want_links = {links[o] for o in orphans}
    if orphans:
        if host["outcome"] != "fixed":
            scan = host_plan["evidence"].get("scan")
            why = scan.get("in_flight_reason") if isinstance(scan, dict) else scan
            problems.append(f"outcome {host['outcome']} ({host['reason']}; {why}), expected fixed")
        if sorted(planned_items(host_plan)) != sorted(orphans):
            problems.append(f"planned {planned_items(host_plan)}, orphans {sorted(orphans)}")
        if [s["step"] for s in host["steps"]] != ["quarantine"]:
            problems.append(f"steps ran: {host['steps']}")
    elif host["outcome"] != "healthy":
        problems.append(f"outcome {host['outcome']} ({host['reason']}) with no orphan")
    if before.dirs - after.dirs != orphans:
        problems.append(
            f"dirs removed {sorted(before.dirs - after.dirs)}, orphans {sorted(orphans)}"
        )
    if after.dirs - before.dirs:
        problems.append(f"dirs appeared: {sorted(after.dirs - before.dirs)}")
    if before.links - after.links != want_links or after.links - before.links:
        problems.append(
            f"links changed: -{before.links - after.links} +{after.links - before.links}"
        )
    problems += [f"image does not run: {b}" for b in broken_images(dev)]
    problems += [f"container does not inspect: {c}" for c in uninspectable_containers(dev)]
    if kept:
        held = quarantine_listing(dev, report["plan"]["run_id"])
        if held != LayerListing(frozenset(orphans), frozenset(want_links)):
            problems.append(f"quarantine holds {held}, orphans {sorted(orphans)}")
    elif dev.sh(f"test -e {QUARANTINE}", check=False).returncode == 0:
        problems.append(f"{QUARANTINE} left behind")
    return problems


def quarantine_listing(dev: Device, run_id: str) -> LayerListing:
    """What a run's kept quarantine holds: the moved layer dirs and ``l/`` links."""
    where = f"{QUARANTINE}/{run_id}"
    out = dev.sh('ls -A "$1"; echo /; ls -A "$1/links"', where, check=False).stdout
    dirs, links = out.split("/\n", 1) if "/\n" in out else (out, "")
    return LayerListing(frozenset(dirs.split()) - {"links", "manifest"}, frozenset(links.split()))


def run_layouts(
    dev: Device, inventory: Path, seeds: Sequence[int], state_root: Path
) -> list[tuple[Layout, list[str]]]:
    """Make, remediate, check and remove one layout per seed on ``dev``, one after the other."""
    results = []
    for seed in seeds:
        layout = make_layout(dev, seed)
        try:
            before = layer_listing(dev)
            links = {o: short_link(dev, o) for o in layout.orphans}
            report = run_apply(inventory, dev.name, state_root / f"{dev.name}-{seed}", FRESH)
            results.append((layout, layout_problems(dev, layout, report, before, links)))
        finally:
            remove_layout(dev, layout)
    return results


# ------------------------------------------------------------------------------- tests
def test_safety_proof_plan_then_apply_quarantines_exactly_the_orphan(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Shared base layers, running, stopped and created containers: only the orphan goes."""
    dev = lab_device
    orphan = lab_faults.make_orphan_layer(dev, size_mb=4)
    dev.balena("start", APP_CONTAINER)
    layout = Layout(seed=0, images=["lab/proof-a:1", "lab/proof-b:1"])
    dev.run(
        ["balena", "build", "--network", "none", "-q", "-t", "lab/proof-a:1", "-"],
        input_data=b"FROM lab/app:1\nRUN echo a > /a\n",
    )
    dev.run(
        ["balena", "build", "--network", "none", "-q", "-t", "lab/proof-b:1", "-"],
        input_data=b"FROM lab/proof-a:1\nRUN rm /app.bin && echo b > /b\n",
    )
    dev.balena("create", "--name", "proof-created", "--network", "none", "lab/proof-b:1")
    dev.balena("run", "-d", "--name", "proof-running", "--network", "none", "lab/sidecar:1")
    dev.balena("run", "--name", "proof-stopped", "--network", "none", "lab/app:2", "true")
    layout.containers = ["proof-created", "proof-running", "proof-stopped"]
    layout.orphans = [orphan]
    inventory = lab_inventory([dev])
    try:
        before = layer_listing(dev)
        links = {orphan: short_link(dev, orphan)}
        saved = tmp_path / "plan.json"
        plan_args = ["plan", RUNBOOK, "-i", str(inventory), "-e", FRESH, "--out", str(saved)]
        plan_args += ["-e", "keep_quarantine=true"]
        plan = remediate(plan_args, tmp_path / "state")
        (host_plan,) = plan["plan"]["hosts"]
        assert host_plan["outcome"] == "planned", host_plan
        assert planned_items(host_plan) == [orphan]
        (step,) = host_plan["steps"]
        assert step["destructive"] is True
        assert orphan in step["plan"]
        assert f"{host_plan['evidence']['scan']['qualifying_bytes']} bytes" in step["plan"]
        assert layer_listing(dev) == before  # the dry run changed nothing

        report = remediate(["apply", str(saved), "--yes"], tmp_path / "state")
        (host,) = report["hosts"]
        assert host["outcome"] == "fixed", host
        assert [s["step"] for s in host["steps"]] == [s["id"] for s in host_plan["steps"]]
        assert layout_problems(dev, layout, report, before, links, kept=True) == []
        assert dev.balena("ps", "-q", "--filter", "name=proof-running").stdout.strip()
        evidence = host["evidence_after"]
        assert evidence["quarantined_bytes"] >= 4 * 1024 * 1024
        assert evidence["scan"]["qualifying"] == []
        audit = subprocess.run(
            [sys.executable, "-c", "from engine.cli import main; main()", "audit", "verify"],
            env={**os.environ, "REMEDIATE_STATE_DIR": str(tmp_path / "state")},
            capture_output=True,
            text=True,
            check=False,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        remove_layout(dev, layout)
        dev.sh(f"rm -rf {QUARANTINE}")


def test_randomized_layouts_lose_only_orphans(
    lab_devices: LabDevices, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Ten random layouts (images, containers, 0-2 orphans) on three devices: only orphans go."""
    devices = lab_devices(3)
    inventory = lab_inventory(devices)
    base_seed = int(os.environ.get("REMEDIATE_LAYOUT_SEED") or secrets.randbelow(10**6))
    seeds = [base_seed + i for i in range(CI_LAYOUTS)]
    shares = [seeds[i :: len(devices)] for i in range(len(devices))]
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [
            pool.submit(run_layouts, dev, inventory, share, tmp_path)
            for dev, share in zip(devices, shares, strict=True)
        ]
        results = [r for f in futures for r in f.result()]
    assert len(results) == CI_LAYOUTS
    failed = {layout.seed: (layout.actions, problems) for layout, problems in results if problems}
    assert not failed, f"REMEDIATE_LAYOUT_SEED={base_seed}: {failed}"


def test_in_flight_import_skips_with_the_guard_message(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """An orphan that qualifies, but an import is extracting a layer: nothing is touched."""
    dev = lab_device
    orphan = lab_faults.make_orphan_layer(dev, size_mb=1)
    dev.balena("start", APP_CONTAINER)
    lab_faults.start_pull(dev)
    before = layer_listing(dev)
    report = run_apply(lab_inventory([dev]), dev.name, tmp_path / "state", FRESH)
    (host,) = report["hosts"]
    assert host["outcome"] == "skipped", host
    assert host["reason"].startswith("guard nothing_in_flight: layer creation is in flight")
    assert not host["steps"]
    (host_plan,) = report["plan"]["hosts"]
    scan = host_plan["evidence"]["scan"]
    assert scan["in_flight"] is True
    assert "layer extraction running" in scan["in_flight_reason"]
    after = layer_listing(dev)
    assert before.dirs <= after.dirs  # the import may have added to its own dir; nothing went
    assert orphan in after.dirs


def test_young_orphan_does_not_qualify_with_the_default_min_age(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """A seconds-old orphan is a candidate, not qualifying: the device is healthy."""
    dev = lab_device
    orphan = lab_faults.make_orphan_layer(dev, size_mb=1)
    before = layer_listing(dev)
    report = run_apply(lab_inventory([dev]), dev.name, tmp_path / "state")
    (host,) = report["hosts"]
    assert host["outcome"] == "healthy", host
    (host_plan,) = report["plan"]["hosts"]
    scan = host_plan["evidence"]["scan"]
    assert scan["min_age_s"] == 3600
    candidate = next(c for c in scan["candidates"] if c["id"] == orphan)
    assert candidate["age_s"] < 3600
    assert candidate["bytes"] >= 1024 * 1024
    assert scan["qualifying"] == []
    assert layer_listing(dev) == before


def test_fewer_dirs_than_references_blocks(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """Metadata naming more layer dirs than exist (the engine's own guard): nothing moves."""
    dev = lab_device
    orphan = lab_faults.make_orphan_layer(dev, size_mb=1)
    surplus = len(lab_faults.layer_dirs(dev)) - len(lab_faults.referenced_layers(dev)) + 1
    fakes = [secrets.token_hex(32) for _ in range(surplus)]
    layerdb = f"{DOCKER}/image/overlay2/layerdb/sha256"
    try:
        for fake in fakes:
            dev.sh(
                'mkdir "$1/$2" && printf %s "$3" > "$1/$2/cache-id"',
                layerdb,
                fake,
                secrets.token_hex(32),
            )
        before = layer_listing(dev)
        report = run_apply(lab_inventory([dev]), dev.name, tmp_path / "state", FRESH)
        (host,) = report["hosts"]
        assert host["outcome"] == "skipped", host
        assert host["reason"].startswith("guard dirs_vs_references: fewer layer dirs than")
        (host_plan,) = report["plan"]["hosts"]
        scan = host_plan["evidence"]["scan"]
        assert scan["dirs"] < scan["references"]
        assert orphan in [c["id"] for c in scan["qualifying"]]  # it would qualify otherwise
        assert layer_listing(dev) == before
    finally:
        for fake in fakes:
            dev.sh('rm -rf "$1/$2"', layerdb, fake)


def test_playbook_rechecks_items_restores_on_failed_check_and_restarts_on_request(
    lab_device: Device, lab_inventory: LabInventory, tmp_path: Path
) -> None:
    """At action time referenced and malformed items are skipped; a failed check moves back."""
    dev = lab_device
    orphan = lab_faults.make_orphan_layer(dev, size_mb=1)
    dev.balena("start", APP_CONTAINER)
    referenced = sorted(lab_faults.referenced_layers(dev))
    inventory = lab_inventory([dev])
    executor = AnsibleExecutor(AnsibleSettings(work_dir=tmp_path / "work"))
    items: list[Any] = [referenced[0], orphan, "../../etc", {"id": referenced[-1]}, {"x": 1}]

    def quarantine(run_id: str, **extra: str) -> tuple[HostStatus, str, str]:
        request = PlaybookRequest(
            playbook=PLAYBOOK,
            hosts=(dev.name,),
            extravars={"remediate_items": items, "remediate_run_id": run_id, **extra},
            label=run_id,
        )
        result = executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "art")
        (res,) = result.values()
        moved = next(t for t in res.tasks if t.name.startswith("Move each dir"))
        return res.status, res.message, moved.stdout

    before = layer_listing(dev)
    link = short_link(dev, orphan)
    status, message, moved = quarantine("restore-1", engine_cli="/bin/false", min_age="0")
    assert status is HostStatus.FAILED
    assert "RESTORED" in message
    assert f"quarantined {orphan}" in moved
    assert f"skipped {referenced[0]}: the fresh scan does not list it" in moved
    assert f"skipped {referenced[-1]}: the fresh scan does not list it" in moved
    assert "skipped ../../etc: not a layer id" in moved
    assert layer_listing(dev) == before  # the orphan and its link are back
    assert dev.sh(f"test -e {QUARANTINE}", check=False).returncode != 0

    pid = lab_faults.engine_pid(dev)
    status, message, moved = quarantine("restart-1", min_age="0", restart_engine="true")
    assert status is HostStatus.OK, message
    after = layer_listing(dev)
    assert before.dirs - after.dirs == {orphan}
    assert before.links - after.links == {link}
    assert not after.dirs - before.dirs
    assert lab_faults.engine_pid(dev) not in {0, pid}  # restarted, and running
    assert set(referenced) <= after.dirs
    assert broken_images(dev) == []
    assert dev.sh(f"test -e {QUARANTINE}", check=False).returncode != 0


SCAN = ROOT / "runbooks" / "checks" / "orphan-layers.sh"


def _scan(dev: Device, min_age: int = 0) -> subprocess.CompletedProcess[str]:
    """Run the check script over SSH as the probe does (``param_min_age`` in the environment)."""
    script = shlex.quote(SCAN.read_text(encoding="utf-8"))
    return dev.ssh(f"param_min_age={min_age} sh -c {script}")


def test_scan_never_qualifies_mounted_lower_open_or_odd_dirs(lab_device: Device) -> None:
    """Unreferenced dirs that are mounted, a lower layer, open or oddly named never qualify."""
    dev = lab_device
    ov = f"{DOCKER}/overlay2"
    fake = {name: secrets.token_hex(32) for name in ("plain", "mounted", "lower", "open")}
    shorts = {name: secrets.token_hex(13).upper() for name in fake}
    odd = ["not-a-layer", secrets.token_hex(32).upper(), f"{secrets.token_hex(32)}-x"]
    setup = 'set -e; cd "$1"; shift\n' + "".join(
        f"mkdir -p {i}/diff && printf %s {shorts[n]} > {i}/link && echo x > {i}/diff/f\n"
        for n, i in fake.items()
    )
    setup += f"printf %s l/{shorts['lower']} > {fake['plain']}/lower\n"
    setup += f"mount -t tmpfs lab {fake['mounted']}/diff\n"
    setup += "".join(f"mkdir {o}\n" for o in odd)
    setup += f"touch {secrets.token_hex(32)}\n"  # a file, not a dir
    dev.sh(setup, ov)
    hold = f"{ov}/{fake['open']}/diff/f"
    holder = subprocess.Popen(
        dev.nsenter_args(["sh", "-c", 'exec 3< "$1"; echo $$; exec sleep 600', "sh", hold]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    holder_pid = holder.stdout.readline().strip()  # the file is open once this is printed
    try:
        assert holder_pid.isdigit()
        result = _scan(dev)
        assert result.returncode == 0, result.stderr
        scan = json.loads(result.stdout)
        by_id = {c["id"]: c for c in scan["candidates"]}
        assert {c["id"] for c in scan["qualifying"]} == {fake["plain"]}
        assert by_id[fake["mounted"]]["mounted"] is True
        assert by_id[fake["lower"]]["lower"] is True
        assert by_id[fake["open"]]["open"] is True
        assert not set(odd) & set(by_id)
        assert scan["unexpected"] == len(odd) + 1
        assert scan["dirs"] == len(lab_faults.layer_dirs(dev))
        assert _scan(dev, min_age=3600).stdout.count(fake["plain"]) == 1  # candidate only
    finally:
        dev.run(["kill", holder_pid], check=False)
        holder.communicate(timeout=60)
        dev.sh(f'umount "$1/{fake["mounted"]}/diff" || true', ov)
        names = [*fake.values(), *odd]
        dev.sh('cd "$1"; shift; rm -rf -- "$@"; find . -maxdepth 1 -type f -delete', ov, *names)


def test_scan_refuses_unreadable_metadata(lab_device: Device) -> None:
    """An empty or malformed reference file makes the scan fail instead of guessing."""
    dev = lab_device
    chain = f"{DOCKER}/image/overlay2/layerdb/sha256/{secrets.token_hex(32)}"
    try:
        for content in ("", "not-an-id\n"):
            dev.sh('mkdir -p "$1" && printf %s "$2" > "$1/cache-id"', chain, content)
            result = _scan(dev)
            assert result.returncode == 3, result.stdout
            assert "is empty or not a layer id" in result.stderr
            assert not result.stdout
    finally:
        dev.sh('rm -rf "$1"', chain)


def test_scan_script_passes_ansible_argument_splitting() -> None:
    """The probe goes through Ansible's splitter: the script holds no Jinja delimiter."""
    text = SCAN.read_text(encoding="utf-8")
    assert "{#" not in text
    assert "{%" not in text
    assert text.count("{{") == text.count("}}")
