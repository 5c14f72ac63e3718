"""``remediate worker``: a procrastinate worker running the engine's jobs, and its recovery.

Each worker process runs up to ``concurrency`` jobs at once (procrastinate runs a
synchronous task in a thread), sends a heartbeat every ``heartbeat`` seconds, and checks
every ``check_every`` seconds for **stalled jobs**: jobs in ``doing`` whose worker has been
silent for ``stalled_after`` seconds.  procrastinate finds them (``get_stalled_jobs``) but
never retries them by itself; every worker runs this recovery:

* a coordinator or probe shard job (idempotent, read-only) is retried
  (``retry_job_by_id``), up to :data:`STALLED_RETRIES` times, then failed;
* an act shard job is **not** retried as it was: its hosts without an outcome are marked
  ``interrupted`` (naming the silent worker), and, for hosts under the run's attempt limit,
  the shard is queued again as a new job that waits for the dead worker's leases to expire,
  then probes and decides again under its own leases before acting.  The old job is failed.

Workers that stayed silent are pruned.  Two workers recovering the same job at once do it
once: the shard's rows are fenced by the job id, and procrastinate refuses a second retry.

SIGTERM (or SIGINT): the worker takes no new job and waits up to ``grace`` seconds for the
running ones; past it, act shards take no further step (hosts not started are reported
``skipped``, naming the worker), running playbooks are cancelled (their tasks in flight get
the executor's cancel grace), and the worker exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from procrastinate import JobContext, RetryStrategy
from procrastinate.exceptions import ConnectorException
from procrastinate.jobs import Job, Status
from procrastinate.worker import Worker
from pydantic import BaseModel, ConfigDict, Field

from engine.audit import audit_context, configure_audit, log_anyway, utc_now
from engine.distributed.queue import (
    ACT_SHARD,
    COORDINATE,
    PROBE_SHARD,
    QUEUE,
    ProcrastinateQueue,
    act_job,
    coordinator_job,
    worker_app,
)
from engine.distributed.runs import (
    DistributedRequest,
    WorkerContext,
    act_shard,
    coordinate,
    probe_shard,
)
from engine.errors import StateError
from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.pipeline import Services
from engine.settings import Settings
from engine.state import open_database
from engine.state.board import BoardWorker, ShardKind, ShardState

#: Tries of a probe shard that fails (then its hosts end ``error``).
PROBE_TRIES = 3
#: Times a stalled coordinator or probe job is retried before it is failed.
STALLED_RETRIES = 5


class WorkerTimings(BaseModel):
    """How often a worker beats, when others call it stalled, how long it may stop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    heartbeat: float = Field(default=10.0, gt=0)
    stalled_after: float = Field(default=30.0, gt=0)
    check_every: float = Field(default=10.0, gt=0)
    grace: float = Field(default=60.0, ge=0)
    lease_ttl: timedelta = timedelta(minutes=1)
    poll: float = Field(default=5.0, gt=0)


def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    queues: Sequence[str],
    timings: WorkerTimings,
) -> int:
    """Run a worker until SIGTERM/SIGINT; the exit code."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    name = f"{socket.gethostname()}:{os.getpid()}"
    url = settings.database_url()
    database = open_database(url, clock=utc_now, connections=2 * concurrency + 6)
    try:
        board = database.run_board()  # ConfigError for a backend that keeps none
        sink = database.audit_log()
        if sink is None:  # pragma: no cover - every backend with a board keeps its chain
            raise StateError(f"{database.url}: no audit chain in the state database")
        configure_audit(sink, clock=utc_now, secrets=settings.secrets)
        past_grace = threading.Event()
        executor = AnsibleExecutor(
            AnsibleSettings(work_dir=settings.state_dir / "work"),
            cancel=past_grace.is_set,
            secrets=settings.secrets,
        )
        services = Services(
            executor=executor,
            store=database.store(),
            clock=utc_now,
            new_run_id=_no_new_runs,
            artifacts_dir=settings.artifacts_dir,
            sleep=time.sleep,
            secrets=settings.secrets,
            holder=f"worker:{name}",
            lease_ttl=timings.lease_ttl,
        )
        context = WorkerContext(
            database=database,
            board=board,
            jobs=ProcrastinateQueue(),
            services=services,
            runbooks_dir=settings.runbooks_dir,
            playbooks_dir=settings.playbooks_dir,
            work_dir=settings.state_dir / "work",
            name=name,
        )
        asyncio.run(_serve(url, context, concurrency, list(queues), timings, past_grace))
    finally:
        database.close()
    return 0


def _no_new_runs() -> str:
    raise StateError("internal: a worker never starts a run")


class _Worker(Worker):
    """procrastinate's worker, noting when a stop's grace time has run out."""

    def __init__(self, *, past_grace: threading.Event, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._past_grace = past_grace
        self._grace = kwargs.get("shutdown_graceful_timeout") or 0.0
        self._timer: threading.Timer | None = None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._timer is not None

    def stop(self) -> None:
        """Stop taking jobs; past the grace time, running act shards stop stepping."""
        if self._timer is None:
            structlog.get_logger().info("worker.stopping", grace=self._grace)
            self._timer = threading.Timer(self._grace, self._past_grace.set)
            self._timer.daemon = True
            self._timer.start()
        super().stop()  # type: ignore[no-untyped-call] # procrastinate leaves it unannotated


async def _serve(
    url: str,
    context: WorkerContext,
    concurrency: int,
    queues: list[str],
    timings: WorkerTimings,
    past_grace: threading.Event,
) -> None:
    app = worker_app(url)

    @app.task(
        name=COORDINATE,
        pass_context=True,
        retry=RetryStrategy(max_attempts=20, wait=2, retry_exceptions={StateError}),
    )
    def coordinate_task(job: JobContext, run_id: str) -> None:
        del job
        coordinate(context, run_id)

    @app.task(name=PROBE_SHARD, pass_context=True, retry=RetryStrategy(max_attempts=PROBE_TRIES))
    def probe_task(job: JobContext, run_id: str, shard: int) -> None:
        probe_shard(
            context,
            run_id,
            shard,
            job_id=_job_id(job.job),
            last_try=job.job.attempts >= PROBE_TRIES,  # counted from 1 when fetched
        )

    @app.task(name=ACT_SHARD, pass_context=True)
    def act_task(job: JobContext, run_id: str, shard: int) -> None:
        act_shard(
            context,
            run_id,
            shard,
            job_id=_job_id(job.job),
            stopping=lambda: past_grace.is_set() or job.should_abort(),
        )

    async with app.open_async():
        worker = _Worker(
            app=app,
            queues=queues,
            name=context.name,
            concurrency=concurrency,
            shutdown_graceful_timeout=timings.grace,
            update_heartbeat_interval=timings.heartbeat,
            stalled_worker_timeout=timings.stalled_after,
            fetch_job_polling_interval=timings.poll,
            past_grace=past_grace,
        )
        side = [
            asyncio.create_task(_register(worker, context, concurrency, queues)),
            asyncio.create_task(_recover(app.job_manager, context, timings, worker)),
        ]
        try:
            await worker.run()  # type: ignore[no-untyped-call] # procrastinate leaves it unannotated
        finally:
            for task in side:
                task.cancel()
            for task in side:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _job_id(job: Job) -> int:
    if job.id is None:  # pragma: no cover - a fetched job has its id
        raise StateError("internal: a running job without an id")
    return job.id


async def _register(
    worker: Worker, context: WorkerContext, concurrency: int, queues: list[str]
) -> None:
    """Say which machine and process procrastinate's worker id is (for remediate workers)."""
    while worker.worker_id is None:
        await asyncio.sleep(0.05)
    worker_id = worker.worker_id
    host, _, pid = context.name.rpartition(":")
    record = BoardWorker(
        worker_id=worker_id,
        name=context.name,
        host=host,
        pid=int(pid),
        concurrency=concurrency,
        queues=tuple(queues),
        started_at=datetime.now(UTC),
    )
    await asyncio.to_thread(context.board.register_worker, record)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(StateError):
            await asyncio.to_thread(context.board.unregister_worker, worker_id)


async def _recover(
    manager: Any, context: WorkerContext, timings: WorkerTimings, worker: _Worker
) -> None:
    """Every ``check_every``: recover stalled jobs (see the module docstring).

    A stopping worker recovers nothing: its own jobs, still finishing, would look stalled
    to it once procrastinate stops its heartbeat; the other workers recover them if it dies.
    """
    log = structlog.get_logger()
    while True:
        await asyncio.sleep(timings.check_every)
        if worker.stopping:
            return
        try:
            stalled = await manager.get_stalled_jobs(
                queue=QUEUE, seconds_since_heartbeat=timings.stalled_after
            )
            for job in stalled:
                await _recover_job(manager, context, timings, job)
            await manager.prune_stalled_workers(timings.stalled_after)
        except (StateError, ConnectorException) as exc:  # the database is away: next time
            log_anyway(log.warning, "worker.recovery_failed", error=str(exc))


async def _recover_job(
    manager: Any, context: WorkerContext, timings: WorkerTimings, job: Job
) -> None:
    job_id = _job_id(job)
    if job.task_name == ACT_SHARD:
        await asyncio.to_thread(_interrupt_act_shard, context, timings, job_id)
        with contextlib.suppress(ConnectorException):
            await manager.finish_job_by_id_async(job_id, Status.FAILED, delete_job=False)
        return
    if job.attempts < STALLED_RETRIES:
        with contextlib.suppress(ConnectorException):  # another worker retried it first
            await manager.retry_job_by_id_async(job_id, retry_at=datetime.now(UTC))
        return
    if job.task_name == PROBE_SHARD:
        await asyncio.to_thread(_fail_probe_shard, context, job_id)
    with contextlib.suppress(ConnectorException):
        await manager.finish_job_by_id_async(job_id, Status.FAILED, delete_job=False)


def _interrupt_act_shard(context: WorkerContext, timings: WorkerTimings, job_id: int) -> None:
    """Mark the dead job's hosts interrupted; queue a retry for hosts under their limit."""
    shard = context.board.shard_of_job(job_id)
    if shard is None or shard.state is not ShardState.RUNNING:
        return
    dist = context.board.get(shard.run_id)
    if dist is None:
        return
    stored = DistributedRequest.model_validate(dist.request)
    reason = (
        f"interrupted: worker {shard.worker or '?'} stopped (no heartbeat for "
        f"{timings.stalled_after:g}s) while it acted on this host (job {job_id}); "
        "not run again blindly"
    )
    # The dead worker's leases expire a lease time after its last renewal: the retry waits.
    delay = timings.lease_ttl.total_seconds() + 1
    interrupted = context.board.interrupt_shard(
        shard.run_id,
        ShardKind.ACT,
        shard.shard,
        job_id=job_id,
        reason=reason,
        retry=act_job(shard.run_id, shard.shard, delay=delay),
        max_attempts=stored.act_attempts,
        coordinator=coordinator_job(shard.run_id),
        jobs=context.jobs,
    )
    if interrupted is None:
        return
    with audit_context(
        shard.run_id,
        runbook=stored.runbook,
        trigger=stored.request.trigger,
        mode=stored.request.mode.value,
    ):
        structlog.get_logger().warning(
            "shard.interrupted",
            shard=shard.shard,
            job=job_id,
            worker=shard.worker,
            reason=reason,
            retried=interrupted.state is ShardState.QUEUED,
        )


def _fail_probe_shard(context: WorkerContext, job_id: int) -> None:
    shard = context.board.shard_of_job(job_id)
    if shard is None:
        return
    context.board.finish_shard(
        shard.run_id,
        ShardKind.PROBE,
        shard.shard,
        job_id=job_id,
        results=[],
        state=ShardState.FAILED,
        reason=f"its workers kept stopping ({STALLED_RETRIES} tries)",
        coordinator=coordinator_job(shard.run_id),
        jobs=context.jobs,
    )
