"""Distributed dry-run: `remediate plan --distributed` with 1, 2, 3 workers vs one process.

Starts a throw-away PostgreSQL (Debian's ``postgresql-15``, as the tests do), writes an
inventory of local-connection hosts (``bench/fleet.py``) and dry-runs the bundled
``stale-probe-scratch`` runbook over them: once with ``remediate plan`` in one process
(SQLite state, the default), then with ``remediate plan --distributed`` followed while N
``remediate worker --concurrency 1`` processes run its shards, for each N asked.

For each it prints wall seconds and CPU seconds: of the controller (the ``remediate``
command and its ``ansible-playbook`` children), of the workers (each worker and all the
processes it started, waited for), and of PostgreSQL (its server processes); total CPU per
host and its ratio to the single-process run's (target **≤ 1.15x**: distribution costs
little); the workers' peak RSS; and a projection for 100,000 hosts on M machines of C
CPUs from the measured per-host cost.  Local hosts run on this machine's CPUs too, so the
devices' work is inside these figures, as it is in the single-process run's.

``flock /tmp/remediate-bench.lock .venv/bin/python bench/distributed.py [--hosts 2000]
[--workers 1,2,3] [--shard-size 250] [--device-tmp DIR]``

``--memory 2000,10000`` instead measures memory: for each fleet size, one
``remediate plan --distributed --out plan.json`` with ``--workers`` workers (the first
count, concurrency 1), every process of the run (the following client, the workers with
the coordinator's and the shards' jobs, each worker's children: the Ansible inventory that
resolves the targets, the shards' ``ansible-playbook`` and its forks, and PostgreSQL's
backends) sampled every 0.1 s for its peak RSS (``VmHWM``); the peak per role, and its
per-host slope projected to 100,000 hosts.  ``--resolve-only`` cancels each run as soon as
its targets are resolved and its probe shards created (``remediate cancel``): the run then
ends ``aborted`` with every host recorded and reported, without probing them, which makes
a real 100,000-host measurement of the coordinator's resolution, its end and the client's
report cheap enough to run.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from fleet import add_device_tmp_option, device_tmp, write_inventory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.postgres import (  # noqa: E402
    PostgresServer,
    remove_postgres,
    start_postgres,
)

REMEDIATE = (sys.executable, "-c", "from engine.cli import main; main()")
RUNBOOK = "stale-probe-scratch"
CPU_TARGET = 1.15
PROJECTED_HOSTS = 100_000
#: The issue's memory ceiling per process.
RSS_CEILING_MB = 300


@dataclass(frozen=True)
class Figures:
    """One measured dry-run."""

    label: str
    wall: float
    controller_cpu: float
    worker_cpu: float
    database_cpu: float
    worker_rss_mb: float
    hosts: int

    @property
    def cpu(self) -> float:
        """All CPU seconds the run cost."""
        return self.controller_cpu + self.worker_cpu + self.database_cpu

    @property
    def per_host_ms(self) -> float:
        """CPU milliseconds per host."""
        return 1000 * self.cpu / self.hosts


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(proc: psutil.Process) -> float:
    """CPU of a process and its waited-for children, plus its live descendants'."""
    total = 0.0
    for one in [proc, *proc.children(recursive=True)]:
        try:
            t = one.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def _postgres_cpu(data_dir: Path) -> float:
    """CPU of the PostgreSQL server (postmaster and backends, live and ended)."""
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return _tree_cpu(psutil.Process(pid))


class _RssWatch:
    """The peak RSS of a set of process trees, sampled every 0.2 s."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs, self.peak = procs, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for proc in self.procs:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    before_cpu, start = _children_cpu(), time.monotonic()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if done.returncode not in {0, 1}:
        sys.exit(f"{' '.join(argv[3:])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall, _children_cpu() - before_cpu


def _migrated(server: PostgresServer, name: str, base: Path) -> str:
    """A new database ``name``, migrated by ``remediate state migrate``; its URL."""
    server.execute(f"CREATE DATABASE {name}")
    url = server.url(name)
    subprocess.run(
        [*REMEDIATE, "--state-url", url, "state", "migrate"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "REMEDIATE_STATE_DIR": str(base / "migrate")},
    )
    return url


def _start_workers(workers: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """``workers`` ``remediate worker --concurrency 1`` processes."""
    return [
        subprocess.Popen(
            [*REMEDIATE, "worker", "--concurrency", "1", "--heartbeat", "2"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]


def single(inventory: Path, base: Path, hosts: int) -> Figures:
    """``remediate plan`` in one process, SQLite state."""
    env = {**os.environ, "REMEDIATE_STATE_DIR": str(base / "single-state")}
    env.pop("REMEDIATE_STATE_URL", None)
    wall, cpu = _run([*REMEDIATE, "plan", RUNBOOK, "-i", str(inventory), "-o", "json"], env)
    return Figures("single process (SQLite)", wall, cpu, 0.0, 0.0, 0.0, hosts)


def distributed(
    inventory: Path, base: Path, url: str, data_dir: Path, workers: int, args: argparse.Namespace
) -> Figures:
    """``remediate plan --distributed`` with ``workers`` workers of concurrency 1."""
    env = {
        **os.environ,
        "REMEDIATE_STATE_DIR": str(base / f"dist-state-{workers}"),
        "REMEDIATE_STATE_URL": url,
    }
    started = _start_workers(workers, env)
    procs = [psutil.Process(p.pid) for p in started]
    try:
        time.sleep(3)  # imported and listening
        worker_before = sum(_tree_cpu(p) for p in procs)
        db_before = _postgres_cpu(data_dir)
        watch = _RssWatch(procs)
        argv = [*REMEDIATE, "plan", RUNBOOK, "-i", str(inventory), "--distributed"]
        wall, cpu = _run([*argv, "--shard-size", str(args.shard_size), "-o", "json"], env)
        rss = watch.stop()
        worker_cpu = sum(_tree_cpu(p) for p in procs) - worker_before
        db_cpu = _postgres_cpu(data_dir) - db_before
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(timeout=60)
    label = f"distributed, {workers} worker{'s' if workers > 1 else ''}"
    return Figures(label, wall, cpu, worker_cpu, db_cpu, rss, args.hosts)


def report(rows: list[Figures], args: argparse.Namespace) -> None:
    """The table, the verdict and the projection."""
    base = rows[0]
    print(
        f"  {'':28} {'wall s':>7} {'ctl cpu':>8} {'wrk cpu':>8} {'pg cpu':>7} "
        f"{'cpu/host ms':>11} {'x single':>8} {'wrk RSS MB':>10}"
    )
    for row in rows:
        print(
            f"  {row.label:28} {row.wall:7.1f} {row.controller_cpu:8.1f} {row.worker_cpu:8.1f} "
            f"{row.database_cpu:7.1f} {row.per_host_ms:11.1f} {row.cpu / base.cpu:8.2f} "
            f"{row.worker_rss_mb:10.0f}"
        )
    worst = max(rows[1:], key=lambda r: r.cpu)
    ratio = worst.cpu / base.cpu
    verdict = "met" if ratio <= CPU_TARGET else "MISSED"
    print(
        f"  total CPU per host, worst distributed / single: {ratio:.2f}x "
        f"(target ≤ {CPU_TARGET}x): {verdict}"
    )
    per_host = worst.per_host_ms / 1000
    total = per_host * PROJECTED_HOSTS
    print(
        f"  projection for {PROJECTED_HOSTS:,} hosts at {worst.per_host_ms:.1f} ms CPU per host "
        f"(devices' own share included, as here): {total / 60:.0f} CPU-minutes"
    )
    for machines in (1, 2, 4, 8):
        cores = machines * args.cpus
        print(
            f"    {machines} machine{'s' if machines > 1 else ' '} x {args.cpus} CPUs "
            f"({cores} workers of concurrency 1): ≈ {total / cores / 60:5.1f} min wall"
        )


# --------------------------------------------------------------------------- memory

#: Roles of the run's processes, in the order the table shows them.
ROLES = (
    "client (plan --distributed)",
    "worker (coordinator, shard jobs)",
    "target resolution (Ansible inventory)",
    "shard ansible-playbook (and forks)",
    "device commands (sh)",
    "PostgreSQL backend",
    "client's children",
)


def _hwm_kb(pid: int) -> int:
    """A process's peak RSS (``VmHWM``) in KiB; 0 once it is gone."""
    try:
        with Path(f"/proc/{pid}/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _role(proc: psutil.Process, root: str) -> str | None:
    """The role of a process of a tree; None for a fork not yet exec'd (ask again later)."""
    if root == "postgres":
        return ROLES[5]
    command = " ".join(proc.cmdline())
    if "from engine.cli import main" in command:
        return None
    if root == "client":
        return ROLES[6]
    if "remediate_targets.py" in command:
        return ROLES[2]
    if "ansible-playbook" in command or "ansible" in command:
        return ROLES[3]
    return ROLES[4]


class _PeakWatch:
    """Peak RSS per role over process trees (roots and every descendant), every 0.1 s."""

    def __init__(self, roots: list[tuple[psutil.Process, str]]) -> None:
        self.roots = roots
        self.peak: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.seen: dict[str, set[int]] = {role: set() for role in ROLES}
        self._roles: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        for root, kind in self.roots:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in tree:
                try:
                    key = (proc.pid, proc.create_time())
                    role = self._roles.get(key)
                    if role is None:
                        if proc is root:
                            role = {"worker": ROLES[1], "client": ROLES[0]}.get(kind)
                        role = role or _role(proc, kind)
                        if role is None:
                            continue
                        self._roles[key] = role
                except psutil.Error:
                    continue
                self.peak[role] = max(self.peak[role], _hwm_kb(proc.pid))
                self.seen[role].add(proc.pid)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {role: kb / 1024 for role, kb in self.peak.items()}


def _postgres_backends(data_dir: Path) -> psutil.Process:
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return psutil.Process(pid)


def _wait_resolved(url: str, deadline: float) -> str:
    """The run's id once its probe shards exist (its targets are resolved)."""
    import psycopg  # noqa: PLC0415 - only this mode reads the board directly

    while time.monotonic() < deadline:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT run_id FROM dist_runs WHERE phase <> 'resolve' LIMIT 1"
            ).fetchone()
        if row is not None:
            return str(row[0])
        time.sleep(0.5)
    sys.exit("the run's targets were not resolved in time")


def memory_run(
    hosts: int, base: Path, url: str, data_dir: Path, args: argparse.Namespace
) -> tuple[dict[str, float], float, dict[str, int]]:
    """One distributed dry-run of ``hosts`` hosts: peak RSS MiB per role, wall, processes."""
    inventory = base / f"inventory-{hosts}.yml"
    write_inventory(inventory, hosts)
    env = {
        **os.environ,
        "REMEDIATE_STATE_DIR": str(base / f"mem-state-{hosts}"),
        "REMEDIATE_STATE_URL": url,
    }
    workers = int(args.workers.split(",")[0])
    started = _start_workers(workers, env)
    try:
        time.sleep(3)  # imported and listening
        argv = [*REMEDIATE, "plan", RUNBOOK, "-i", str(inventory), "--distributed"]
        argv += ["--shard-size", str(args.shard_size), "-o", "json", "--out", str(base / "p.json")]
        start = time.monotonic()
        with (base / "client.out").open("w", encoding="utf-8") as out:
            client = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True
            )
        roots = [(psutil.Process(client.pid), "client")]
        roots += [(psutil.Process(p.pid), "worker") for p in started]
        roots.append((_postgres_backends(data_dir), "postgres"))
        watch = _PeakWatch(roots)
        if args.resolve_only:
            run_id = _wait_resolved(url, start + 3600)
            subprocess.run(
                [*REMEDIATE, "cancel", run_id], env=env, cwd=ROOT, check=True, capture_output=True
            )
        _, stderr = client.communicate()
        wall = time.monotonic() - start
        peaks = watch.stop()
        if client.returncode not in {0, 1}:
            sys.exit(f"plan --distributed exited {client.returncode}:\n{stderr[-3000:]}")
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(timeout=120)
    return peaks, wall, {role: len(pids) for role, pids in watch.seen.items()}


def memory(args: argparse.Namespace) -> int:
    """``--memory``: peak RSS per role per fleet size, and the projection to 100,000 hosts."""
    sizes = [int(n) for n in args.memory.split(",") if n.strip()]
    load_before = os.getloadavg()[0]
    results: list[tuple[int, dict[str, float], float, dict[str, int]]] = []
    server = start_postgres()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-distributed-mem-") as folder:
            base = Path(folder)
            with device_tmp(args.device_tmp):
                for number, hosts in enumerate(sizes):
                    url = _migrated(server, f"mem{number}", base)
                    peaks, wall, counts = memory_run(hosts, base, url, server.data, args)
                    results.append((hosts, peaks, wall, counts))
    finally:
        remove_postgres(server)
    what = "resolved, then cancelled" if args.resolve_only else "planned"
    print(
        f"distributed memory: remediate plan {RUNBOOK} --distributed over local-connection "
        f"hosts ({what}), {args.workers.split(',')[0]} worker(s) of concurrency 1, shards of "
        f"{args.shard_size}; load average {load_before:.1f} → {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs (a shared machine)"
    )
    print("  peak RSS (VmHWM) per role, MiB, the largest process of each role:")
    print(
        f"  {'hosts':>30} " + " ".join(f"{h:>9,}" for h, *_ in results) + "  per 1k hosts  at 100k"
    )
    for role in ROLES:
        values = [peaks[role] for _, peaks, _, _ in results]
        line = f"  {role:>30.30} " + " ".join(f"{v:9.0f}" for v in values)
        if len(results) > 1 and results[-1][0] != results[0][0]:
            slope = (values[-1] - values[0]) / (results[-1][0] - results[0][0])
            projected = values[-1] + slope * (PROJECTED_HOSTS - results[-1][0])
            flag = "" if projected <= RSS_CEILING_MB else f"  over {RSS_CEILING_MB}"
            line += f"  {1000 * slope:12.1f}  {projected:7.0f}{flag}"
        print(line)
    print(
        "  processes seen: "
        + "; ".join(
            f"{h:,} hosts: " + ", ".join(f"{c} {r.split(' (')[0]}" for r, c in counts.items() if c)
            for h, _, _, counts in results
        )
    )
    print("  walls: " + ", ".join(f"{h:,} hosts {w:.0f} s" for h, _, w, _ in results))
    print("  PostgreSQL's backends count the shared buffers they touched (64 MB here) in RSS.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=2000, help="fleet size [2000]")
    parser.add_argument("--workers", default="1,2,3", help="worker counts [1,2,3]")
    parser.add_argument("--shard-size", type=int, default=250, help="hosts per shard [250]")
    parser.add_argument("--cpus", type=int, default=4, help="CPUs per machine, projection [4]")
    parser.add_argument(
        "--memory", metavar="HOSTS", help="measure peak RSS per role at these fleet sizes"
    )
    parser.add_argument(
        "--resolve-only",
        action="store_true",
        help="with --memory: cancel each run once its targets are resolved",
    )
    add_device_tmp_option(parser)
    args = parser.parse_args()
    if args.memory:
        return memory(args)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    load_before = os.getloadavg()[0]
    server = start_postgres()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-distributed-") as folder:
            base = Path(folder)
            inventory = base / "inventory.yml"
            write_inventory(inventory, args.hosts)
            with device_tmp(args.device_tmp) as devices:
                rows = [single(inventory, base, args.hosts)]
                for number, workers in enumerate(counts):
                    url = _migrated(server, f"bench{number}", base)
                    rows.append(distributed(inventory, base, url, server.data, workers, args))
    finally:
        remove_postgres(server)
    print(
        f"distributed: remediate plan {RUNBOOK} over {args.hosts} local-connection hosts, "
        f"shards of {args.shard_size}; load average {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine inflates walls)"
    )
    print(f"  {devices}")
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
