"""Sustained webhook ingest per server process: throughput, latency, memory; SQLite and PostgreSQL.

Starts ``python -m engine.server`` (workers: 0, so nothing runs: this measures intake) on a
1,000-device inventory and sends realistic Alertmanager bodies (25 alerts per notification,
shaped like the shared fixtures; about 30 % of the alerts in every notification re-send
firings already sent, as Alertmanager's re-sends do).  Every alert is authenticated, parsed,
routed, durably recorded (SQLite, ``synchronous=FULL``, group-committed) and audited before
the 202.  The client speaks HTTP/1.1 over raw keep-alive asyncio connections in this process.

Two phases against the same server process, measured the way wrk2 measures (a closed loop
only ever shows latency at saturation, where it is queueing by construction):

(a) **saturation** (closed loop): ``--connections`` connections each send the next
    notification as soon as the previous answer arrives, for ``--seconds``.  Gives the
    maximum sustained alerts/s: the throughput verdict.  Its latencies are printed for
    information only (they are ``connections / throughput`` by construction).
(b) **fixed rate** (open loop): exactly ``--rate`` alerts/s (5,000 = 200 notifications/s of
    25) for ``--seconds``.  Notification *i* has an intended send time ``t0 + i / rate``;
    its latency runs from that intended time to the last byte of the answer, so a stall
    delays, and counts against, every notification scheduled during it (no coordinated
    omission).  Bodies are generated before the phase starts; ``--open-connections``
    connections (64) mean a notification waits for a free one only when the server stalls,
    and the client's own lateness (when it starts writing a notification minus the intended
    time, for notifications whose turn found the schedule kept) is printed so that a slow
    client can be told from a slow server.  The p99 verdict uses this
    phase, provided the offered rate was sustained (no errors, accepted alerts/s within 2 %
    of offered).

RSS: the server's peak over both phases (``VmHWM``, which the kernel keeps).  The script
prints the load average before and after, and per phase the CPU time used by the server,
by this client and by everything else on the machine (other processes and kernel threads,
from ``/proc/stat``): a phase where other work took CPU is perturbed and should be re-run.
Prints figures; asserts nothing.

With ``--state-url`` the same two phases then run against PostgreSQL (state and audit chain
in the database, ``synchronous_commit`` on), with one server process and then two replicas
on the same database, each replica offered ``--replica-rate`` (2,500 alerts/s) in phase (b)
and measured on its own; all figures are printed together, SQLite's first.  ``--state-url
postgres`` starts a durable PostgreSQL of its own (Debian's binaries, a temp dir, a fresh
database per measurement, the way the tests do); a ``postgresql://`` URL uses that server.

    python bench/ingest.py [--seconds 20] [--batch 25] [--connections 8] [--rate 5000]
                           [--open-connections 64] [--devices 1000]
                           [--state-url postgres|postgresql://...] [--replica-rate 2500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' free-port helper

from tests.support.ports import free_port  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway local credential
DUPLICATE_SHARE = 0.3
TARGET_RATE = 5000.0
TARGET_P99_MS = 10.0
TARGET_RSS_MB = 120.0
#: Per replica against PostgreSQL (a network round trip per statement, shared by replicas).
TARGET_RATE_REPLICA = 2500.0
TARGET_P99_MS_REPLICA = 50.0
#: The offered rate counts as sustained when accepted alerts/s are at least this share of it.
SUSTAINED_SHARE = 0.98
REQUEST_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {name: disk-full, title: Data partition full}
targets: {hosts: fleet}
triggers:
  - alertname: [NodeFilesystemAlmostOutOfSpace]
    match: {mountpoint: /mnt/data}
    device_label: balena_uuid
    device_var: balena_uuid
    mode: plan
checks:
  - {id: free, run: "echo 5", parse: int}
symptom: "checks.free < 10"
steps:
  - {id: clean, playbook: noop.yml, plan: "clean up"}
verify: "checks.free >= 10"
"""

PLAYBOOK = """\
- name: Nothing
  hosts: all
  gather_facts: false
  tasks:
    - name: Nothing
      ansible.builtin.raw: "true"
"""


# --------------------------------------------------------------------------- the project


def _uuid(n: int) -> str:
    return hashlib.sha256(f"device-{n}".encode()).hexdigest()[:32]


def _project(base: Path, devices: int, port: int) -> Path:
    (base / "runbooks").mkdir(parents=True)
    (base / "playbooks").mkdir()
    (base / "runbooks" / "disk.yml").write_text(RUNBOOK)
    (base / "playbooks" / "noop.yml").write_text(PLAYBOOK)
    lines = ["[fleet]"]
    lines += [f"dev{n:05d} ansible_connection=local balena_uuid={_uuid(n)}" for n in range(devices)]
    (base / "hosts.ini").write_text("\n".join(lines) + "\n")
    config = base / "server.yml"
    config.write_text(
        f"inventory: {base / 'hosts.ini'}\n"
        f"runbooks_dir: {base / 'runbooks'}\n"
        f"playbooks_dir: {base / 'playbooks'}\n"
        f"listen: {{port: {port}}}\n"
        f"auth: {{token: {TOKEN}}}\n"
        "workers: 0\n"
        # Keep the breaker closed: the bench measures the full routing-and-queueing path.
        "breaker: {max_alerting_pct: 100, min_alerting_devices: 1000000}\n"
    )
    config.chmod(0o600)  # it holds the token
    return config


# --------------------------------------------------------------------------- bodies


def _alert(device: int, starts: datetime) -> dict[str, object]:
    uuid = _uuid(device)
    short = uuid[:7]
    starts_at = starts.isoformat().replace("+00:00", "Z")
    labels = {
        "alertname": "NodeFilesystemAlmostOutOfSpace",
        "balena_uuid": uuid,
        "device": "/dev/mmcblk0p6",
        "fstype": "ext4",
        "instance": f"{short}.balena:9100",
        "job": "node",
        "mountpoint": "/mnt/data" if device % 5 else "/",  # some match no trigger
        "severity": "warning",
    }
    return {
        "status": "firing",
        "labels": labels,
        "annotations": {
            "description": f"Filesystem on /dev/mmcblk0p6 at {short}.balena:9100 has 3.91% left.",
            "runbook_url": "https://runbooks.example/balena/data-partition-full",
            "summary": "Filesystem has less than 5% space left.",
        },
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=node_filesystem_avail_bytes",
        "fingerprint": hashlib.sha256(f"{uuid}{starts_at}".encode()).hexdigest()[:16],
    }


def _body(alerts: list[dict[str, object]]) -> bytes:
    return json.dumps(
        {
            "receiver": "remediation-engine",
            "status": "firing",
            "alerts": alerts,
            "groupLabels": {"alertname": "NodeFilesystemAlmostOutOfSpace"},
            "commonLabels": {"alertname": "NodeFilesystemAlmostOutOfSpace", "job": "node"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093",
            "version": "4",
            "groupKey": '{}:{alertname="NodeFilesystemAlmostOutOfSpace"}',
            "truncatedAlerts": 0,
        }
    ).encode()


class _Feed:
    """Notifications with ~30 % re-sent firings (of the last 20,000 sent), made on demand."""

    def __init__(self, devices: int, batch: int, seed: int) -> None:
        self._devices, self._batch = devices, batch
        self._rng = random.Random(seed)  # noqa: S311 - load generation, not cryptography
        self._sent: list[dict[str, object]] = []
        self._epoch = datetime(2026, 11, 26, tzinfo=UTC)
        self._count = 0

    def next(self) -> bytes:
        repeats = round(self._batch * DUPLICATE_SHARE) if self._sent else 0
        alerts = [self._rng.choice(self._sent) for _ in range(repeats)]
        for _ in range(self._batch - repeats):
            self._count += 1
            device = self._rng.randrange(self._devices)
            fresh = _alert(device, self._epoch + timedelta(milliseconds=self._count))
            alerts.append(fresh)
            self._sent.append(fresh)
        if len(self._sent) > 20_000:
            del self._sent[:10_000]
        return _body(alerts)


# --------------------------------------------------------------------------- HTTP client


@dataclass(frozen=True)
class _Answer:
    """One 202: what the server counted."""

    alerts: int
    deduplicated: int
    queued: int


class _Connection:
    """One keep-alive HTTP/1.1 connection posting notifications to ``/webhook``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._head = (
            "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: "
        ).encode()

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def post(self, body: bytes) -> _Answer:
        self._writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise SystemExit(f"webhook answer without Content-Length: {head[:200]!r}")
        data = await self._reader.readexactly(length)
        if status != 202:
            raise SystemExit(f"webhook answered {status}: {data[:200]!r}")
        answer = json.loads(data)
        return _Answer(answer["alerts"], answer["deduplicated"], answer["queued"])

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


# --------------------------------------------------------------------------- measuring


def _proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise SystemExit(f"/proc/{pid}/status has no {key}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> float:
    """CPU-seconds all CPUs of the machine spent busy since boot (not idle, not iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest* are already in user/nice)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def _percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class _Usage:
    """What one phase cost: wall time, CPU of the server, the client and everything else."""

    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    peak_rss_kb: int = 0

    @property
    def other_cpu(self) -> float:
        return max(0.0, self.machine_cpu - self.server_cpu - self.client_cpu)


class _Meter:
    """Measures a phase's usage and samples the server's RSS while it runs."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.usage = _Usage()
        self._start = (0.0, 0.0, 0.0, 0.0)
        self._sampler: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            rss = _proc_status_kb(self._pid, "VmRSS")
            self.usage.peak_rss_kb = max(self.usage.peak_rss_kb, rss)
            await asyncio.sleep(0.25)

    def start(self) -> None:
        pid = self._pid
        self._start = (time.monotonic(), _cpu_seconds(pid), _client_cpu(), _machine_busy())
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    def stop(self) -> _Usage:
        assert self._sampler is not None
        self._sampler.cancel()
        wall, server, client, machine = self._start
        u = self.usage
        u.wall = time.monotonic() - wall
        u.server_cpu = _cpu_seconds(self._pid) - server
        u.client_cpu = _client_cpu() - client
        u.machine_cpu = _machine_busy() - machine
        u.peak_rss_kb = max(u.peak_rss_kb, _proc_status_kb(self._pid, "VmRSS"))
        return u


@dataclass
class _Phase:
    """Answers and latencies (seconds) of one phase."""

    answers: list[_Answer] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)  # fixed rate: write minus intended
    waited_for_connection: int = 0
    span: float = 0.0  # fixed rate: first intended send to last answer
    usage: _Usage = field(default_factory=_Usage)

    @property
    def alerts(self) -> int:
        return sum(a.alerts for a in self.answers)


async def _saturate(port: int, feed: _Feed, connections: int, seconds: float) -> _Phase:
    """Phase (a): closed loop, each connection sends again as soon as it is answered."""
    phase = _Phase()
    conns = [await _Connection.open(port) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds

    async def run(conn: _Connection) -> None:
        while loop.time() < stop_at:
            body = feed.next()
            started = time.perf_counter()
            answer = await asyncio.wait_for(conn.post(body), REQUEST_TIMEOUT)
            phase.latencies.append(time.perf_counter() - started)
            phase.answers.append(answer)

    await asyncio.gather(*(run(c) for c in conns))
    for conn in conns:
        await conn.close()
    return phase


async def _fixed_rate(port: int, bodies: list[bytes], interval: float, connections: int) -> _Phase:
    """Phase (b): open loop, body *i* is due at ``t0 + i * interval``; latency from then."""
    phase = _Phase()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    conns = [await _Connection.open(port) for _ in range(connections)]
    for conn in conns:
        idle.put_nowait(conn)
    tasks: set[asyncio.Task[None]] = set()
    last_answer = 0.0

    async def send(conn: _Connection, body: bytes, due: float, on_time: bool) -> None:
        nonlocal last_answer
        if on_time:  # the schedule was kept up to here: any delay now is the client's
            phase.lateness.append(time.perf_counter() - due)
        answer = await asyncio.wait_for(conn.post(body), REQUEST_TIMEOUT)
        done = time.perf_counter()
        idle.put_nowait(conn)
        phase.latencies.append(done - due)
        phase.answers.append(answer)
        last_answer = max(last_answer, done)

    t0 = time.perf_counter() + 0.05
    for i, body in enumerate(bodies):
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle.empty():
            phase.waited_for_connection += 1
            conn = await idle.get()
        else:
            conn = idle.get_nowait()
        task = asyncio.get_running_loop().create_task(send(conn, body, due, delay > 0))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
    phase.span = last_answer - t0
    for conn in conns:
        await conn.close()
    return phase


async def _measured(pid: int, run: Callable[[], Coroutine[Any, Any, _Phase]]) -> _Phase:
    meter = _Meter(pid)
    meter.start()
    phase = await run()
    phase.usage = meter.stop()
    return phase


# --------------------------------------------------------------------------- the server


async def _wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            if answer.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("server did not become healthy")


@dataclass
class _Run:
    """Everything measured against one backend with one or more replicas."""

    label: str
    replicas: int
    rate: float  # alerts/s offered to each replica in phase (b)
    saturation: list[_Phase]  # per replica
    fixed: list[_Phase]
    hwm_kb: list[int]
    stored: str  # what the state took on disk, when known
    load_before: str
    load_after: str
    curve: list[tuple[float, _Phase]] = field(default_factory=list)  # --curve: rate, phase


def _start_server(config: Path, state: Path, url: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REMEDIATE_STATE_DIR": str(state)}
    if url is not None:
        env["REMEDIATE_STATE_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", "engine.server", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _bench(
    args: argparse.Namespace, base: Path, *, url: str | None, replicas: int, rate: float
) -> _Run:
    """Start ``replicas`` servers on the state ``url`` (None: SQLite in the state dir); measure."""
    load_before = _load()
    base.mkdir()
    ports = [free_port() for _ in range(replicas)]
    configs = [_project(base / f"r{n}", args.devices, port) for n, port in enumerate(ports)]
    state = base / "state"
    procs = [_start_server(config, state, url) for config in configs]
    try:
        for port, proc in zip(ports, procs, strict=True):
            await _wait_healthy(port, proc)
        feeds = [_Feed(args.devices, args.batch, seed=1 + n) for n in range(replicas)]
        await asyncio.gather(
            *(_saturate(p, f, args.connections, 1.0) for p, f in zip(ports, feeds, strict=True))
        )  # warm-up
        saturation = await _measured_all(
            [p.pid for p in procs],
            [
                lambda p=p, f=f: _saturate(p, f, args.connections, args.seconds)  # type: ignore[misc]
                for p, f in zip(ports, feeds, strict=True)
            ],
        )
        per_second = rate / args.batch
        bodies = [[f.next() for _ in range(round(per_second * args.seconds))] for f in feeds]
        await asyncio.sleep(1.0)  # let the servers settle after generating the bodies
        fixed = await _measured_all(
            [p.pid for p in procs],
            [
                lambda p=p, b=b: _fixed_rate(p, b, 1 / per_second, args.open_connections)  # type: ignore[misc]
                for p, b in zip(ports, bodies, strict=True)
            ],
        )
        curve = []
        if replicas == 1:
            for offered in args.curve:
                (phase,) = await _measured_all(
                    [procs[0].pid],
                    [
                        lambda o=offered: _fixed_rate(  # type: ignore[misc]
                            ports[0],
                            [feeds[0].next() for _ in range(round(o / args.batch * args.seconds))],
                            args.batch / o,
                            args.open_connections,
                        )
                    ],
                )
                curve.append((offered, phase))
        hwm = [_proc_status_kb(p.pid, "VmHWM") for p in procs]
        if url is None:
            db = sum(p.stat().st_size for p in state.glob("state.db*"))
            audit = (state / "audit.jsonl").stat().st_size
            stored = f"state.db + WAL {db / 2**20:.1f} MB, audit log {audit / 2**20:.1f} MB"
        else:
            stored = "state and audit chain in PostgreSQL"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
    label = "sqlite" if url is None else "postgresql"
    return _Run(label, replicas, rate, saturation, fixed, hwm, stored, load_before, _load(), curve)


async def _measured_all(
    pids: list[int], runs: list[Callable[[], Coroutine[Any, Any, _Phase]]]
) -> list[_Phase]:
    """Run one phase against every replica at once, each measured on its own server."""
    return list(
        await asyncio.gather(*(_measured(pid, run) for pid, run in zip(pids, runs, strict=True)))
    )


# --------------------------------------------------------------------------- the report


def _usage_line(u: _Usage, alerts: int) -> str:
    per_cpu = f"{alerts / u.server_cpu:,.0f}" if u.server_cpu else "-"
    return (
        f"  CPU                server {u.server_cpu:.1f} s ({per_cpu} alerts per CPU-second),"
        f" client {u.client_cpu:.1f} s, everything else {u.other_cpu:.1f} s"
        f" of {u.wall * (os.cpu_count() or 1):.0f} CPU-s"
    )


def _latency_line(title: str, seconds: list[float], note: str = "") -> str:
    ordered = sorted(s * 1000 for s in seconds)
    return (
        f"  {title:<18} p50 {_percentile(ordered, 0.5):.2f} ms   p99 "
        f"{_percentile(ordered, 0.99):.2f} ms   p99.9 {_percentile(ordered, 0.999):.2f} ms"
        f"   max {ordered[-1]:.2f} ms{note}"
    )


@dataclass(frozen=True)
class _Figures:
    """One replica's verdict figures."""

    sat_rate: float
    p99_ms: float
    sustained: bool
    hwm_mb: float


def _report_replica(args: argparse.Namespace, run: _Run, n: int) -> _Figures:
    sat, fix = run.saturation[n], run.fixed[n]
    sat_rate = sat.alerts / sat.usage.wall
    dups = sum(a.deduplicated for a in sat.answers)
    who = f"replica {n + 1} of {run.replicas}, " if run.replicas > 1 else ""
    print(
        f"(a) saturation: {who}{args.connections} closed-loop connections, {sat.usage.wall:.1f} s"
    )
    print(
        f"  accepted           {sat.alerts:>9,} alerts  ({sat_rate:,.0f}/s,"
        f" {len(sat.answers) / sat.usage.wall:,.0f} notifications/s)"
    )
    print(
        f"  deduplicated       {dups:>9,} alerts  ({dups / sat.usage.wall:,.0f}/s,"
        f" {dups / max(1, sat.alerts):.0%}); runs queued {sum(a.queued for a in sat.answers):,}"
    )
    print(_latency_line("latency", sat.latencies, "   (queueing: closed loop)"))
    print(_usage_line(sat.usage, sat.alerts))
    offered = len(fix.answers) * args.batch  # every body has args.batch alerts
    fix_rate = fix.alerts / fix.span if fix.span else 0.0
    sustained = fix_rate >= SUSTAINED_SHARE * run.rate
    print(
        f"(b) fixed rate: {who}{run.rate:,.0f} alerts/s offered ({run.rate / args.batch:,.0f}"
        f" notifications/s, open loop) over {args.open_connections} connections,"
        f" {args.seconds:.0f} s"
    )
    print(
        f"  accepted           {fix.alerts:>9,} alerts  ({fix_rate:,.0f}/s over"
        f" {fix.span:.2f} s, first intended send to last answer): "
        f"{'sustained' if sustained else 'NOT sustained'} ({offered:,} offered)"
    )
    print(_latency_line("latency", fix.latencies, "   (from the intended send time)"))
    if fix.lateness:
        print(
            _latency_line(
                "client lateness",
                fix.lateness,
                f"   (write minus intended; {fix.waited_for_connection} waited for a connection)",
            )
        )
    print(_usage_line(fix.usage, fix.alerts))
    p99 = _percentile(sorted(fix.latencies), 0.99) * 1000
    return _Figures(sat_rate, p99, sustained, run.hwm_kb[n] / 1024)


def _report_curve(args: argparse.Namespace, run: _Run) -> None:
    """Latency against the offered rate (``--curve``): where the tail stays short."""
    print(f"(c) latency by offered rate, open loop as (b), {args.seconds:.0f} s each:")
    print(
        f"  {'offered/s':>9} {'accepted/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8}"
        f" {'server CPU':>10} {'alerts/CPU-s':>12}"
    )
    for offered, phase in run.curve:
        ordered = sorted(s * 1000 for s in phase.latencies)
        u = phase.usage
        print(
            f"  {offered:>9,.0f} {phase.alerts / phase.span if phase.span else 0:>10,.0f}"
            f" {_percentile(ordered, 0.5):>7.2f} {_percentile(ordered, 0.99):>7.2f}"
            f" {_percentile(ordered, 0.999):>8.2f} {u.server_cpu / u.wall:>10.0%}"
            f" {phase.alerts / u.server_cpu if u.server_cpu else 0:>12,.0f}"
        )


def _report(args: argparse.Namespace, runs: list[_Run]) -> None:
    print(
        f"ingest: {args.batch} alerts/notification, {args.devices} devices,"
        f" {DUPLICATE_SHARE:.0%} re-sent firings; {os.cpu_count()} CPUs"
    )
    table: list[tuple[_Run, list[_Figures]]] = []
    for run in runs:
        print(
            f"\n== {run.label}, {run.replicas} server process(es); load average before"
            f" {run.load_before}, after {run.load_after}"
        )
        figures = [_report_replica(args, run, n) for n in range(run.replicas)]
        print(
            f"  {run.stored}; server RSS peak (VmHWM) "
            + ", ".join(f"{f.hwm_mb:.1f} MB" for f in figures)
        )
        table.append((run, figures))
        if run.curve:
            _report_curve(args, run)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("\nverdict (per server process):")
    for run, figures in table:
        sqlite = run.label == "sqlite"
        target_rate = TARGET_RATE if sqlite else TARGET_RATE_REPLICA
        target_p99 = TARGET_P99_MS if sqlite else TARGET_P99_MS_REPLICA
        for n, f in enumerate(figures, start=1):
            name = f"{run.label} {n}/{run.replicas}"
            ok_p99 = f.sustained and f.p99_ms < target_p99 and run.rate >= target_rate
            print(
                f"  {name:<15} {f.sat_rate:>8,.0f} alerts/s at saturation"
                f" (>= {target_rate:,.0f}: {verdict(f.sat_rate >= target_rate)});"
                f" p99 {f.p99_ms:7.2f} ms at {run.rate:,.0f}/s offered"
                f" (< {target_p99:g} ms: {verdict(ok_p99)}"
                + ("" if f.sustained else ", rate not sustained")
                + f"); RSS {f.hwm_mb:.1f} MB"
                + f" (< {TARGET_RSS_MB:g}: {verdict(f.hwm_mb < TARGET_RSS_MB)})"
            )
    busy = max(
        p.usage.other_cpu / p.usage.wall
        for run in runs
        for p in (*run.saturation, *run.fixed)
        if p.usage.wall
    )
    if busy > 0.1:
        print(
            f"  note: other processes used up to {busy:.2f} CPUs during a phase: the machine"
            " was not idle; re-run for clean figures"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--batch", type=int, default=25, help="alerts per notification")
    parser.add_argument(
        "--connections", type=int, default=8, help="closed-loop connections of phase (a)"
    )
    parser.add_argument(
        "--rate", type=float, default=TARGET_RATE, help="alerts/s offered in phase (b) (SQLite)"
    )
    parser.add_argument(
        "--replica-rate",
        type=float,
        default=TARGET_RATE_REPLICA,
        help="alerts/s offered to each PostgreSQL replica in phase (b)",
    )
    parser.add_argument("--open-connections", type=int, default=64, help="connections of phase (b)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--curve",
        type=lambda text: [float(rate) for rate in text.split(",") if rate],
        default=[],
        metavar="RATE,RATE,...",
        help="after phase (b), one open-loop phase per offered rate (alerts/s, one server): "
        "p50/p99 and server CPU by rate",
    )
    parser.add_argument(
        "--state-url",
        help="also measure PostgreSQL, one and two replicas: a postgresql:// URL of an empty "
        "database, or 'postgres' to start a durable one of its own in a temp dir",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="remediate-bench-") as tmp:
        runs = [
            asyncio.run(_bench(args, Path(tmp) / "sqlite", url=None, replicas=1, rate=args.rate))
        ]
        if args.state_url:
            with _postgres(args.state_url) as urls:
                runs += [
                    asyncio.run(
                        _bench(
                            args,
                            Path(tmp) / f"postgres{replicas}",
                            url=next(urls),
                            replicas=replicas,
                            rate=args.replica_rate,
                        )
                    )
                    for replicas in (1, 2)
                ]
    _report(args, runs)


@contextlib.contextmanager
def _postgres(url: str) -> Iterator[Iterator[str]]:
    """Databases to measure: the given URL's, or fresh ones of a PostgreSQL started here."""
    if url != "postgres":
        yield itertools.repeat(url)
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.postgres import remove_postgres, start_postgres  # noqa: PLC0415 - dev only

    server = start_postgres(durable=True)  # synchronous_commit on, fsync on
    try:

        def fresh() -> Iterator[str]:
            for n in itertools.count():
                server.execute(f"CREATE DATABASE bench{n}")
                yield server.url(f"bench{n}")

        yield fresh()
    finally:
        remove_postgres(server)


if __name__ == "__main__":
    main()
