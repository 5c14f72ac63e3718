"""Sustained webhook ingest on one server process: throughput, latency, memory.

Starts ``python -m engine.server`` (workers: 0, so nothing runs: this measures intake) on a
1,000-device inventory, then sends realistic Alertmanager bodies (batches of alerts shaped like
the shared fixtures) from several keep-alive connections for a fixed time.  About 30 % of the
alerts in every batch repeat firings already sent (Alertmanager's re-sends).  Every alert is
routed, durably recorded (one SQLite transaction per notification) and audited before the 202.

Prints alerts/s accepted and deduplicated, request latency p50/p99, and the server's RSS.
Targets: >= 5,000 alerts/s, p99 < 10 ms, RSS < 120 MB.  Prints figures; asserts nothing.

    python bench/ingest.py [--seconds 20] [--batch 25] [--connections 8] [--devices 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a throwaway local credential
DUPLICATE_SHARE = 0.3

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


def _uuid(n: int) -> str:
    return hashlib.sha256(f"device-{n}".encode()).hexdigest()[:32]


def _project(base: Path, devices: int, port: int) -> Path:
    (base / "runbooks").mkdir()
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
    return config


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
    """Batches with ~30 % re-sent firings, generated on demand (thread-safe)."""

    def __init__(self, devices: int, batch: int, seed: int) -> None:
        self._devices, self._batch = devices, batch
        self._rng = random.Random(seed)  # noqa: S311 - load generation, not cryptography
        self._lock = threading.Lock()
        self._sent: list[dict[str, object]] = []
        self._epoch = datetime(2026, 11, 26, tzinfo=UTC)
        self._count = 0

    def next(self) -> bytes:
        with self._lock:
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


def _rss_kb(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become healthy")


def _client(port: int, feed: _Feed, stop_at: float, out: list[tuple[float, int, int, int]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    while time.monotonic() < stop_at:
        payload = feed.next()
        started = time.perf_counter()
        conn.request("POST", "/webhook", body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 202:
            raise SystemExit(f"webhook answered {response.status}: {data[:200]!r}")
        answer = json.loads(data)
        out.append((elapsed, answer["alerts"], answer["deduplicated"], answer["queued"]))
    conn.close()


@dataclass(frozen=True)
class _Server:
    """What was measured of the server process."""

    elapsed: float
    cpu: float
    load: float
    rss_kb: int
    peak_rss_kb: int
    hwm_kb: int
    db_bytes: int
    audit_bytes: int


def _report(
    args: argparse.Namespace, rows: list[tuple[float, int, int, int]], srv: _Server
) -> None:
    elapsed, cpu = srv.elapsed, srv.cpu
    latencies = sorted(r[0] * 1000 for r in rows)
    alerts = sum(r[1] for r in rows)
    dups = sum(r[2] for r in rows)
    queued = sum(r[3] for r in rows)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"ingest: {args.connections} connections, {args.batch} alerts/notification, "
        f"{args.devices} devices, {elapsed:.1f} s"
    )
    print(f"  notifications      {len(rows):>10,}   ({len(rows) / elapsed:,.0f}/s)")
    print(f"  alerts accepted    {alerts:>10,}   ({alerts / elapsed:,.0f}/s)   target >= 5,000/s")
    print(f"  deduplicated       {dups:>10,}   ({dups / elapsed:,.0f}/s, {dups / alerts:.0%})")
    print(f"  runs queued        {queued:>10,}")
    print(
        f"  server CPU         {cpu:>10.1f} s    ({alerts / cpu:,.0f} alerts per CPU-second;"
        f" load average {srv.load:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"  latency p50        {statistics.median(latencies):>10.2f} ms")
    print(f"  latency p99        {p99:>10.2f} ms   target < 10 ms")
    print(f"  latency max        {latencies[-1]:>10.2f} ms")
    print(
        f"  server RSS         {srv.rss_kb / 1024:>10.1f} MB   (peak sampled "
        f"{srv.peak_rss_kb / 1024:.1f} MB, high-water {srv.hwm_kb / 1024:.1f} MB)   target < 120 MB"
    )
    print(
        f"  state.db + WAL     {srv.db_bytes / 2**20:>10.1f} MB;"
        f"  audit log {srv.audit_bytes / 2**20:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=25, help="alerts per notification")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="remediate-bench-") as tmp:
        base = Path(tmp)
        port = _free_port()
        config = _project(base, args.devices, port)
        env = {**os.environ, "REMEDIATE_STATE_DIR": str(base / "state")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.server", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(port, proc)
            feed = _Feed(args.devices, args.batch, seed=1)
            warm: list[tuple[float, int, int, int]] = []
            _client(port, feed, time.monotonic() + 1.0, warm)
            results: list[list[tuple[float, int, int, int]]] = [[] for _ in range(args.connections)]
            stop_at = time.monotonic() + args.seconds
            cpu_before = _cpu_seconds(proc.pid)
            started = time.monotonic()
            threads = [
                threading.Thread(target=_client, args=(port, feed, stop_at, results[i]))
                for i in range(args.connections)
            ]
            for thread in threads:
                thread.start()
            peak_rss = 0
            while any(t.is_alive() for t in threads):
                peak_rss = max(peak_rss, _rss_kb(proc.pid)[0])
                time.sleep(0.25)
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds(proc.pid) - cpu_before
            load = os.getloadavg()[0]
            rss, hwm = _rss_kb(proc.pid)
            db_size = sum(p.stat().st_size for p in (base / "state").glob("state.db*"))
            audit_size = (base / "state" / "audit.jsonl").stat().st_size
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    _report(
        args,
        [r for per in results for r in per],
        _Server(elapsed, cpu, load, rss, peak_rss, hwm, db_size, audit_size),
    )


if __name__ == "__main__":
    main()
