"""Commands of runs spread over workers: worker, workers, cancel (see docs/distributed.md)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engine.cli.app import Output, OutputOpt, app, cli_state, print_json
from engine.errors import ConfigError, InputError

if TYPE_CHECKING:
    from rich.console import Console

    from engine.distributed.client import BoardReport
    from engine.pipeline import RunRequest
    from engine.runbooks import Runbook
    from engine.settings import Settings
    from engine.state import StateDatabase
    from engine.state.board import RunBoard

_MISSING_EXTRA = (
    "distributed runs need procrastinate: install remediate with its `distributed` extra "
    "(pip install 'remediate[distributed]')"
)


def _require_extra() -> None:
    try:
        import procrastinate  # noqa: F401
    except ImportError as exc:
        raise ConfigError(_MISSING_EXTRA) from exc


@contextmanager
def _board(settings: Settings) -> Iterator[tuple[StateDatabase, RunBoard]]:
    """The state database and its run board (a clear error for SQLite)."""
    from engine.cli.services import open_database

    _require_extra()
    with open_database(settings) as database:
        yield database, database.run_board()


@app.command()
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=64, help="Jobs run at once")
    ] = 2,
    queues: Annotated[
        list[str] | None, typer.Option("--queues", "-q", help="Queues to take jobs from")
    ] = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats")] = 10.0,
    stalled_after: Annotated[
        float, typer.Option(help="A worker silent this long (s) is stalled: its jobs recovered")
    ] = 30.0,
    check_every: Annotated[float, typer.Option(help="Seconds between stalled-job checks")] = 10.0,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running jobs get to finish")
    ] = 60.0,
    lease_ttl: Annotated[
        str, typer.Option(help="Device leases live this long unless renewed (e.g. 1m)")
    ] = "1m",
) -> None:
    """Run jobs of distributed runs (needs the state in PostgreSQL)."""
    from engine.distributed.queue import QUEUE
    from engine.durations import parse_duration

    _require_extra()
    settings = cli_state(ctx).settings
    from engine.cli.services import private_state_dir
    from engine.distributed.worker import WorkerTimings, run_worker

    try:
        ttl = parse_duration(lease_ttl)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lease-ttl") from exc
    private_state_dir(settings)
    timings = WorkerTimings(
        heartbeat=heartbeat,
        stalled_after=stalled_after,
        check_every=check_every,
        grace=grace,
        lease_ttl=ttl,
    )
    code = run_worker(settings, concurrency=concurrency, queues=queues or [QUEUE], timings=timings)
    if code:
        raise typer.Exit(code)


@app.command()
def workers(
    ctx: typer.Context,
    stalled_after: Annotated[
        float, typer.Option(help="Jobs of workers silent this long (s) are listed as stalled")
    ] = 30.0,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Live workers (host, pid, heartbeat, jobs) and stalled jobs."""
    state = cli_state(ctx)
    with _board(state.settings) as (_, board):
        live = board.workers()
        stalled = _stalled_jobs(state.settings.database_url(), stalled_after)
    if output is Output.JSON:
        print_json(
            state.console,
            {"workers": [w.model_dump(mode="json") for w in live], "stalled": stalled},
        )
        return
    from rich.table import Table

    table = Table(title="Workers", title_justify="left")
    for column in ("id", "host", "pid", "heartbeat", "concurrency", "jobs"):
        table.add_column(column, overflow="fold")
    for found in live:
        beat = found.last_heartbeat.strftime("%H:%M:%S") if found.last_heartbeat else "-"
        table.add_row(
            str(found.worker_id),
            found.host,
            str(found.pid),
            beat,
            str(found.concurrency),
            ", ".join(found.jobs) or "-",
        )
    state.console.print(table)
    if stalled:
        stalled_table = Table(title="Stalled jobs", title_justify="left")
        for column in ("job", "task", "args", "worker", "attempts"):
            stalled_table.add_column(column, overflow="fold")
        for job in stalled:
            stalled_table.add_row(
                str(job["id"]),
                job["task"],
                str(job["args"]),
                str(job["worker_id"]),
                str(job["attempts"]),
            )
        state.console.print(stalled_table)
    else:
        state.console.print("no stalled jobs")


def _stalled_jobs(url: str, seconds: float) -> list[dict[str, Any]]:
    """Procrastinate's stalled jobs (its API is asynchronous)."""
    from engine.distributed.queue import QUEUE, worker_app

    async def find() -> list[dict[str, Any]]:
        async with worker_app(url).open_async() as opened:
            jobs = await opened.job_manager.get_stalled_jobs(
                queue=QUEUE, seconds_since_heartbeat=seconds
            )
        return [
            {
                "id": job.id,
                "task": job.task_name,
                "args": job.task_kwargs,
                "worker_id": job.worker_id,
                "attempts": job.attempts,
            }
            for job in jobs
        ]

    return asyncio.run(find())


@app.command()
def cancel(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="A distributed run's id")],
) -> None:
    """Stop a distributed run: no new shard starts; acting shards stop before their next step."""
    from engine.distributed.client import cancel as cancel_run

    state = cli_state(ctx)
    with _board(state.settings) as (_, board):
        if board.get(run_id) is None:
            raise InputError(f"no distributed run {run_id!r}")
        if not cancel_run(board, run_id, by=f"user:{state.settings.user}"):
            raise InputError(f"run {run_id} has ended (or was cancelled already)")
    _stderr().print(f"run {run_id} cancelled; it stops at its next step", markup=False)


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def run_distributed(
    settings: Settings,
    runbook: Runbook,
    request: RunRequest,
    *,
    approved: bool,
    shard_size: int,
    console: Console | None,
) -> Iterator[BoardReport]:
    """Enqueue the run, follow it to its end with progress on ``console``; its report.

    The report reads its hosts from the run board while the context lasts (a fleet's
    report is written a page at a time).  Ctrl-C stops following (the run goes on:
    ``remediate cancel RUN_ID``).
    """
    from engine.audit import configure_audit, utc_now
    from engine.cli.services import RichReporter, audit_sink, progress_display
    from engine.distributed.client import enqueue, follow
    from engine.pipeline import NullReporter, Reporter, new_run_id

    with _board(settings) as (database, board):
        configure_audit(audit_sink(settings, database), clock=utc_now, secrets=settings.secrets)
        run_id = enqueue(
            runbook,
            request,
            board=board,
            run_id=new_run_id(),
            clock=utc_now,
            secrets=settings.secrets,
            shard_size=shard_size,
            approved=approved,
        )
        _stderr().print(f"run {run_id} queued for the workers", markup=False)
        progress = (
            progress_display(console) if console is not None and console.is_terminal else None
        )
        reporter: Reporter = RichReporter(progress) if progress is not None else NullReporter()
        store = database.store()
        try:
            if progress is not None:
                with progress:
                    report = follow(
                        board,
                        store,
                        run_id,
                        secrets=settings.secrets,
                        reporter=reporter,
                        sleep=time.sleep,
                    )
            else:
                report = follow(board, store, run_id, secrets=settings.secrets, sleep=time.sleep)
        except KeyboardInterrupt:
            sys.stderr.write(
                f"remediate: stopped following run {run_id}; it goes on on the workers "
                f"(`remediate cancel {run_id}` stops it)\n"
            )
            raise
        finally:
            store.close()
        yield report
