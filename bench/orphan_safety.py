#!/usr/bin/env python3
"""Randomized safety proof of the orphaned-layers runbook, over many more layouts than CI.

Brings up its own device lab (root; ``--devices`` devices, torn down at the end), then runs
``--layouts`` seeded layouts spread over the devices, the devices in parallel.  A layout is what
``tests/integration/test_runbook_orphaned_layers.py`` builds (the same helpers, so CI and this
script prove the same thing): 1-3 images on random layer stacks over the lab's images (which
share base layers), 1-3 containers created, running or stopped, and 0-2 orphans made by
killing the engine mid-import.  Each layout gets a real ``remediate run orphaned-layers
--apply --yes -e min_age=0s`` and is judged from inside the device: the orphans and only the
orphans (and their ``overlay2/l`` links) left ``overlay2/``, every image still runs a
container, every container still inspects, no quarantine is left behind.

Prints one line per layout and the figures: layouts, orphans made and quarantined, dirs
removed that were not orphans, orphans missed, images that no longer run, bytes freed, wall
seconds per layout.  Exits 1 when any layout went wrong: this is a safety result, not a timing
target.  Reproduce a run with ``--seed``.

``/tmp/venv/bin/python bench/orphan_safety.py [--layouts 30] [--devices 3] [--seed N]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.lab import Device, Lab, missing_requirements
from engine.lab import faults as lab_faults
from tests.integration.test_runbook_orphaned_layers import (
    FRESH,
    image_ids,
    layer_listing,
    layout_problems,
    make_layout,
    remove_layout,
    run_apply,
    short_link,
)

_PRINT = threading.Lock()


@dataclass(frozen=True)
class LayoutFigures:
    """How one layout went."""

    seed: int
    device: str
    orphans: int
    removed: int
    false_positives: int
    missed: int
    images: int
    bytes_freed: int
    seconds: float
    problems: tuple[str, ...]


def _one_layout(dev: Device, inventory: Path, seed: int, state_root: Path) -> LayoutFigures:
    started = time.monotonic()
    layout = make_layout(dev, seed)
    try:
        before = layer_listing(dev)
        links = {o: short_link(dev, o) for o in layout.orphans}
        report = run_apply(inventory, dev.name, state_root / f"{dev.name}-{seed}", FRESH)
        after = layer_listing(dev)
        problems = layout_problems(dev, layout, report, before, links)
        images = len(image_ids(dev))
    finally:
        remove_layout(dev, layout)
    removed = before.dirs - after.dirs
    orphans = set(layout.orphans)
    (host_plan,) = report["plan"]["hosts"]
    scan = host_plan["evidence"].get("scan", {})
    freed = scan.get("qualifying_bytes", 0) if report["hosts"][0]["outcome"] == "fixed" else 0
    return LayoutFigures(
        seed=seed,
        device=dev.name,
        orphans=len(orphans),
        removed=len(removed),
        false_positives=len(removed - orphans),
        missed=len(orphans - removed),
        images=images,
        bytes_freed=int(freed),
        seconds=time.monotonic() - started,
        problems=tuple(problems),
    )


def _device_share(
    dev: Device, inventory: Path, seeds: Sequence[int], state_root: Path
) -> list[LayoutFigures]:
    out = []
    for seed in seeds:
        figures = _one_layout(dev, inventory, seed, state_root)
        verdict = "ok" if not figures.problems else "PROBLEM: " + "; ".join(figures.problems)
        with _PRINT:
            print(
                f"seed {figures.seed:>8} {figures.device:>5}: {figures.orphans} orphans, "
                f"{figures.removed} dirs removed, {figures.images} images run, "
                f"{figures.bytes_freed / 2**20:6.1f} MiB freed, {figures.seconds:5.1f} s  "
                f"{verdict}",
                flush=True,
            )
        out.append(figures)
        lab_faults.clear_all(dev)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the layouts and print the figures; 1 when any layout went wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, default=30, help="how many layouts (default 30)")
    parser.add_argument("--devices", type=int, default=3, help="lab devices in parallel")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    args = parser.parse_args(argv)
    problems = missing_requirements()
    if problems:
        print("cannot run: " + "; ".join(problems), file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(10**6)
    seeds = [seed + i for i in range(args.layouts)]
    print(f"orphaned-layers safety bench: {args.layouts} layouts from seed {seed}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="orphan-safety-") as tmp:
        lab = Lab.up(Path(tmp) / "lab", devices=args.devices)
        try:
            up = time.monotonic() - started
            devices = lab.devices
            shares = [seeds[i :: len(devices)] for i in range(len(devices))]
            with ThreadPoolExecutor(max_workers=len(devices)) as pool:
                futures = [
                    pool.submit(_device_share, dev, lab.inventory_path, share, Path(tmp))
                    for dev, share in zip(devices, shares, strict=True)
                ]
                figures = [f for fut in futures for f in fut.result()]
        finally:
            lab.down()
    total = time.monotonic() - started
    bad = [f for f in figures if f.problems]
    seconds = [f.seconds for f in figures]
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"layouts:                 {len(figures)} on {args.devices} devices (lab up {up:.0f} s)")
    print(f"orphans made:            {sum(f.orphans for f in figures)}")
    print(f"dirs quarantined:        {sum(f.removed for f in figures)}")
    print(f"false positives:         {sum(f.false_positives for f in figures)} (must be 0)")
    print(f"orphans missed:          {sum(f.missed for f in figures)} (must be 0)")
    print(f"images run afterwards:   {sum(f.images for f in figures)}")
    print(f"bytes freed:             {sum(f.bytes_freed for f in figures)}")
    print(
        f"seconds per layout:      median {statistics.median(seconds):.1f}, "
        f"max {max(seconds):.1f}; total {total:.0f} s"
    )
    print(f"layouts with a problem:  {len(bad)} {[f.seed for f in bad]}")
    print("verdict:", "SAFE" if not bad else "UNSAFE OR BROKEN (see the lines above)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
