"""The side of a distributed run that asks for it: enqueue, follow, report, cancel.

``remediate run|plan --distributed`` records the run and its coordinator job (one
transaction), then follows it on the board with the same progress display a
single-process run has, and shows the same report (built from the board's rows), with the
same exit codes.  Ctrl-C stops following only; ``remediate cancel RUN_ID`` stops the run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from engine.distributed.queue import ProcrastinateQueue, coordinator_job
from engine.distributed.runs import DEFAULT_SHARD_SIZE, final_report, start_run
from engine.errors import (
    ConfigError,
    EngineError,
    ExecutorError,
    InputError,
    InventoryError,
    ParamError,
    StateError,
)
from engine.outcomes import HostOutcome, RunStatus
from engine.pipeline import (
    HostReport,
    NullReporter,
    Reporter,
    RunReport,
    RunRequest,
    Services,
)
from engine.planfiles import LazyList, save_plan_pages
from engine.plans import HostPlan, Plan
from engine.redaction import Secrets
from engine.runbooks import Runbook
from engine.state import StateStore
from engine.state.board import DistRun, Phase, RunBoard

#: Seconds between looks at a followed run.
POLL = 0.5
#: Polls in a row that may find the state database away (restarted) before following gives
#: up; each waits for the pool's connection timeout (seconds), so a few minutes in all.
FOLLOW_AWAY_TRIES = 30
#: A batch number above any run's: outcome counts of every acting host.
_EVERY_BATCH = 2**31 - 1

_ERRORS: dict[str, Callable[[str], EngineError]] = {
    "InventoryError": InventoryError,
    "ParamError": ParamError,
    "ConfigError": ConfigError,
    "ExecutorError": ExecutorError,
    "StateError": StateError,
}


def enqueue(
    runbook: Runbook,
    request: RunRequest,
    *,
    board: RunBoard,
    run_id: str,
    clock: Callable[[], datetime],
    secrets: Secrets,
    shard_size: int,
    approved: bool,
    targeted: int | None = None,
) -> str:
    """Record the run and its coordinator job; its id.

    The inventory is kept as an absolute path: workers read it from their own directory.
    """
    return start_run(
        runbook,
        request.model_copy(update={"inventory": request.inventory.resolve()}),
        board=board,
        jobs=ProcrastinateQueue(),
        clock=clock,
        run_id=run_id,
        secrets=secrets,
        shard_size=shard_size,
        approved=approved,
        targeted=targeted,
    )


def follow(
    board: RunBoard,
    store: StateStore,
    run_id: str,
    *,
    secrets: Secrets,
    reporter: Reporter | None = None,
    sleep: Callable[[float], None],
) -> BoardReport:
    """Show the run's progress until it is done; its report (as a single run's).

    The report reads its hosts from the board when it is shown or saved.
    """
    reporter = reporter or NullReporter()
    shown: str | None = None
    done = 0
    away = 0  # polls in a row that found the state database away
    while True:
        try:
            progress = _progress(board, run_id)
        except StateError:  # restarted under the run: the workers go on, so does following
            away += 1
            if away >= FOLLOW_AWAY_TRIES:
                raise
            sleep(POLL)
            continue
        away = 0
        if progress is None:
            break
        title, total, reached = progress
        if title != shown:
            reporter.phase(title, total)
            shown, done = title, 0
        if reached > done:
            reporter.advance(reached - done)
            done = reached
        sleep(POLL)
    return board_report(board, store, run_id, secrets=secrets)


def _progress(board: RunBoard, run_id: str) -> tuple[str, int | None, int] | None:
    """The run's phase title, hosts in it and hosts past it; None once it is done."""
    dist = board.get(run_id)
    if dist is None:
        raise InputError(f"no distributed run {run_id!r}")
    if dist.phase is Phase.DONE:
        return None
    if dist.phase is Phase.ACT:
        acting = board.outcome_counts(run_id, batch_at_most=_EVERY_BATCH)
        total = sum(acting.values())
        return f"acting on {total} hosts", total, total - acting.get(HostOutcome.PLANNED.value, 0)
    if dist.phase is Phase.PROBE:
        reached = sum(board.outcome_counts(run_id).values())
        return f"probing {dist.hosts} hosts", dist.hosts, reached
    title = "resolving targets" if dist.phase is Phase.RESOLVE else "recording outcomes"
    return title, None, 0


def board_report(
    board: RunBoard, store: StateStore, run_id: str, *, secrets: Secrets
) -> BoardReport:
    """A finished distributed run's report, its hosts read from the board when asked for.

    Raises the run's error (as a single run would), or :class:`StateError` for a run that
    ended before it was planned.
    """
    dist = board.get(run_id)
    record = store.get_run(run_id)
    if dist is None or record is None:
        raise InputError(f"no distributed run {run_id!r}")
    if dist.error:
        kind, _, message = dist.error.partition(": ")
        raise _ERRORS.get(kind, StateError)(message or dist.error)
    if dist.meta is None or record.finished_at is None:
        raise StateError(f"run {run_id} ended {record.status.value} before it was planned")
    return BoardReport(
        board=board,
        dist=dist,
        plan=secrets.scrub_model(Plan.model_validate(dist.meta)),
        status=record.status,
        finished_at=record.finished_at,
        secrets=secrets,
    )


@dataclasses.dataclass(frozen=True)
class BoardReport:
    """A finished distributed run's report whose hosts stay rows until they are written.

    :meth:`whole` is the :class:`RunReport` a single run gives; :meth:`write_json` and
    :meth:`save_plan` write the same JSON and plan file a page of hosts at a time, so
    following a 100,000-host run never holds its hosts (docs/distributed.md, Sizing).
    """

    board: RunBoard
    dist: DistRun
    plan: Plan  # without its hosts, secrets scrubbed
    status: RunStatus
    finished_at: datetime
    secrets: Secrets

    @property
    def ok(self) -> bool:
        """Whether everything ended fixed, healthy, planned or skipped."""
        return self.status is RunStatus.SUCCEEDED

    @property
    def empty(self) -> bool:
        """Whether the run has no host (stopped before its targets were resolved)."""
        return not self.board.host_names(self.dist.run_id, limit=1)

    def hosts(self) -> Iterator[tuple[HostPlan, HostReport]]:
        """Each host's plan and report, secrets scrubbed, in inventory order."""
        for host in self.board.all_hosts(self.dist.run_id):
            report = final_report(host, self.dist)
            plan = (
                HostPlan.model_validate(host.plan)
                if host.plan is not None
                else HostPlan(host=host.host, outcome=report.outcome, reason=report.reason)
            )
            yield self.secrets.scrub_model(plan), self.secrets.scrub_model(report)

    def whole(self) -> RunReport:
        """The whole report at once (as a single run's: the table, markdown, approvals)."""
        pairs = list(self.hosts())
        return RunReport(
            plan=self.plan.model_copy(update={"hosts": tuple(p for p, _ in pairs)}),
            status=self.status,
            hosts=tuple(r for _, r in pairs),
            finished_at=self.finished_at,
        )

    def write_json(self, out: IO[str]) -> None:
        """``RunReport.model_dump(mode="json")`` as ``-o json`` prints it, a page at a time."""
        plans = LazyList(
            lambda: (p.model_dump(mode="json") for p, _ in self.hosts()), empty=self.empty
        )
        reports = LazyList(
            lambda: (r.model_dump(mode="json") for _, r in self.hosts()), empty=self.empty
        )
        head = RunReport(
            plan=self.plan, status=self.status, hosts=(), finished_at=self.finished_at
        ).model_dump(mode="json")
        data = {**head, "plan": {**head["plan"], "hosts": plans}, "hosts": reports}
        out.writelines(json.JSONEncoder(indent=2, default=str).iterencode(data))
        out.write("\n")

    def save_plan(self, path: Path, *, expires_in: timedelta) -> tuple[str, datetime]:
        """The run's plan saved as :func:`engine.planfiles.save_plan` would: digest, expiry."""
        return save_plan_pages(
            self.plan,
            lambda: (p for p, _ in self.hosts()),
            path,
            expires_in=expires_in,
            empty=self.empty,
        )


def runner(
    board: RunBoard, *, shard_size: int = DEFAULT_SHARD_SIZE
) -> Callable[[Runbook, RunRequest, Services], RunReport]:
    """What ``remediate serve`` with ``executor: distributed`` runs an alert's run with.

    It enqueues the run (its id from ``services``, as the claimed queue item has it) and
    follows it to its end; the report is the one a run in the server's thread gives.
    """

    def execute(runbook: Runbook, request: RunRequest, services: Services) -> RunReport:
        run_id = enqueue(
            runbook,
            request,
            board=board,
            run_id=services.new_run_id(),
            clock=services.clock,
            secrets=services.secrets,
            shard_size=shard_size,
            approved=False,  # nobody approves an alert's run: destructive steps are declined
            targeted=request.fleet,
        )
        followed = follow(
            board, services.store, run_id, secrets=services.secrets, sleep=services.sleep
        )
        return followed.whole()

    return execute


def cancel(board: RunBoard, run_id: str, *, by: str) -> bool:
    """Ask the run to stop (no new shard starts); whether it was still going."""
    return board.cancel(run_id, by, ProcrastinateQueue(), coordinator_job(run_id))
