"""The run board in PostgreSQL (see :mod:`engine.state.board`).

Every method is one transaction of :class:`PostgresStore` (audit events of the caller's unit
of work commit with it).  Jobs are deferred on the transaction's own connection, so a shard
row and its job, or a shard's end and the coordinator job it wakes, commit together.  A
shard's end locks the run's row first: shards ending at once take turns, and the last one
sees that every other has ended.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from engine.outcomes import HostOutcome, RunStatus
from engine.state.board import (
    ENDED_SHARDS,
    BoardHost,
    BoardWorker,
    DistRun,
    HostResult,
    JobQueue,
    JobSpec,
    NewHost,
    Phase,
    ShardKind,
    ShardRecord,
    ShardState,
)
from engine.state.postgres.store import (
    _UPSERT_HOST,
    Cursor,
    PostgresStore,
    _aware,
    _host_row,
    _run_record,
)
from engine.state.records import HostRecord, RunRecord

_HOST_COLUMNS = (
    "host, position, vars, shard, plan, outcome, batch, act_shard, report, attempts, recorded"
)
_SHARD_COLUMNS = "run_id, kind, shard, batch, state, attempts, job_id, worker, reason"
_RUN_FIELDS = frozenset(
    {"phase", "batch", "targeted", "hosts", "meta", "stopped", "error", "cancelled"}
)
_JSON_FIELDS = frozenset({"meta"})


def _dump(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


class PostgresRunBoard(PostgresStore):
    """The board's rows on the state's pool (see the module docstring)."""

    def create_run(
        self,
        record: RunRecord,
        request: Mapping[str, Any],
        coordinator: JobSpec,
        jobs: JobQueue,
    ) -> None:
        """Start the run, its board row and its coordinator job, in one transaction."""

        def work(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO runs (run_id, runbook, runbook_digest, mode, trigger, started_at,"
                " finished_at, status, summary) VALUES (%s, %s, %s, %s, %s, %s, NULL, %s, '{}')",
                (
                    record.run_id,
                    record.runbook,
                    record.runbook_digest,
                    record.mode.value,
                    record.trigger,
                    _aware(record.started_at),
                    RunStatus.RUNNING.value,
                ),
            )
            cur.execute(
                "INSERT INTO dist_runs (run_id, request, phase) VALUES (%s, %s, %s)",
                (record.run_id, _dump(dict(request)), Phase.RESOLVE.value),
            )
            jobs.defer(cur.connection, [coordinator])

        self._run(f"start distributed run {record.run_id}", work)

    def get(self, run_id: str) -> DistRun | None:
        """One distributed run, or None."""

        def work(cur: Cursor) -> DistRun | None:
            row = cur.execute(
                "SELECT run_id, request, phase, batch, targeted, hosts, meta, stopped,"
                " cancelled, error FROM dist_runs WHERE run_id = %s",
                (run_id,),
            ).fetchone()
            if row is None:
                return None
            return DistRun(
                run_id=row[0],
                request=json.loads(row[1]),
                phase=Phase(row[2]),
                batch=int(row[3]),
                targeted=int(row[4]),
                hosts=int(row[5]),
                meta=None if row[6] is None else json.loads(row[6]),
                stopped=row[7],
                cancelled=row[8],
                error=row[9],
            )

        return self._run(f"read distributed run {run_id}", work)

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields of the run's row."""
        unknown = set(fields) - _RUN_FIELDS
        if unknown:
            raise ValueError(f"unknown dist_runs fields: {sorted(unknown)}")
        names = sorted(fields)
        values = [
            _dump(fields[n]) if n in _JSON_FIELDS and fields[n] is not None else fields[n]
            for n in names
        ]
        values = [v.value if isinstance(v, Phase) else v for v in values]
        assignments = ", ".join(f"{n} = %s" for n in names)

        def work(cur: Cursor) -> None:
            cur.execute(
                f"UPDATE dist_runs SET {assignments}, updated_at = clock_timestamp()"  # noqa: S608 - names checked above
                " WHERE run_id = %s",
                (*values, run_id),
            )

        self._run(f"update distributed run {run_id}", work)

    def reset_hosts(self, run_id: str) -> None:
        """Forget the run's hosts and shards."""

        def work(cur: Cursor) -> None:
            cur.execute("DELETE FROM dist_shards WHERE run_id = %s", (run_id,))
            cur.execute("DELETE FROM dist_hosts WHERE run_id = %s", (run_id,))

        self._run(f"reset the hosts of run {run_id}", work)

    def add_hosts(self, run_id: str, hosts: Sequence[NewHost]) -> None:
        """Write resolved hosts (one transaction, one COPY)."""

        def work(cur: Cursor) -> None:
            with cur.copy(
                "COPY dist_hosts (run_id, host, position, vars, shard) FROM STDIN"
            ) as copy:
                for host in hosts:
                    copy.write_row(
                        (
                            run_id,
                            host.host,
                            host.position,
                            _dump({"vars": host.vars, "groups": list(host.groups)}),
                            host.shard,
                        )
                    )

        self._run(f"add hosts to run {run_id}", work)

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
        """Create shards, defer their jobs, move the run to ``phase`` (one transaction)."""

        def work(cur: Cursor) -> None:
            ids = jobs.defer(cur.connection, [job[number] for number, _ in shards])
            cur.executemany(
                "INSERT INTO dist_shards (run_id, kind, shard, batch, state, job_id)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, kind, shard) DO UPDATE"
                " SET state = excluded.state, job_id = excluded.job_id, reason = ''",
                [
                    (run_id, kind.value, number, shard_batch, ShardState.QUEUED.value, job_id)
                    for (number, shard_batch), job_id in zip(shards, ids, strict=True)
                ],
            )
            cur.execute(
                "UPDATE dist_runs SET phase = %s, batch = %s, updated_at = clock_timestamp()"
                " WHERE run_id = %s",
                (phase.value, batch, run_id),
            )

        self._run(f"start {len(shards)} {kind.value} shards of run {run_id}", work)

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
        where = ["run_id = %s", "position > %s"]
        params: list[Any] = [run_id, after]
        for column, value in (("shard", shard), ("act_shard", act_shard), ("outcome", outcome)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)

        def work(cur: Cursor) -> list[BoardHost]:
            rows = cur.execute(
                f"SELECT {_HOST_COLUMNS} FROM dist_hosts WHERE {' AND '.join(where)}"  # noqa: S608 - constant columns
                " ORDER BY position LIMIT %s",
                (*params, limit),
            ).fetchall()
            return [_board_host(r) for r in rows]

        return self._run(f"read hosts of run {run_id}", work)

    def all_hosts(self, run_id: str, *, outcome: str | None = None) -> Iterator[BoardHost]:
        """Every host (or those with ``outcome``), in inventory order, a page at a time."""
        after = -1
        while True:
            page = self.hosts(run_id, outcome=outcome, after=after, limit=1000)
            if not page:
                return
            yield from page
            after = page[-1].position

    def host_names(
        self, run_id: str, *, outcome: str | None = None, after: int = -1, limit: int = 1000
    ) -> list[tuple[int, str]]:
        """``(position, name)`` of hosts after ``after``, in inventory order (names only)."""
        where = "run_id = %s AND position > %s" + (" AND outcome = %s" if outcome else "")
        params = (run_id, after, outcome) if outcome else (run_id, after)

        def work(cur: Cursor) -> list[tuple[int, str]]:
            rows = cur.execute(
                f"SELECT position, host FROM dist_hosts WHERE {where}"  # noqa: S608 - constant
                " ORDER BY position LIMIT %s",
                (*params, limit),
            ).fetchall()
            return [(int(r[0]), str(r[1])) for r in rows]

        return self._run(f"read host names of run {run_id}", work)

    def claim_shard(
        self, run_id: str, kind: ShardKind, shard: int, *, job_id: int, worker: str
    ) -> ShardRecord | None:
        """Mark the shard running for ``job_id``; None if it ended or is another job's."""

        def work(cur: Cursor) -> ShardRecord | None:
            row = cur.execute(
                "UPDATE dist_shards SET state = %s, attempts = attempts + 1, worker = %s"  # noqa: S608 - constant columns
                " WHERE run_id = %s AND kind = %s AND shard = %s AND job_id = %s"
                f" AND state IN (%s, %s) RETURNING {_SHARD_COLUMNS}",
                (
                    ShardState.RUNNING.value,
                    worker,
                    run_id,
                    kind.value,
                    shard,
                    job_id,
                    ShardState.QUEUED.value,
                    ShardState.RUNNING.value,
                ),
            ).fetchone()
            if row is None:
                return None
            if kind is ShardKind.ACT:
                cur.execute(
                    "UPDATE dist_hosts SET attempts = attempts + 1 WHERE run_id = %s"
                    " AND act_shard = %s AND (report IS NULL OR outcome = %s)",
                    (run_id, shard, HostOutcome.INTERRUPTED.value),
                )
            return _shard(row)

        return self._run(f"claim {kind.value} shard {shard} of run {run_id}", work)

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
        """Write the shard's results and end it; the last one wakes the coordinator."""
        column = "plan" if kind is ShardKind.PROBE else "report"

        def work(cur: Cursor) -> bool:
            cur.execute("SELECT 1 FROM dist_runs WHERE run_id = %s FOR UPDATE", (run_id,))
            held = cur.execute(
                "SELECT batch FROM dist_shards WHERE run_id = %s AND kind = %s AND shard = %s"
                " AND job_id = %s AND state = %s FOR UPDATE",
                (run_id, kind.value, shard, job_id, ShardState.RUNNING.value),
            ).fetchone()
            if held is None:
                return False
            cur.executemany(
                f"UPDATE dist_hosts SET {column} = %s, outcome = %s, recorded = recorded OR %s"  # noqa: S608 - a constant column
                " WHERE run_id = %s AND host = %s",
                [(_dump(r.data), r.outcome, r.recorded, run_id, r.host) for r in results],
            )
            cur.execute(
                "UPDATE dist_shards SET state = %s, reason = %s"
                " WHERE run_id = %s AND kind = %s AND shard = %s",
                (state.value, reason, run_id, kind.value, shard),
            )
            _wake_if_last(cur, run_id, kind, int(held[0]), coordinator, jobs)
            return True

        return self._run(f"finish {kind.value} shard {shard} of run {run_id}", work)

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
        """A shard's job died: its unreported hosts end interrupted; maybe retry it."""

        def work(cur: Cursor) -> ShardRecord | None:
            cur.execute("SELECT 1 FROM dist_runs WHERE run_id = %s FOR UPDATE", (run_id,))
            held = cur.execute(
                "SELECT batch FROM dist_shards WHERE run_id = %s AND kind = %s AND shard = %s"
                " AND job_id = %s AND state IN (%s, %s) FOR UPDATE",
                (
                    run_id,
                    kind.value,
                    shard,
                    job_id,
                    ShardState.RUNNING.value,
                    ShardState.QUEUED.value,
                ),
            ).fetchone()
            if held is None:
                return None
            batch = int(held[0])
            rows = cur.execute(
                "SELECT host, attempts FROM dist_hosts WHERE run_id = %s AND act_shard = %s"
                " AND (report IS NULL OR outcome = %s)",
                (run_id, shard, HostOutcome.INTERRUPTED.value),
            ).fetchall()
            for host, _ in rows:
                report = {"host": host, "outcome": HostOutcome.INTERRUPTED.value, "reason": reason}
                cur.execute(
                    "UPDATE dist_hosts SET report = %s, outcome = %s WHERE run_id = %s"
                    " AND host = %s",
                    (_dump(report), HostOutcome.INTERRUPTED.value, run_id, host),
                )
            again = retry is not None and any(int(a) < max_attempts for _, a in rows)
            if again and retry is not None:
                (new_id,) = jobs.defer(cur.connection, [retry])
                row = cur.execute(
                    "UPDATE dist_shards SET state = %s, job_id = %s, reason = %s"  # noqa: S608 - constant columns
                    " WHERE run_id = %s AND kind = %s AND shard = %s"
                    f" RETURNING {_SHARD_COLUMNS}",
                    (ShardState.QUEUED.value, new_id, reason, run_id, kind.value, shard),
                ).fetchone()
                return None if row is None else _shard(row)
            row = cur.execute(
                "UPDATE dist_shards SET state = %s, reason = %s"  # noqa: S608 - constant columns
                " WHERE run_id = %s AND kind = %s AND shard = %s"
                f" RETURNING {_SHARD_COLUMNS}",
                (ShardState.INTERRUPTED.value, reason, run_id, kind.value, shard),
            ).fetchone()
            _wake_if_last(cur, run_id, kind, batch, coordinator, jobs)
            return None if row is None else _shard(row)

        return self._run(f"interrupt {kind.value} shard {shard} of run {run_id}", work)

    def shards(self, run_id: str, kind: ShardKind | None = None) -> list[ShardRecord]:
        """The run's shards."""
        where, params = ("run_id = %s", [run_id])
        if kind is not None:
            where += " AND kind = %s"
            params.append(kind.value)

        def work(cur: Cursor) -> list[ShardRecord]:
            rows = cur.execute(
                f"SELECT {_SHARD_COLUMNS} FROM dist_shards WHERE {where}"  # noqa: S608 - constant columns
                " ORDER BY kind, shard",
                params,
            ).fetchall()
            return [_shard(r) for r in rows]

        return self._run(f"read shards of run {run_id}", work)

    def shard_of_job(self, job_id: int) -> ShardRecord | None:
        """The shard a job runs, if any."""

        def work(cur: Cursor) -> ShardRecord | None:
            row = cur.execute(
                f"SELECT {_SHARD_COLUMNS} FROM dist_shards WHERE job_id = %s",  # noqa: S608 - constant columns
                (job_id,),
            ).fetchone()
            return None if row is None else _shard(row)

        return self._run(f"find the shard of job {job_id}", work)

    def outcome_counts(self, run_id: str, *, batch_at_most: int | None = None) -> dict[str, int]:
        """Hosts per outcome (of acting hosts of batches up to ``batch_at_most``, if given)."""
        where = "run_id = %s"
        params: list[Any] = [run_id]
        if batch_at_most is not None:
            where += " AND batch IS NOT NULL AND batch <= %s"
            params.append(batch_at_most)

        def work(cur: Cursor) -> dict[str, int]:
            rows = cur.execute(
                f"SELECT outcome, count(*) FROM dist_hosts WHERE {where} GROUP BY outcome",  # noqa: S608 - constant columns
                params,
            ).fetchall()
            return {str(r[0]): int(r[1]) for r in rows if r[0] is not None}

        return self._run(f"count outcomes of run {run_id}", work)

    def refuse_planned(self, run_id: str, outcome: str, reason: str) -> int:
        """Give every planned host ``outcome`` with ``reason``."""

        def work(cur: Cursor) -> int:
            cur.execute(
                "UPDATE dist_hosts SET outcome = %s, plan = (plan::jsonb"
                " || jsonb_build_object('outcome', %s::text, 'reason', %s::text))::text"
                " WHERE run_id = %s AND outcome = %s",
                (outcome, outcome, reason, run_id, HostOutcome.PLANNED.value),
            )
            return cur.rowcount

        return self._run(f"refuse the planned hosts of run {run_id}", work)

    def assign_batches(self, run_id: str, serial: int, shard_size: int) -> int:
        """Planned hosts, in inventory order, into serial batches and act shards."""
        per_batch = -(-serial // shard_size)  # act shards in a full batch

        def work(cur: Cursor) -> int:
            cur.execute(
                "WITH ordered AS (SELECT host, row_number() OVER (ORDER BY position) - 1 AS n"
                " FROM dist_hosts WHERE run_id = %s AND outcome = %s)"
                " UPDATE dist_hosts h SET batch = o.n / %s + 1,"
                " act_shard = (o.n / %s) * %s + (o.n %% %s) / %s + 1"
                " FROM ordered o WHERE h.run_id = %s AND h.host = o.host",
                (
                    run_id,
                    HostOutcome.PLANNED.value,
                    serial,
                    serial,
                    per_batch,
                    serial,
                    shard_size,
                    run_id,
                ),
            )
            row = cur.execute(
                "SELECT coalesce(max(batch), 0) FROM dist_hosts WHERE run_id = %s", (run_id,)
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run(f"split run {run_id} into batches", work)

    def act_shards(self, run_id: str, batch: int) -> list[int]:
        """The act shards of one serial batch."""

        def work(cur: Cursor) -> list[int]:
            rows = cur.execute(
                "SELECT DISTINCT act_shard FROM dist_hosts WHERE run_id = %s AND batch = %s"
                " ORDER BY act_shard",
                (run_id, batch),
            ).fetchall()
            return [int(r[0]) for r in rows]

        return self._run(f"read the act shards of run {run_id}", work)

    def skip_batches_after(self, run_id: str, batch: int, reason: str) -> int:
        """Hosts of later batches end ``skipped`` with ``reason``."""

        def work(cur: Cursor) -> int:
            cur.execute(
                "UPDATE dist_hosts SET outcome = %s, report = jsonb_build_object("
                "'host', host, 'outcome', %s::text, 'reason', %s::text)::text"
                " WHERE run_id = %s AND batch > %s AND report IS NULL",
                (HostOutcome.SKIPPED.value, HostOutcome.SKIPPED.value, reason, run_id, batch),
            )
            return cur.rowcount

        return self._run(f"skip the later batches of run {run_id}", work)

    def record_board_hosts(self, records: Sequence[HostRecord], hosts: Sequence[str]) -> None:
        """Write host outcomes (unfenced), and mark ``hosts`` recorded on the board, at once."""
        if not records and not hosts:
            return
        run_id = records[0].run_id if records else ""

        def work(cur: Cursor) -> None:
            cur.executemany(_UPSERT_HOST, [_host_row(r) for r in records])
            if records:
                cur.execute(
                    "UPDATE dist_hosts SET recorded = true WHERE run_id = %s AND host = ANY(%s)",
                    (run_id, list(hosts)),
                )

        self._run(f"record {len(records)} hosts of run {run_id}", work)

    def cancel(self, run_id: str, by: str, jobs: JobQueue, coordinator: JobSpec) -> bool:
        """Ask the run to stop: no new shard starts, waiting jobs are cancelled."""

        def work(cur: Cursor) -> bool:
            row = cur.execute(
                "UPDATE dist_runs SET cancelled = %s, updated_at = clock_timestamp()"
                " WHERE run_id = %s AND phase <> %s AND cancelled IS NULL RETURNING run_id",
                (by, run_id, Phase.DONE.value),
            ).fetchone()
            if row is None:
                return False
            waiting = cur.execute(
                "SELECT job_id FROM dist_shards WHERE run_id = %s AND state = %s"
                " AND job_id IS NOT NULL",
                (run_id, ShardState.QUEUED.value),
            ).fetchall()
            jobs.cancel(cur.connection, [int(r[0]) for r in waiting])
            cur.execute(
                "UPDATE dist_shards SET state = %s, reason = %s WHERE run_id = %s AND state = %s",
                (ShardState.FAILED.value, f"cancelled by {by}", run_id, ShardState.QUEUED.value),
            )
            jobs.defer(cur.connection, [coordinator])
            return True

        return self._run(f"cancel run {run_id}", work)

    def register_worker(self, worker: BoardWorker) -> None:
        """Say who a task engine worker is."""

        def work(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO dist_workers (worker_id, name, host, pid, concurrency, queues)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO NOTHING",
                (
                    worker.worker_id,
                    worker.name,
                    worker.host,
                    worker.pid,
                    worker.concurrency,
                    json.dumps(list(worker.queues)),
                ),
            )

        self._run(f"register worker {worker.name}", work)

    def unregister_worker(self, worker_id: int) -> None:
        """Forget a worker that stopped."""
        self._run(
            f"unregister worker {worker_id}",
            lambda cur: cur.execute("DELETE FROM dist_workers WHERE worker_id = %s", (worker_id,)),
        )

    def workers(self) -> list[BoardWorker]:
        """The task engine's live workers, with the jobs each runs."""

        def work(cur: Cursor) -> list[BoardWorker]:
            rows = cur.execute(
                "SELECT w.id, d.name, d.host, d.pid, d.concurrency, d.queues, d.started_at,"
                " w.last_heartbeat, coalesce((SELECT array_agg(j.task_name || '[' || j.id || ']'"
                " ORDER BY j.id) FROM procrastinate_jobs j WHERE j.worker_id = w.id"
                " AND j.status = 'doing'), '{}')"
                " FROM procrastinate_workers w LEFT JOIN dist_workers d ON d.worker_id = w.id"
                " ORDER BY w.id"
            ).fetchall()
            return [
                BoardWorker(
                    worker_id=int(r[0]),
                    name=r[1] or f"worker {r[0]}",
                    host=r[2] or "?",
                    pid=int(r[3] or 0),
                    concurrency=int(r[4] or 0),
                    queues=tuple(json.loads(r[5] or "[]")),
                    started_at=r[6] or r[7],
                    last_heartbeat=r[7],
                    jobs=tuple(r[8]),
                )
                for r in rows
            ]

        return self._run("list workers", work)

    def run_record(self, run_id: str) -> RunRecord | None:
        """The run's record (for the coordinator's status checks)."""

        def work(cur: Cursor) -> RunRecord | None:
            row = cur.execute(
                "SELECT run_id, runbook, runbook_digest, mode, trigger, started_at, finished_at,"
                " status, summary FROM runs WHERE run_id = %s",
                (run_id,),
            ).fetchone()
            return None if row is None else _run_record(row)

        return self._run(f"read run {run_id}", work)


def _wake_if_last(
    cur: Cursor, run_id: str, kind: ShardKind, batch: int, coordinator: JobSpec, jobs: JobQueue
) -> None:
    """Defer the coordinator if no shard of this step is still queued or running."""
    open_states = [s.value for s in ShardState if s not in ENDED_SHARDS]
    left = cur.execute(
        "SELECT 1 FROM dist_shards WHERE run_id = %s AND kind = %s AND batch = %s"
        " AND state = ANY(%s) LIMIT 1",
        (run_id, kind.value, batch, open_states),
    ).fetchone()
    if left is None:
        jobs.defer(cur.connection, [coordinator])


def _board_host(row: Sequence[Any]) -> BoardHost:
    data = json.loads(row[2])
    return BoardHost(
        host=row[0],
        position=int(row[1]),
        vars=data.get("vars", {}),
        groups=tuple(data.get("groups", ())),
        shard=int(row[3]),
        plan=None if row[4] is None else json.loads(row[4]),
        outcome=row[5],
        batch=row[6],
        act_shard=row[7],
        report=None if row[8] is None else json.loads(row[8]),
        attempts=int(row[9]),
        recorded=bool(row[10]),
    )


def _shard(row: Sequence[Any]) -> ShardRecord:
    return ShardRecord(
        run_id=row[0],
        kind=ShardKind(row[1]),
        shard=int(row[2]),
        batch=int(row[3]),
        state=ShardState(row[4]),
        attempts=int(row[5]),
        job_id=None if row[6] is None else int(row[6]),
        worker=row[7],
        reason=row[8],
    )
