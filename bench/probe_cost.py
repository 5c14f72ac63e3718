#!/usr/bin/env python3
"""Probe cost vs number of checks: one check vs twelve, on the same local-connection hosts.

Both runbooks are generated into a temporary folder (with a trivial playbook in a sibling
``playbooks/`` folder) and probed through the engine's real probe path:
``engine.probes.run_probes`` with a real ``AnsibleExecutor`` (ansible-runner, one ``raw``
task per host).  The two sizes alternate, after a warm-up round, and the medians are compared.

Also printed, to tell the parts apart: the median time to run the generated probe script
once with ``sh`` on this machine (what one device pays on its own CPU), and an estimate of
the ratio without that device-side work.  With the local connection the 20 "devices" share
this machine's CPUs with Ansible, so device-side work that a real fleet does in parallel on
its own hardware shows up here as controller time.

The devices keep their probe scratch on a tmpfs, as balenaOS does (``--device-tmp``; see
``fleet.py``).

Target: probing with 12 checks costs at most 1.2x probing with 1 check.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet import add_fleet_options, fleet, write_runbook

from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.probes import ProbeStatus, build_probe_script, run_probes
from engine.runbooks import Runbook, load_runbook

TARGET = 1.2


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of every child it has reaped."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def probe_once(
    executor: AnsibleExecutor, inventory: Path, hosts: list[str], runbook: Runbook
) -> tuple[float, float, int]:
    """Wall and CPU seconds of one probe of every host; hosts with a bad probe or check."""
    cpu = cpu_seconds()
    started = time.perf_counter()
    probes = run_probes(executor, inventory, hosts, runbook.spec.checks, runbook.param_values())
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    bad = sum(
        1
        for p in probes.values()
        if p.status is not ProbeStatus.OK or not all(c.ok for c in p.checks.values())
    )
    return elapsed, cpu, bad


def sh_seconds(script: str, repeat: int) -> float:
    """Median wall seconds of running ``script`` once with ``sh`` on this machine."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(["sh", "-c", script], capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def device_seconds(runbook: Runbook, repeat: int) -> tuple[float, float]:
    """Seconds of the engine's probe script, and of the bare check commands, run with ``sh``."""
    params = runbook.param_values()
    script = build_probe_script(runbook.spec.checks, params, "@@remediate-bench")
    bare = "\n".join(c.command for c in runbook.spec.checks)
    return sh_seconds(script, repeat), sh_seconds(bare, repeat)


def report(
    args: argparse.Namespace,
    times: dict[int, list[float]],
    cpu: dict[int, list[float]],
    bad: dict[int, int],
    device: dict[int, tuple[float, float]],
    *,
    load_before: float,
    devices: str,
) -> None:
    """Print the table, the ratio and its verdict, and the device-side estimate."""
    cpus = len(os.sched_getaffinity(0))
    print(
        f"probe cost: {args.hosts} hosts, forks {args.forks}, {args.repeat} "
        f"rounds (+{args.warmup} warm-up), engine.probes.run_probes + AnsibleExecutor; "
        f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f} on {cpus} CPUs"
    )
    print(f"  {devices}")
    print(
        f"{'checks':>6}  {'median s':>9}  {'min s':>7}  {'max s':>7}  {'ms/host':>8}  "
        f"{'CPU s':>6}  {'script ms':>9}  {'bare ms':>7}  {'bad probes':>10}"
    )
    cpu_median = {n: statistics.median(c) for n, c in cpu.items()}
    median = {n: statistics.median(t) for n, t in times.items()}
    for n, t in times.items():
        print(
            f"{n:>6}  {median[n]:>9.3f}  {min(t):>7.3f}  {max(t):>7.3f}  "
            f"{median[n] / args.hosts * 1000:>8.1f}  {cpu_median[n]:>6.2f}  "
            f"{device[n][0] * 1000:>9.1f}  "
            f"{device[n][1] * 1000:>7.1f}  {bad[n]:>10}"
        )
    print(
        "  (CPU s: user+system of this process and every process it started, all hosts; "
        "script ms: the engine's probe script run once with sh here, what one device pays; "
        "bare ms: the same check commands without the framing)"
    )
    few, many = args.few, args.many
    ratio = median[many] / median[few]
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(f"ratio {many} vs {few} checks: {ratio:.2f} (target ≤ {TARGET}): {verdict}")
    print(f"CPU ratio {many} vs {few} checks: {cpu_median[many] / cpu_median[few]:.2f}")
    framing = (device[many][0] - device[many][1] - device[few][0] + device[few][1]) / max(
        many - few, 1
    )
    print(f"framing cost per added check on the device: {framing * 1000:.2f} ms")
    on_device = {n: device[n][0] * args.hosts / cpus for n in times}
    if all(median[n] > on_device[n] for n in times):
        estimate = (median[many] - on_device[many]) / (median[few] - on_device[few])
        print(
            f"estimate without device-side work ({args.hosts} hosts x script / {cpus} CPUs): "
            f"{estimate:.2f}"
        )
    if any(bad.values()):
        print("warning: some probes or checks failed; the figures may not mean what they say")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=20, help="hosts in the inventory [20]")
    parser.add_argument("--few", type=int, default=1, help="checks of the small runbook [1]")
    parser.add_argument("--many", type=int, default=12, help="checks of the large runbook [12]")
    parser.add_argument("--repeat", type=int, default=7, help="measured rounds per size [7]")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first [1]")
    parser.add_argument("--forks", type=int, default=50, help="Ansible forks [50, the engine's]")
    add_fleet_options(parser)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp,
        # the devices' TMPDIR is also sh's, in device_seconds
        fleet(Path(tmp), args.hosts, ssh=args.ssh, device_tmp_parent=args.device_tmp) as (
            inventory,
            hosts,
            devices,
        ),
    ):
        root = Path(tmp)
        sizes = (args.few, args.many)
        runbooks = {n: load_runbook(write_runbook(root, n)) for n in sizes}
        executor = AnsibleExecutor(AnsibleSettings(work_dir=root / "work", forks=args.forks))
        times: dict[int, list[float]] = {n: [] for n in sizes}
        cpu: dict[int, list[float]] = {n: [] for n in sizes}
        bad: dict[int, int] = dict.fromkeys(sizes, 0)
        for round_ in range(args.warmup + args.repeat):
            order = sizes if round_ % 2 == 0 else sizes[::-1]  # alternate to cancel drift
            for n in order:
                elapsed, used, failed = probe_once(executor, inventory, hosts, runbooks[n])
                if round_ >= args.warmup:
                    times[n].append(elapsed)
                    cpu[n].append(used)
                    bad[n] += failed
        device = {n: device_seconds(runbooks[n], 3 * args.repeat) for n in sizes}
    report(args, times, cpu, bad, device, load_before=load_before, devices=devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
