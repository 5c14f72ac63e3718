#!/usr/bin/env python3
"""Scale: ``remediate plan`` over 100 to 1,000 local-connection hosts; wall time and memory.

For each fleet size the script generates an inventory (local connection, no Python on the
"devices") and runs ``remediate plan RUNBOOK -i INVENTORY -o json`` as a subprocess, with
state in a temporary folder.  Memory is measured two ways, both over the whole process tree
(``remediate``, its target-resolution child, ``ansible-playbook`` and its forks):

* **largest process RSS**: ``ru_maxrss`` of the run from ``os.wait4`` -- the kernel's peak
  resident set of the largest single process in the tree (every descendant is waited for).
  The verdict uses this figure.
* **tree PSS / RSS**: /proc sampled every ``--interval`` seconds; the peak of the summed
  proportional set size (shared pages split between the processes sharing them, so
  Ansible's forks are not counted many times over) and, for reference, the peak of the
  summed RSS (which counts every shared page once per process).  The ``remediate``
  process's own peak (``VmHWM``) is shown too.

Each engine run is followed by a baseline run (skip with ``--no-baseline``): plain
``ansible-playbook`` running the engine's own probe script in one ``raw`` task on the same
hosts, so growth that comes from Ansible itself can be told from growth the engine adds.

Growth from the smallest to the largest size is reported per host: the marginal wall time,
CPU time (user + system of the whole tree, from ``os.wait4``) and memory per added host
between consecutive sizes.  Growth is called linear (or better) when the marginal CPU time
per host of the last interval is at most 1.5x that of the first: CPU time, unlike wall time,
does not move when other work shares the machine.

Targets: peak RSS < 250 MB at 1,000 hosts, linear growth.  The default (4 sizes, 3 runs,
baseline on) takes 6-7 minutes on 2 idle CPUs; ``--max-hosts``, ``--repeat 1`` or
``--no-baseline`` run shorter.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleet import add_device_tmp_option, device_tmp, write_inventory

from engine.executors.ansible import write_probe_playbook
from engine.probes import build_probe_script, probe_timeout
from engine.runbooks import Runbook, load_runbook

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_RUNBOOK = ROOT / "runbooks" / "stale-probe-scratch.yml"
RSS_TARGET_MB = 250.0
LINEAR_SLACK = 1.5
ANSIBLE_ENV = {"ANSIBLE_NOCOLOR": "True", "ANSIBLE_RETRY_FILES_ENABLED": "False"}


def _status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (0 when the process is gone)."""
    try:
        with Path(f"/proc/{pid}/status").open(encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Pss of /proc/PID/smaps_rollup in kB (0 when unavailable)."""
    try:
        with Path(f"/proc/{pid}/smaps_rollup").open(encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass
class TreeSampler:
    """Samples a process tree's memory from /proc in a thread until stopped."""

    root: int
    interval: float
    peak_pss_kb: int = 0
    peak_rss_kb: int = 0
    root_hwm_kb: int = 0
    peak_procs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while not self._stop.is_set():
            pids = _descendants(self.root)
            rss = sum(_status_kb(p, "VmRSS") for p in pids)
            pss = sum(_pss_kb(p) for p in pids)
            self.root_hwm_kb = max(self.root_hwm_kb, _status_kb(self.root, "VmHWM"))
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Ask the sampling thread to end."""
        self._stop.set()


@dataclass(frozen=True)
class RunFigures:
    """One ``remediate plan`` run."""

    wall: float
    cpu: float
    maxrss_mb: float
    tree_pss_mb: float
    tree_rss_mb: float
    remediate_mb: float
    procs: int
    rc: int
    outcomes: Counter[str]
    error: str  # why a run failed (no report from the engine, or an exit code from Ansible)


def run_once(argv: Sequence[str], out: Path, interval: float, *, engine: bool = True) -> RunFigures:
    """Run ``argv`` once, sampling its process tree; wall time, memory and host outcomes.

    ``engine``: the command is ``remediate ... -o json``, whose report gives the outcomes.
    """
    env = {**os.environ, **ANSIBLE_ENV, "REMEDIATE_USER": "bench"}
    err = out.with_suffix(".stderr")
    with out.open("w", encoding="utf-8") as stdout, err.open("w", encoding="utf-8") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
        sampler = TreeSampler(proc.pid, interval)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage covers every reaped descendant
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        thread.join()
    outcomes: Counter[str] = Counter()
    failed = proc.returncode != 0
    if engine:
        try:
            outcomes.update(h["outcome"] for h in json.loads(out.read_text("utf-8"))["hosts"])
            failed = False
        except (ValueError, KeyError, TypeError):
            outcomes["no report"] += 1
    lines = err.read_text("utf-8", errors="replace").strip().splitlines()
    return RunFigures(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_mb=usage.ru_maxrss / 1024,  # Linux: kB
        tree_pss_mb=sampler.peak_pss_kb / 1024,
        tree_rss_mb=sampler.peak_rss_kb / 1024,
        remediate_mb=sampler.root_hwm_kb / 1024,
        procs=sampler.peak_procs,
        rc=proc.returncode,
        outcomes=outcomes,
        error=f"{argv[0]}: rc {proc.returncode}: {(lines or ['no stderr'])[-1]}" if failed else "",
    )


def write_baseline_play(path: Path, runbook: Runbook) -> None:
    """A plain play running the engine's own probe script in one raw task per host.

    Written as the engine writes it (:func:`engine.executors.ansible.write_probe_playbook`):
    the script holds ``{#`` in ``${#var}``, which Ansible would otherwise read as a template.
    """
    checks = runbook.spec.checks
    script = build_probe_script(checks, runbook.param_values(), "@@remediate-bench")
    write_probe_playbook(path, script, timeout=probe_timeout(checks))


@dataclass(frozen=True)
class SizeFigures:
    """Medians (wall) and maxima (memory) over the runs of one fleet size."""

    wall: float
    cpu: float
    maxrss_mb: float
    remediate_mb: float
    tree_pss_mb: float
    tree_rss_mb: float
    procs: int
    outcomes: Counter[str]
    rcs: tuple[int, ...]
    errors: tuple[str, ...]
    baseline_wall: float | None
    baseline_maxrss_mb: float | None

    @classmethod
    def of(cls, runs: Sequence[RunFigures], baseline: Sequence[RunFigures]) -> SizeFigures:
        """Aggregate the engine's runs and the baseline's runs of one size."""
        outcomes: Counter[str] = Counter()
        for r in runs:
            outcomes.update(r.outcomes)
        return cls(
            wall=statistics.median(r.wall for r in runs),
            cpu=statistics.median(r.cpu for r in runs),
            maxrss_mb=max(r.maxrss_mb for r in runs),
            remediate_mb=max(r.remediate_mb for r in runs),
            tree_pss_mb=max(r.tree_pss_mb for r in runs),
            tree_rss_mb=max(r.tree_rss_mb for r in runs),
            procs=max(r.procs for r in runs),
            outcomes=outcomes,
            rcs=tuple(sorted({r.rc for r in runs})),
            errors=tuple(r.error for r in [*runs, *baseline] if r.error),
            baseline_wall=statistics.median(r.wall for r in baseline) if baseline else None,
            baseline_maxrss_mb=max(r.maxrss_mb for r in baseline) if baseline else None,
        )


def measure(
    sizes: Sequence[int], runbook_path: Path, args: argparse.Namespace
) -> dict[int, SizeFigures]:
    """Run the engine (and the baseline) ``args.repeat`` times on each fleet size."""
    runbook = load_runbook(runbook_path)
    figures: dict[int, SizeFigures] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        baseline_play = root / "baseline.yml"
        write_baseline_play(baseline_play, runbook)
        for size in sizes:
            inventory = root / f"inventory-{size}.yml"
            write_inventory(inventory, size)
            engine = [
                str(BIN / "remediate"),
                *("--state-dir", str(root / "state"), "--runbooks", str(runbook_path.parent)),
                *("--playbooks", str(runbook.playbooks_dir), "plan", str(runbook_path)),
                *("-i", str(inventory), "-o", "json"),
            ]
            baseline = [
                *(str(BIN / "ansible-playbook"), "-i", str(inventory)),
                *("-f", str(args.forks), str(baseline_play)),
            ]
            runs, base = [], []
            for _ in range(args.repeat):
                runs.append(run_once(engine, root / "out", args.interval))
                if not args.no_baseline:
                    base.append(run_once(baseline, root / "out", args.interval, engine=False))
            figures[size] = SizeFigures.of(runs, base)
            print(f"  {size} hosts: {figures[size].wall:.1f} s", file=sys.stderr, flush=True)
    return figures


def report(figures: Mapping[int, SizeFigures]) -> None:
    """Print the table, the growth per host and the verdicts."""
    print(
        f"{'hosts':>6}  {'wall s':>7}  {'ms/host':>7}  {'base s':>6}  {'CPU s':>6}  "
        f"{'largest RSS MB':>14}  "
        f"{'remediate MB':>12}  {'tree PSS MB':>11}  {'tree RSS MB':>11}  {'procs':>5}  outcomes"
    )
    for size, f in figures.items():
        base = f"{f.baseline_wall:>6.2f}" if f.baseline_wall is not None else f"{'-':>6}"
        print(
            f"{size:>6}  {f.wall:>7.2f}  {f.wall / size * 1000:>7.1f}  {base}  {f.cpu:>6.1f}  "
            f"{f.maxrss_mb:>14.1f}  {f.remediate_mb:>12.1f}  {f.tree_pss_mb:>11.1f}  "
            f"{f.tree_rss_mb:>11.1f}  {f.procs:>5}  {dict(f.outcomes)} rc={list(f.rcs)}"
        )
        for error in f.errors:
            print(f"  run failed at {size} hosts: {error}")
    print(
        "  (base s: plain ansible-playbook running the engine's probe script on the same hosts; "
        "CPU s: user+system of the engine's whole process tree; largest RSS: ru_maxrss of the "
        "largest process in the tree, via os.wait4)"
    )
    sizes = list(figures)
    if len(sizes) > 1:
        print("growth per added host between consecutive sizes:")
        marginal = []
        for small, big in itertools.pairwise(sizes):
            a, b = figures[small], figures[big]
            per_host_ms = (b.wall - a.wall) / (big - small) * 1000
            per_host_cpu = (b.cpu - a.cpu) / (big - small) * 1000
            per_host_kb = (b.maxrss_mb - a.maxrss_mb) / (big - small) * 1024
            marginal.append(per_host_cpu)
            line = (
                f"  {small:>5} → {big:<5}  engine {per_host_ms:>6.1f} ms/host wall, "
                f"{per_host_cpu:>6.1f} ms/host CPU"
            )
            if a.baseline_wall is not None and b.baseline_wall is not None:
                base_ms = (b.baseline_wall - a.baseline_wall) / (big - small) * 1000
                line += f", baseline {base_ms:>6.1f} ms/host wall"
            print(f"{line}, {per_host_kb:>6.1f} kB/host (largest RSS)")
        first, last = figures[sizes[0]], figures[sizes[-1]]
        print(
            f"  {sizes[0]} → {sizes[-1]} hosts ({sizes[-1] / sizes[0]:g}x): "
            f"wall {last.wall / first.wall:.1f}x, CPU {last.cpu / first.cpu:.1f}x, "
            f"largest RSS {last.maxrss_mb / first.maxrss_mb:.2f}x"
        )
        if first.baseline_wall is not None and last.baseline_wall is not None:
            print(
                f"  engine minus baseline: {first.wall - first.baseline_wall:.2f} s at {sizes[0]}, "
                f"{last.wall - last.baseline_wall:.2f} s at {sizes[-1]} hosts"
            )
        ok = len(marginal) < 2 or marginal[-1] <= LINEAR_SLACK * max(marginal[0], 1e-9)
        growth = (
            f"CPU per added host, last interval {marginal[-1]:.1f} ms vs first {marginal[0]:.1f} ms"
            if len(marginal) > 1
            else "only two sizes"
        )
        print(f"growth: {growth} (target linear, ≤ {LINEAR_SLACK}x): {'ok' if ok else 'MISSED'}")
    top = figures[sizes[-1]]
    verdict = "ok" if top.maxrss_mb < RSS_TARGET_MB else "MISSED"
    print(
        f"peak RSS at {sizes[-1]} hosts: {top.maxrss_mb:.1f} MB, largest process of the tree "
        f"(target < {RSS_TARGET_MB:.0f} MB): {verdict}"
    )
    if top.baseline_maxrss_mb is not None:
        print(f"  (plain ansible-playbook's largest process: {top.baseline_maxrss_mb:.1f} MB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        default="100,250,500,1000",
        help="fleet sizes, comma-separated [100,250,500,1000]",
    )
    parser.add_argument("--max-hosts", type=int, default=None, help="drop sizes above this")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size [3]")
    parser.add_argument("--runbook", type=Path, default=DEFAULT_RUNBOOK, help="runbook file")
    parser.add_argument("--interval", type=float, default=0.2, help="/proc sampling, s [0.2]")
    parser.add_argument("--forks", type=int, default=50, help="baseline forks [50, the engine's]")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the plain ansible-playbook runs"
    )
    add_device_tmp_option(parser)
    args = parser.parse_args()

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if args.max_hosts is not None:
        sizes = [s for s in sizes if s <= args.max_hosts] or [args.max_hosts]
    runbook = args.runbook.resolve()
    load_before = os.getloadavg()[0]
    with device_tmp(args.device_tmp) as devices:
        figures = measure(sizes, runbook, args)
    print(
        f"scale: remediate plan {runbook.stem} over local-connection hosts, {args.repeat} runs "
        f"per size (wall: median; memory: max); load average {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"  {devices}")
    report(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
