"""The task engine: procrastinate on the state's PostgreSQL, and the one place that knows it.

* :class:`ProcrastinateQueue` defers and cancels jobs **on a connection it is handed**: the
  state store's open transaction (procrastinate >= 3.8 runs the job's INSERT there, so a
  run's rows and its jobs commit together, or not at all).  It uses an app whose connector
  is procrastinate's synchronous one, never opened: with a connection given, it needs no
  pool (the async connector of a running worker could not run a query on a synchronous
  connection).
* :func:`worker_app` is the app a ``remediate worker`` runs, its tasks registered by
  :mod:`engine.distributed.worker`.

Task names, locks and queueing locks of the engine's jobs are made by :func:`coordinator_job`,
:func:`probe_job` and :func:`act_job`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from procrastinate import App, PsycopgConnector, SyncPsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued

from engine.errors import StateError
from engine.state.board import JobSpec

#: The queue the engine's jobs go to (workers take it unless told otherwise).
QUEUE = "remediate"
COORDINATE = "remediate.coordinate"
PROBE_SHARD = "remediate.probe_shard"
ACT_SHARD = "remediate.act_shard"
TASKS = (COORDINATE, PROBE_SHARD, ACT_SHARD)


def coordinator_job(run_id: str, *, delay: float = 0.0) -> JobSpec:
    """The job that advances ``run_id`` one step: one runs at a time, one waits at most."""
    return JobSpec(
        task=COORDINATE,
        args={"run_id": run_id},
        lock=f"run:{run_id}",
        queueing_lock=f"coordinate:{run_id}",
        queue=QUEUE,
        delay=delay,
    )


def probe_job(run_id: str, shard: int) -> JobSpec:
    """The job that probes one shard of ``run_id`` (read-only, retried)."""
    return JobSpec(task=PROBE_SHARD, args={"run_id": run_id, "shard": shard}, queue=QUEUE)


def act_job(run_id: str, shard: int, *, delay: float = 0.0) -> JobSpec:
    """The job that acts on one shard of ``run_id`` (never retried by the task engine)."""
    return JobSpec(
        task=ACT_SHARD,
        args={"run_id": run_id, "shard": shard},
        lock=f"act:{run_id}:{shard}",
        queue=QUEUE,
        delay=delay,
    )


class ProcrastinateQueue:
    """Defers and cancels the engine's jobs in the caller's transaction (see above)."""

    def __init__(self) -> None:
        self._app = App(connector=SyncPsycopgConnector())

    def defer(self, connection: object, jobs: Sequence[JobSpec]) -> list[int | None]:
        """Defer ``jobs`` on ``connection``; their ids (None: already waiting, by queueing lock).

        Each job with a queueing lock goes in a savepoint: a duplicate rolls back itself
        only, never the caller's transaction.
        """
        conn = _connection(connection)
        ids: list[int | None] = []
        for job in jobs:
            deferrer = self._app.configure_task(
                job.task,
                lock=job.lock,
                queueing_lock=job.queueing_lock,
                queue=job.queue,
                schedule_in={"seconds": job.delay} if job.delay else None,
                connection=conn,
            )
            if job.queueing_lock is None:
                ids.append(deferrer.defer(**job.args))
                continue
            try:
                with conn.transaction():
                    ids.append(deferrer.defer(**job.args))
            except AlreadyEnqueued:
                ids.append(None)
        return ids

    def cancel(self, connection: object, job_ids: Sequence[int]) -> None:
        """Cancel those of ``job_ids`` still waiting (a running one ends by itself)."""
        conn = _connection(connection)
        for job_id in job_ids:
            self._app.job_manager.cancel_job_by_id(job_id, connection=conn)


def _connection(connection: object) -> psycopg.Connection[Any]:
    if not isinstance(connection, psycopg.Connection):  # pragma: no cover - a programming error
        raise StateError(f"internal: jobs are deferred on a psycopg connection, not {connection!r}")
    return connection


def worker_app(url: str) -> App:
    """The app a worker runs: procrastinate's async connector on the state database."""
    return App(connector=PsycopgConnector(conninfo=url, min_size=1, max_size=4))
