"""The run board: where a run spread over workers keeps its hosts, shards and phase.

A distributed run (:mod:`engine.distributed`) never holds its fleet in one process: its
hosts are rows (vars, plan, report), worked on in shards by jobs of the task engine, and a
coordinator job moves the run from phase to phase.  Jobs are deferred in the same
transactions as the rows that need them (:class:`JobQueue` writes them on the store's own
connection).  Only PostgreSQL keeps a board (:meth:`StateDatabase.run_board`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from engine.state.records import HostRecord, RunRecord


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Phase(StrEnum):
    """Where a distributed run is."""

    RESOLVE = "resolve"  # the coordinator resolves targets into host rows
    PROBE = "probe"  # probe shards probe, evaluate guards and plan
    ACT = "act"  # act shards of the current serial batch act and verify
    FINISH = "finish"  # the coordinator records every host and ends the run
    DONE = "done"


class ShardKind(StrEnum):
    """What a shard does."""

    PROBE = "probe"  # read-only: retried on failure or worker loss
    ACT = "act"  # acts: never re-run blindly


class ShardState(StrEnum):
    """Where a shard is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    INTERRUPTED = "interrupted"  # its worker died (or stopped) while it acted
    FAILED = "failed"  # it failed as a tool, past its retries


ENDED_SHARDS = frozenset({ShardState.DONE, ShardState.INTERRUPTED, ShardState.FAILED})


class JobSpec(_Record):
    """A job to defer: a task of the task engine and its arguments."""

    task: str
    args: dict[str, Any] = Field(default_factory=dict)
    lock: str | None = None  # no two jobs with one lock run at once
    queueing_lock: str | None = None  # at most one such job waits in the queue
    queue: str = "remediate"
    delay: float = 0.0  # seconds before it may run


class JobQueue(Protocol):
    """Defers and cancels jobs on a connection the store hands over (its transaction's)."""

    def defer(self, connection: object, jobs: Sequence[JobSpec]) -> list[int | None]:
        """Defer ``jobs``; their ids (None: one like it is already waiting, by queueing lock)."""
        ...

    def cancel(self, connection: object, job_ids: Sequence[int]) -> None:
        """Cancel those of ``job_ids`` still waiting; ask running ones to abort."""
        ...


class DistRun(_Record):
    """A distributed run's row."""

    run_id: str
    request: dict[str, Any]
    phase: Phase
    batch: int = 0
    targeted: int = 0
    hosts: int = 0
    meta: dict[str, Any] | None = None
    stopped: str | None = None
    cancelled: str | None = None
    error: str | None = None


class BoardHost(_Record):
    """One host of a distributed run."""

    host: str
    position: int
    vars: dict[str, Any]
    groups: tuple[str, ...] = ()
    shard: int
    plan: dict[str, Any] | None = None
    outcome: str | None = None
    batch: int | None = None
    act_shard: int | None = None
    report: dict[str, Any] | None = None
    attempts: int = 0
    recorded: bool = False


class NewHost(_Record):
    """A resolved host as the coordinator writes it."""

    host: str
    position: int
    vars: dict[str, Any]
    groups: tuple[str, ...] = ()
    shard: int


class HostResult(_Record):
    """What a shard found for one host: its plan (probe) or its report (act)."""

    host: str
    outcome: str
    data: dict[str, Any]  # the HostPlan or HostReport as JSON data
    recorded: bool = False  # its outcome is in host_results already (written fenced)


class ShardRecord(_Record):
    """One shard and the job that runs it."""

    run_id: str
    kind: ShardKind
    shard: int
    batch: int = 0
    state: ShardState
    attempts: int = 0
    job_id: int | None = None
    worker: str | None = None
    reason: str = ""


class BoardWorker(_Record):
    """A live worker process: who it is, its last heartbeat, and the jobs it runs."""

    worker_id: int
    name: str
    host: str
    pid: int
    concurrency: int
    queues: tuple[str, ...]
    started_at: AwareDatetime
    last_heartbeat: AwareDatetime | None = None
    jobs: tuple[str, ...] = ()  # "task[job id]" of the jobs it runs now


class RunBoard(Protocol):
    """What distributed runs need from the state database (PostgreSQL only)."""

    def create_run(
        self,
        record: RunRecord,
        request: Mapping[str, Any],
        coordinator: JobSpec,
        jobs: JobQueue,
    ) -> None:
        """Start the run, its board row and its coordinator job, in one transaction."""
        ...

    def get(self, run_id: str) -> DistRun | None:
        """One distributed run, or None."""
        ...

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields of the run's row (phase, batch, targeted, hosts, meta, stopped, error)."""
        ...

    def reset_hosts(self, run_id: str) -> None:
        """Forget the run's hosts and shards (a coordinator resolving again after a crash)."""
        ...

    def add_hosts(self, run_id: str, hosts: Sequence[NewHost]) -> None:
        """Write resolved hosts (one transaction)."""
        ...

    def start_shards(
        self,
        run_id: str,
        kind: ShardKind,
        shards: Sequence[tuple[int, int]],
        job: Mapping[int, JobSpec],
        jobs: JobQueue,
        *,
        phase: Phase,
        batch: int = 0,
    ) -> None:
        """Create ``(shard, batch)`` shards, defer their jobs, move the run to ``phase``."""
        ...

    def hosts(
        self,
        run_id: str,
        *,
        shard: int | None = None,
        act_shard: int | None = None,
        outcome: str | None = None,
        after: int = -1,
        limit: int = 1000,
    ) -> list[BoardHost]:
        """Hosts in inventory order after position ``after``, optionally of one shard."""
        ...

    def all_hosts(self, run_id: str, *, outcome: str | None = None) -> Iterator[BoardHost]:
        """Every host (or those with ``outcome``), in inventory order, a page at a time."""
        ...

    def host_names(
        self, run_id: str, *, outcome: str | None = None, after: int = -1, limit: int = 1000
    ) -> list[tuple[int, str]]:
        """``(position, name)`` of hosts after position ``after``, in inventory order (a page)."""
        ...

    def claim_shard(
        self, run_id: str, kind: ShardKind, shard: int, *, job_id: int, worker: str
    ) -> ShardRecord | None:
        """Mark the shard running for ``job_id``; None if it ended or belongs to another job.

        Claiming an act shard counts an attempt on each of its hosts that has no report.
        """
        ...

    def finish_shard(
        self,
        run_id: str,
        kind: ShardKind,
        shard: int,
        *,
        job_id: int,
        results: Sequence[HostResult],
        state: ShardState,
        reason: str,
        coordinator: JobSpec,
        jobs: JobQueue,
    ) -> bool:
        """Write the shard's results and end it; the last shard of its step wakes the coordinator.

        Fenced by ``job_id``: a job that no longer holds the shard writes nothing (False).
        The run's row is locked meanwhile, so of shards ending at once the last one sees
        every other ended (the barrier).
        """
        ...

    def interrupt_shard(
        self,
        run_id: str,
        kind: ShardKind,
        shard: int,
        *,
        job_id: int,
        reason: str,
        retry: JobSpec | None,
        max_attempts: int,
        coordinator: JobSpec,
        jobs: JobQueue,
    ) -> ShardRecord | None:
        """A shard's job died: mark its unreported hosts interrupted (act) and maybe retry.

        With ``retry`` and a host still under ``max_attempts``, the shard is queued again
        as ``retry`` (which re-probes before acting); otherwise it ends ``interrupted`` and
        wakes the coordinator if it was the last.  None if ``job_id`` no longer held it.
        """
        ...

    def shards(self, run_id: str, kind: ShardKind | None = None) -> list[ShardRecord]:
        """The run's shards."""
        ...

    def shard_of_job(self, job_id: int) -> ShardRecord | None:
        """The shard a job runs, if any."""
        ...

    def outcome_counts(self, run_id: str, *, batch_at_most: int | None = None) -> dict[str, int]:
        """Hosts per outcome (of acting hosts of batches up to ``batch_at_most``, if given)."""
        ...

    def refuse_planned(self, run_id: str, outcome: str, reason: str) -> int:
        """Give every planned host ``outcome`` with ``reason`` (a refused or stopped run)."""
        ...

    def assign_batches(self, run_id: str, serial: int, shard_size: int) -> int:
        """Split the planned hosts into serial batches and act shards; the number of batches."""
        ...

    def act_shards(self, run_id: str, batch: int) -> list[int]:
        """The act shards of one serial batch (none: there is no such batch)."""
        ...

    def skip_batches_after(self, run_id: str, batch: int, reason: str) -> int:
        """Hosts of later batches end ``skipped`` with ``reason`` (the run stopped)."""
        ...

    def record_board_hosts(self, records: Sequence[HostRecord], hosts: Sequence[str]) -> None:
        """Write host outcomes not recorded yet, and mark them recorded on the board."""
        ...

    def cancel(self, run_id: str, by: str, jobs: JobQueue, coordinator: JobSpec) -> bool:
        """Ask the run to stop: no new shard starts, waiting jobs are cancelled."""
        ...

    def register_worker(self, worker: BoardWorker) -> None:
        """Say who a task engine worker is (machine, pid)."""
        ...

    def unregister_worker(self, worker_id: int) -> None:
        """Forget a worker that stopped."""
        ...

    def workers(self) -> list[BoardWorker]:
        """The task engine's live workers (registered and heartbeating), with their jobs."""
        ...
