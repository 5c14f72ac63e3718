"""Where a webhook notification's CPU goes: parse, route, store, audit, each measured alone.

``bench/ingest.py`` measures the server from outside (alerts/s, latency from the intended
send time, server CPU per alert).  This script takes the intake apart in one process, on
the same notifications (``ingest.py``'s feed: 25 alerts, ~30 % re-sent firings, a
1,000-device inventory, the server's own runbook routing, ``workers: 0``) and the same
durable state (SQLite, ``synchronous=FULL``, the audit log synced per group):

parse   ``parse_webhook`` (pydantic, the whole Alertmanager body)
route   the intake's routing of every firing (``Router.route``, memoised as in the server)
store   ``record_notifications`` in groups of ``--group`` notifications (one transaction,
        one commit each; coalescing, dedup, the queue), no audit
audit   the intake's ``alert.received`` event per group, through the server's structlog
        chain: outcomes per alert, redaction by key, scrubbing by value, canonical JSON,
        the hash chain, the append and its fsync

Each stage runs alone over all notifications and is timed in CPU seconds of this thread
(SQLite works in the calling thread; the write-ahead log checkpointer's CPU is printed
apart).  The HTTP part (uvicorn, Starlette, the endpoint, the answer) is what ``ingest.py``'s
server CPU per notification leaves over the sum.  It prints, per notification and per
alert, each stage's cost and share, and the load one CPU carries at the offered rate: the
server is one Python process whose intake holds the GIL while it works, so its utilisation
at ``--rate`` bounds its latency (queueing: the closer to 1, the longer the tail).

    python bench/intake_stages.py [--notifications 4000] [--group 4] [--rate 5000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import ingest  # noqa: E402 - bench/ingest.py: the same project, feed and server config

from engine.audit import PER_HOST_EVENTS, AuditLog, utc_now  # noqa: E402
from engine.logopts import LogFormat, LogLevel  # noqa: E402
from engine.server.alerts import WebhookMessage, parse_webhook  # noqa: E402
from engine.server.config import load_server_config  # noqa: E402
from engine.server.intake import Intake  # noqa: E402
from engine.server.logs import configure_server_logs  # noqa: E402
from engine.server.queue import AlertBatch, RecordedAlerts  # noqa: E402
from engine.server.runtime import WebhookServer  # noqa: E402
from engine.settings import load_settings  # noqa: E402
from engine.state import open_database  # noqa: E402

WARM_UP = 500


def _written() -> int:
    """Bytes this process has handed to write(2) and pwrite(2) so far (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _cpu(work: Callable[[], object]) -> tuple[float, float, int]:
    """CPU seconds of this thread and of the process, and bytes written, while ``work`` runs."""
    thread, process, written = time.thread_time(), time.process_time(), _written()
    work()
    return time.thread_time() - thread, time.process_time() - process, _written() - written


def _groups(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main() -> None:
    """Measure each stage over the same notifications; print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--notifications", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=25, help="alerts per notification")
    parser.add_argument("--group", type=int, default=4, help="notifications per commit")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=ingest.TARGET_RATE, help="alerts/s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="remediate-stages-") as tmp:
        _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, base: Path) -> None:
    config_path = ingest._project(base / "project", args.devices, port=1)
    state = base / "state"
    state.mkdir(mode=0o700)
    environ = {**os.environ, "REMEDIATE_STATE_DIR": str(state)}
    settings = load_settings(ROOT, environ)
    config = load_server_config(config_path, environ)
    database = open_database(settings.database_url(config.state.url), clock=utc_now)
    configure_server_logs(
        AuditLog(settings.audit_path, unsynced_events=PER_HOST_EVENTS),
        clock=utc_now,
        secrets=settings.secrets,
        fmt=LogFormat.JSON,
        level=LogLevel.WARNING,
    )
    server = WebhookServer(config, settings, clock=utc_now, database=database)
    try:
        server.start()
        deadline = time.monotonic() + 60
        while server.fleet.current.size == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        feed = ingest._Feed(args.devices, args.batch, seed=1)
        bodies = [feed.next() for _ in range(WARM_UP + args.notifications)]
        _run_stages(args, server, bodies)
    finally:
        server.stop(5)
        server.close()
        database.close()


def _run_stages(args: argparse.Namespace, server: WebhookServer, bodies: list[bytes]) -> None:
    intake: Intake = server.intake
    fleet = server.fleet.current
    store = server.store
    messages: list[WebhookMessage] = []
    batches: list[AlertBatch] = []
    results: list[RecordedAlerts] = []

    def parse() -> None:
        messages.extend(parse_webhook(body) for body in bodies)

    def route() -> None:
        batches.extend(intake._route(m, fleet) for m in messages)

    def record(indices: list[int]) -> None:
        for group in _groups(indices, args.group):
            results.extend(
                store.record_notifications(
                    [batches[i] for i in group], now=utc_now(), hold_reason=None
                )
            )

    def audit(indices: list[int]) -> None:
        for group in _groups(indices, args.group):
            intake._audit(
                [messages[i] for i in group],
                [batches[i] for i in group],
                [results[i] for i in group],
            )

    warm, measured = list(range(WARM_UP)), list(range(WARM_UP, len(bodies)))
    gc.collect()
    gc.freeze()  # as the server does after start-up
    figures = {"parse": _cpu(parse), "route": _cpu(route)}
    record(warm)
    figures["store"] = _cpu(lambda: record(measured))
    audit(warm)
    figures["audit"] = _cpu(lambda: audit(measured))
    # parse and route ran over the warm-up too: count them per notification of all.
    per_notification = {
        name: (thread / (len(bodies) if name in {"parse", "route"} else len(measured)))
        for name, (thread, _process, _written) in figures.items()
    }
    checkpointer = (figures["store"][1] - figures["store"][0]) / len(measured)
    written = {name: figures[name][2] / len(measured) for name in ("store", "audit")}
    _report(args, per_notification, (checkpointer, written), _usage(bodies, results))


def _usage(bodies: list[bytes], results: list[RecordedAlerts]) -> str:
    new = sum(len(r.new) for r in results)
    dups = sum(len(r.deduplicated) for r in results)
    joined = sum(len(r.coalesced) for r in results)
    return (
        f"{len(bodies) - WARM_UP:,} notifications measured ({len(bodies[0]):,} bytes each); "
        f"recorded {new:,} new firings ({joined:,} joined a queued run), {dups:,} re-sent"
    )


def _report(
    args: argparse.Namespace,
    per_notification: dict[str, float],
    io: tuple[float, dict[str, float]],
    usage: str,
) -> None:
    checkpointer, written = io
    total = sum(per_notification.values())
    rate = args.rate / args.batch  # notifications/s
    print(
        f"intake stages: {args.batch} alerts/notification, {args.devices} devices, "
        f"groups of {args.group}; load average {os.getloadavg()[0]:.2f}"
    )
    print(usage)
    print(f"{'stage':8} {'µs/notification':>16} {'µs/alert':>9} {'share':>6}")
    for name, seconds in per_notification.items():
        print(
            f"{name:8} {seconds * 1e6:16,.0f} {seconds * 1e6 / args.batch:9.1f} "
            f"{seconds / total:6.0%}"
        )
    print(f"{'sum':8} {total * 1e6:16,.0f} {total * 1e6 / args.batch:9.1f}")
    print(
        f"write-ahead log checkpointer (another thread): {checkpointer * 1e6:,.0f} µs/notification"
    )
    print(
        "written per notification: "
        + ", ".join(f"{name} {size / 1024:,.1f} KiB" for name, size in written.items())
        + " (the store's: pages of the write-ahead log and their copy into the database)"
    )
    print(
        f"at {args.rate:,.0f} alerts/s ({rate:,.0f} notifications/s) these stages alone keep "
        f"{total * rate:.0%} of one CPU busy (the HTTP part comes on top: ingest.py's server "
        "CPU per alert minus this sum)"
    )


if __name__ == "__main__":
    main()
