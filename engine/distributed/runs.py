"""A run spread over workers: its coordinator and its shards, calling the pipeline's stages.

::

    coordinator  resolve targets (streamed into host rows) → probe shards
    probe shard  probe → evaluate guards → plan (decide_host), per host, read-only
    coordinator  blast radius → approval → admission → serial batches of act shards
    act shard    lease → probe again and decide again under the lease → act → verify →
                 record fenced (Apply.act_on, the single-process path's own batch)
    coordinator  after each batch (a barrier: the last shard to end wakes it): fail budget
                 across all shards → next batch, or finish: record every host, run.finished

The coordinator runs one step per job (one job at a time per run, by lock) and never holds
the fleet: hosts are rows, read a page at a time.  Shards write their results and end in one
transaction, with the audit events of their hosts.  A probe shard is read-only and retried;
an act shard is never re-run blindly: if its worker dies, its hosts without an outcome are
marked ``interrupted`` and the shard is tried again only for hosts under their attempt limit,
after their leases expired, probing and deciding again before acting (see
:mod:`engine.distributed.worker`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field

from engine.audit import audit_context, audit_unit, log_anyway
from engine.distributed.queue import act_job, coordinator_job, probe_job
from engine.errors import ConfigError, EngineError, InventoryError, StateError
from engine.expressions import EvaluationError
from engine.guards import admission_refusal, allowed_hosts, blast_radius_refusal, evaluate_host
from engine.outcomes import BAD_OUTCOMES, HostOutcome, Mode, RunStatus
from engine.pipeline import (
    Apply,
    HostReport,
    PlanContext,
    RunRequest,
    Services,
    decide_host,
    host_record,
    host_report,
    needs_approval,
    run_secrets,
    started_run,
)
from engine.plans import HostPlan, Plan, runbook_ref, shown_params
from engine.privacy import private_dir
from engine.probes import HostProbe, ProbeStatus, run_probes
from engine.redaction import Secrets
from engine.runbooks import Runbook, find_runbook
from engine.state import RunRecord, StateDatabase
from engine.state.board import (
    BoardHost,
    DistRun,
    HostResult,
    JobQueue,
    NewHost,
    Phase,
    RunBoard,
    ShardKind,
    ShardState,
)
from engine.targets import Host, TargetSet, stream_hosts

#: Hosts per shard unless a run asks otherwise.
DEFAULT_SHARD_SIZE = 250
#: Times an act shard's host may be tried (a first try, and one retry after its worker died).
DEFAULT_ACT_ATTEMPTS = 2
#: Hosts written to the board per transaction while targets are resolved.
_WRITE_PAGE = 1000
#: The most hosts one audit event lists: ``targets.resolved`` and ``plan.created`` of a
#: larger fleet are several events (``part`` of ``parts``), never one of the whole fleet.
EVENT_HOSTS = 1000
#: How long an act shard keeps trying to write its hosts' results while the state is away.
FINAL_WRITE_PATIENCE = timedelta(minutes=10)
#: The longest wait between two of those tries.
_FINAL_WRITE_WAIT = 5.0


class DistributedRequest(BaseModel):
    """What a distributed run was asked to do, as its board row keeps it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: RunRequest
    runbook: str
    runbook_digest: str
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, ge=1)
    act_attempts: int = Field(default=DEFAULT_ACT_ATTEMPTS, ge=1)
    approved: bool = False  # destructive steps were approved when the run was asked for
    targeted: int | None = None  # the fleet size the blast radius is judged against


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a worker's jobs need: the state, its board and job queue, services, runbooks."""

    database: StateDatabase
    board: RunBoard
    jobs: JobQueue
    services: Services
    runbooks_dir: Path
    playbooks_dir: Path
    work_dir: Path
    name: str  # this worker, as shards record who ran them


def start_run(
    runbook: Runbook,
    request: RunRequest,
    *,
    board: RunBoard,
    jobs: JobQueue,
    clock: Callable[[], datetime],
    run_id: str,
    secrets: Secrets,
    shard_size: int = DEFAULT_SHARD_SIZE,
    act_attempts: int = DEFAULT_ACT_ATTEMPTS,
    approved: bool = False,
    targeted: int | None = None,
    **context: object,
) -> str:
    """Record a new distributed run and defer its coordinator (one transaction); its id.

    ``run.started`` is audited in that transaction, as the single-process path does.
    """
    params = runbook.param_values(request.overrides)  # a bad -e fails before anything is kept
    stored = DistributedRequest(
        request=request,
        runbook=runbook.name,
        runbook_digest=runbook.digest,
        shard_size=shard_size,
        act_attempts=act_attempts,
        approved=approved,
        targeted=targeted,
    )
    with _run_context(run_id, runbook, request, secrets, params, **context), audit_unit():
        board.create_run(
            started_run(runbook, request, run_id, params, clock(), distributed=True),
            stored.model_dump(mode="json"),
            coordinator_job(run_id),
            jobs,
        )
    return run_id


@contextmanager
def _run_context(
    run_id: str,
    runbook: Runbook,
    request: RunRequest,
    known: Secrets,
    params: Mapping[str, Any],
    **context: object,
) -> Iterator[None]:
    """The run's audit context: every event carries what a single-process run's carry."""
    with audit_context(
        run_id,
        secrets=run_secrets(runbook, params, known),
        runbook=runbook.name,
        runbook_digest=runbook.digest,
        trigger=request.trigger,
        mode=request.mode.value,
        **context,
    ):
        yield


class _Run:
    """One distributed run as a job of this worker sees it."""

    def __init__(self, worker: WorkerContext, dist: DistRun) -> None:
        self.worker = worker
        self.dist = dist
        self.stored = DistributedRequest.model_validate(dist.request)
        self.request = self.stored.request
        self.runbook = self._runbook()
        self.params = self.runbook.param_values(self.request.overrides)
        self.secrets = run_secrets(self.runbook, self.params, worker.services.secrets)
        self.log = structlog.get_logger()

    @property
    def run_id(self) -> str:
        return self.dist.run_id

    def _runbook(self) -> Runbook:
        found = find_runbook(
            self.stored.runbook,
            self.worker.runbooks_dir,
            playbooks_dir=self.worker.playbooks_dir,
        )
        if found.digest != self.stored.runbook_digest:
            raise ConfigError(
                f"runbook {self.stored.runbook!r} on worker {self.worker.name} "
                f"({found.path}, {found.digest[:12]}) is not the one run "
                f"{self.run_id} was started with ({self.stored.runbook_digest[:12]}): "
                "deploy the same runbooks to every worker"
            )
        return found

    @contextmanager
    def context(self) -> Iterator[None]:
        with _run_context(
            self.run_id, self.runbook, self.request, self.worker.services.secrets, self.params
        ):
            yield

    def plan_meta(self, refused: str | None = None) -> Plan:
        """The run's plan without its hosts (they are rows on the board)."""
        meta = self.dist.meta
        if meta is not None:
            plan = Plan.model_validate(meta)
            return plan if refused is None else plan.model_copy(update={"refused": refused})
        return Plan(
            run_id=self.run_id,
            runbook=runbook_ref(self.runbook),
            mode=self.request.mode,
            created_at=self.worker.services.clock(),
            created_by=self.request.user,
            trigger=self.request.trigger,
            inventory=str(self.request.inventory),
            pattern=self.runbook.spec.targets.hosts,
            limit=self.request.limit,
            params=shown_params(self.runbook, self.params),
            overrides=shown_params(self.runbook, self.request.overrides),
            hosts=(),
            refused=refused,
        )

    @property
    def lease_ttl(self) -> timedelta:
        return min(self.worker.services.lease_ttl, self.runbook.spec.policy.lock_ttl)


# --------------------------------------------------------------------------- coordinator


def coordinate(worker: WorkerContext, run_id: str) -> None:
    """Advance ``run_id`` one step (see the module docstring); a no-op once it is done."""
    board = worker.board
    dist = board.get(run_id)
    if dist is None or dist.phase is Phase.DONE:
        return
    record = worker.services.store.get_run(run_id)
    if record is None or record.status is not RunStatus.RUNNING:
        board.update(run_id, phase=Phase.DONE)  # ended elsewhere (interrupted, cancelled)
        return
    try:
        run = _Run(worker, dist)
    except EngineError as exc:
        _fail(worker, dist, record, exc)
        return
    with run.context():
        try:
            _step(run)
        except EngineError as exc:
            _fail(worker, dist, record, exc)


def _fail(worker: WorkerContext, dist: DistRun, record: RunRecord, exc: Exception) -> None:
    """The run ends ``error`` (a bad inventory, a tool failure), as a single run would."""
    with (
        audit_context(dist.run_id, runbook=record.runbook, trigger=record.trigger),
        audit_unit(),
    ):
        structlog.get_logger().error(
            "run.finished", status=RunStatus.ERROR.value, error=f"{type(exc).__name__}: {exc}"
        )
        worker.services.store.finish_run(dist.run_id, RunStatus.ERROR, {})
    worker.board.update(dist.run_id, phase=Phase.DONE, error=f"{type(exc).__name__}: {exc}")


def _step(run: _Run) -> None:
    phase = run.dist.phase
    if run.dist.cancelled and phase in {Phase.RESOLVE, Phase.PROBE}:
        if phase is Phase.PROBE and _shards_open(run, ShardKind.PROBE, 0):
            return  # the running probe shards end first (the last one wakes us)
        reason = f"run cancelled by {run.dist.cancelled}"
        run.log.warning("run.aborted", reason=reason)
        run.worker.board.update(run.run_id, stopped=reason, phase=Phase.FINISH)
        _finish(_reloaded(run))
    elif phase is Phase.RESOLVE:
        _resolve(run)
    elif phase is Phase.PROBE:
        if _shards_open(run, ShardKind.PROBE, 0):
            return
        _decide(run)
    elif phase is Phase.ACT:
        if _shards_open(run, ShardKind.ACT, run.dist.batch):
            return
        _after_batch(run)
    elif phase is Phase.FINISH:
        _finish(run)


def _shards_open(run: _Run, kind: ShardKind, batch: int) -> bool:
    """Whether a shard of this step has not ended (a later one wakes the coordinator)."""
    return any(
        s.batch == batch and s.state in {ShardState.QUEUED, ShardState.RUNNING}
        for s in run.worker.board.shards(run.run_id, kind)
    )


def _resolve(run: _Run) -> None:
    """Stream the targets into host rows, a page at a time; start the probe shards."""
    board, request = run.worker.board, run.request
    board.reset_hosts(run.run_id)
    keep = None if request.hosts is None else set(request.hosts)
    size = run.stored.shard_size
    count = 0
    page: list[NewHost] = []
    for host, groups in stream_hosts(
        request.inventory, run.runbook.spec.targets.hosts, request.limit
    ):
        if keep is not None and host.name not in keep:
            continue
        page.append(
            NewHost(
                host=host.name,
                position=count,
                vars=host.vars,
                groups=groups,
                shard=count // size + 1,
            )
        )
        count += 1
        if len(page) >= _WRITE_PAGE:
            board.add_hosts(run.run_id, page)
            page = []
    if page:
        board.add_hosts(run.run_id, page)
    if not count:
        narrowed = f" with --limit {request.limit!r}" if request.limit is not None else ""
        raise InventoryError(
            f"inventory {request.inventory}: host pattern "
            f"{run.runbook.spec.targets.hosts!r}{narrowed} selects no host"
        )
    for names, part in _name_pages(run, count):
        run.log.info("targets.resolved", run_id=run.run_id, hosts=names, **part)
    targeted = run.stored.targeted or request.fleet or count
    board.update(run.run_id, hosts=count, targeted=targeted)
    shards = -(-count // size)
    board.start_shards(
        run.run_id,
        ShardKind.PROBE,
        [(n, 0) for n in range(1, shards + 1)],
        {n: probe_job(run.run_id, n) for n in range(1, shards + 1)},
        run.worker.jobs,
        phase=Phase.PROBE,
    )


def _name_pages(run: _Run, total: int) -> Iterator[tuple[list[str], dict[str, int]]]:
    """The run's host names in pages of :data:`EVENT_HOSTS`, with :func:`_part` fields."""
    parts = max(1, -(-total // EVENT_HOSTS))
    after = -1
    for part in range(1, parts + 1):
        page = run.worker.board.host_names(run.run_id, after=after, limit=EVENT_HOSTS)
        yield [name for _, name in page], _part(part, parts, total)
        if not page:
            return
        after = page[-1][0]


def _decide(run: _Run) -> None:
    """Every host planned: the blast radius, approval and admission; then the batches."""
    board, runbook = run.worker.board, run.runbook
    counts = board.outcome_counts(run.run_id)
    acting = counts.get(HostOutcome.PLANNED.value, 0)
    targeted = run.dist.targeted
    refused = blast_radius_refusal(runbook, targeted, acting)
    if refused:
        board.refuse_planned(run.run_id, HostOutcome.REFUSED.value, refused)
        run.log.warning("guard.denied", run_id=run.run_id, guard="blast_radius", message=refused)
        acting = 0
    plan = run.plan_meta(refused)
    sample: HostPlan | None = None  # an acting host, a destructive one if there is one
    applies = plan.mode is Mode.APPLY
    names: list[str] = []  # acting hosts' names for admission (the blast radius caps them)
    for page, part in _acting_pages(run, acting):
        run.log.info(
            "plan.created",
            run_id=run.run_id,
            acting=[h.host for h in page],
            steps={h.host: [s.id for s in h.steps] for h in page},
            refused=refused,
            **part,
        )
        names += (h.host for h in page) if applies else ()
        for host in page:
            if sample is None or (not _destructive(sample) and _destructive(host)):
                sample = host
    acts = applies and bool(names) and not refused
    # approval depends on whether any acting host has a destructive step: the sample tells
    if acts and needs_approval(runbook, plan.model_copy(update={"hosts": (sample,)})):
        if run.stored.approved:
            run.log.info("approval.granted", approver=run.request.user)
        else:
            refused = "approval declined"
            run.log.warning("approval.declined", approver=run.request.user)
    if acts and not refused:
        refused = _admit(run, names)
    if refused and acts:
        board.refuse_planned(run.run_id, HostOutcome.REFUSED.value, refused)
    board.update(
        run.run_id,
        meta=plan.model_copy(update={"hosts": (), "refused": refused}).model_dump(mode="json"),
    )
    if not acts or refused:
        board.update(run.run_id, phase=Phase.FINISH)
        _finish(_reloaded(run))
        return
    policy = runbook.spec.policy
    board.assign_batches(run.run_id, policy.serial, run.stored.shard_size)
    _start_batch(_reloaded(run), 1)


def _destructive(host: HostPlan) -> bool:
    return any(s.destructive for s in host.steps)


def _acting_pages(run: _Run, acting: int) -> Iterator[tuple[list[HostPlan], dict[str, int]]]:
    """The planned hosts' plans in pages of :data:`EVENT_HOSTS`, with ``part`` fields.

    One page, empty, when none acts (``plan.created`` is logged all the same).
    """
    parts = max(1, -(-acting // EVENT_HOSTS))
    page: list[HostPlan] = []
    part = 0
    hosts = run.worker.board.all_hosts(run.run_id, outcome=HostOutcome.PLANNED.value)
    for host in hosts if acting else ():
        page.append(_plan(host))
        if len(page) >= EVENT_HOSTS:
            part += 1
            yield page, _part(part, parts, acting)
            page = []
    if page or not part:
        part += 1
        yield page, _part(part, parts, acting)


def _part(part: int, parts: int, total: int) -> dict[str, int]:
    """Fields of an event that lists one page of hosts.

    None when one page is all of them (the event is then a single-process run's), else
    ``part`` of ``parts`` and the ``total``.
    """
    return {} if parts == 1 else {"part": part, "parts": parts, "total": total}


def _reloaded(run: _Run) -> _Run:
    dist = run.worker.board.get(run.run_id)
    assert dist is not None  # noqa: S101 - the run's row is never deleted while it runs
    fresh = _Run.__new__(_Run)
    fresh.__dict__.update(run.__dict__)
    fresh.dist = dist
    return fresh


def _plan(host: BoardHost) -> HostPlan:
    if host.plan is None:
        raise ValueError(f"internal: host {host.host} has no plan")
    return HostPlan.model_validate(host.plan)


def _admit(run: _Run, acting: Sequence[str]) -> str | None:
    """Admit the run's acting hosts under the fleet-wide blast radius; why not, or None."""
    runbook = run.runbook
    admission = run.worker.services.store.admit_hosts(
        runbook.name,
        run.run_id,
        acting,
        allowed=allowed_hosts(runbook.spec.policy, run.dist.targeted),
        ttl=run.lease_ttl,
    )
    if admission.admitted:
        return None
    reason = admission_refusal(runbook, run.dist.targeted, acting, admission.in_flight)
    run.log.warning(
        "guard.denied", guard="blast_radius", message=reason, in_flight=list(admission.in_flight)
    )
    return reason


def _start_batch(run: _Run, batch: int) -> None:
    shards = run.worker.board.act_shards(run.run_id, batch)
    run.worker.services.store.renew_admission(run.run_id, run.lease_ttl)
    run.log.info("batch.started", batch=batch, shards=shards)
    run.worker.board.start_shards(
        run.run_id,
        ShardKind.ACT,
        [(n, batch) for n in shards],
        {n: act_job(run.run_id, n) for n in shards},
        run.worker.jobs,
        phase=Phase.ACT,
        batch=batch,
    )


def _after_batch(run: _Run) -> None:
    """The batch's shards all ended: the fail budget across them, then the next batch."""
    board, policy, batch = run.worker.board, run.runbook.spec.policy, run.dist.batch
    counts = board.outcome_counts(run.run_id, batch_at_most=batch)
    untouched = counts.get(HostOutcome.SKIPPED.value, 0) + counts.get(HostOutcome.HEALTHY.value, 0)
    attempted = sum(counts.values()) - untouched
    failures = attempted - counts.get(HostOutcome.FIXED.value, 0)
    later = board.act_shards(run.run_id, batch + 1)
    reason = None
    if run.dist.cancelled:
        reason = f"run cancelled by {run.dist.cancelled}"
    elif later and attempted and failures * 100 > policy.max_fail_pct * attempted:
        reason = (
            f"run stopped: {failures} of {attempted} hosts failed, above "
            f"max_fail_pct {policy.max_fail_pct}"
        )
    if reason is not None:
        run.log.warning("run.aborted", reason=reason)
        board.skip_batches_after(run.run_id, batch, reason)
        board.update(run.run_id, stopped=reason, phase=Phase.FINISH)
        _finish(_reloaded(run))
        return
    if later:
        _start_batch(run, batch + 1)
        return
    board.update(run.run_id, phase=Phase.FINISH)
    _finish(_reloaded(run))


def _finish(run: _Run) -> None:
    """Record every host not recorded yet, then end the run (``run.finished``)."""
    board, store = run.worker.board, run.worker.services.store
    if run.dist.meta is None:  # stopped before it was planned: the report needs the plan's head
        board.update(run.run_id, meta=run.plan_meta().model_dump(mode="json"))
        run = _reloaded(run)
    now = run.worker.services.clock()
    summary: Counter[str] = Counter()
    bad = False
    pending_records: list[Any] = []
    pending_hosts: list[str] = []
    for host in board.all_hosts(run.run_id):
        report = final_report(host, run.dist)
        summary[report.outcome.value] += 1
        bad = bad or report.outcome in BAD_OUTCOMES
        if not host.recorded:
            pending_records.append(host_record(run.run_id, report, now, run.secrets))
            pending_hosts.append(host.host)
        if len(pending_records) >= _WRITE_PAGE:
            board.record_board_hosts(pending_records, pending_hosts)
            pending_records, pending_hosts = [], []
    board.record_board_hosts(pending_records, pending_hosts)
    meta = run.dist.meta or {}
    if run.dist.stopped or run.dist.cancelled:
        status = RunStatus.ABORTED
    elif meta.get("refused"):
        status = RunStatus.REFUSED
    elif bad:
        status = RunStatus.DEGRADED
    else:
        status = RunStatus.SUCCEEDED
    with audit_unit():  # the event commits with the run's end
        run.log.info("run.finished", status=status.value, summary=dict(summary))
        store.finish_run(run.run_id, status, dict(summary))
    board.update(run.run_id, phase=Phase.DONE)


def final_report(host: BoardHost, dist: DistRun) -> HostReport:
    """How a host of a distributed run ended, from its row."""
    if host.report is not None:
        return HostReport.model_validate(host.report)
    if host.plan is not None:
        plan = HostPlan.model_validate(host.plan)
        if not (dist.cancelled and plan.outcome is HostOutcome.PLANNED):
            return host_report(plan)
    if dist.cancelled:
        return HostReport(
            host=host.host, outcome=HostOutcome.SKIPPED, reason=f"run cancelled by {dist.cancelled}"
        )
    return HostReport(
        host=host.host,
        outcome=HostOutcome.ERROR,
        reason="its probe shard failed: see the run's shards (remediate workers)",
    )


# --------------------------------------------------------------------------- shards


def write_inventory(folder: Path, hosts: Sequence[BoardHost]) -> Path:
    """An inventory of exactly ``hosts``, with the vars and groups Ansible resolved for them.

    A shard's playbooks read this, never the whole fleet's inventory (a dynamic one would
    be queried again by every shard).
    """
    groups: dict[str, dict[str, Any]] = {}
    for host in hosts:
        for group in host.groups:
            groups.setdefault(group, {"hosts": {}})["hosts"][host.host] = None
    inventory = {
        "all": {
            "hosts": {h.host: h.vars or None for h in hosts},
            **({"children": groups} if groups else {}),
        }
    }
    path = folder / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path


@contextmanager
def _shard_folder(worker: WorkerContext) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="shard-", dir=private_dir(worker.work_dir)))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def probe_shard(
    worker: WorkerContext, run_id: str, shard: int, *, job_id: int, last_try: bool
) -> None:
    """Probe one shard's hosts, evaluate their guards and plan them (read-only).

    A failure raises (the task engine tries again) unless it was the ``last_try``: then the
    shard ends ``failed`` and its hosts end ``error``.
    """
    board = worker.board
    run = _claimed(worker, run_id, ShardKind.PROBE, shard, job_id)
    if run is None:
        return
    dist = run.dist
    with run.context():
        if dist.cancelled:
            _end_shard(run, ShardKind.PROBE, shard, job_id, [], ShardState.FAILED, "cancelled")
            return
        try:
            hosts = board.hosts(run_id, shard=shard, limit=run.stored.shard_size)
            with _shard_folder(worker) as folder:
                probes = run_probes(
                    worker.services.executor,
                    write_inventory(folder, hosts),
                    [h.host for h in hosts],
                    run.runbook.spec.checks,
                    run.params,
                )
        except Exception as exc:
            if not last_try:
                raise
            why = f"{type(exc).__name__}: {exc}"
            _end_shard(run, ShardKind.PROBE, shard, job_id, [], ShardState.FAILED, why)
            return
        now = worker.services.clock()
        with audit_unit():  # the hosts' events commit with the shard's results
            plans = [
                decide_host(
                    run.runbook,
                    Host(name=h.host, vars=h.vars),
                    probes,
                    run.params,
                    worker.services,
                    run_id,
                    now,
                )
                for h in hosts
            ]
            results = [
                HostResult(host=p.host, outcome=p.outcome.value, data=p.model_dump(mode="json"))
                for p in plans
            ]
            _end_shard(run, ShardKind.PROBE, shard, job_id, results, ShardState.DONE, "")


def _claimed(
    worker: WorkerContext, run_id: str, kind: ShardKind, shard: int, job_id: int
) -> _Run | None:
    """The shard's run once this job holds the shard; None when another does or the run is gone."""
    if worker.board.claim_shard(run_id, kind, shard, job_id=job_id, worker=worker.name) is None:
        return None
    dist = worker.board.get(run_id)
    return None if dist is None else _Run(worker, dist)


def _end_shard(
    run: _Run,
    kind: ShardKind,
    shard: int,
    job_id: int,
    results: Sequence[HostResult],
    state: ShardState,
    reason: str,
) -> None:
    written = run.worker.board.finish_shard(
        run.run_id,
        kind,
        shard,
        job_id=job_id,
        results=results,
        state=state,
        reason=reason,
        coordinator=coordinator_job(run.run_id),
        jobs=run.worker.jobs,
    )
    if not written:  # another job holds the shard now (this one was found stalled)
        run.log.warning("shard.superseded", kind=kind.value, shard=shard, job=job_id)


def act_shard(
    worker: WorkerContext,
    run_id: str,
    shard: int,
    *,
    job_id: int,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """Act on one shard's hosts: lease, decide again on a fresh probe, act, verify, record.

    Hosts already ended (a retry after the shard's worker died) are left as they are, and
    so are hosts past their attempt limit (they stay ``interrupted``).  ``stopping()``
    turning true (the worker stops past its grace time) stops the steps.
    """
    board = worker.board
    run = _claimed(worker, run_id, ShardKind.ACT, shard, job_id)
    if run is None:
        return
    dist = run.dist
    hosts = [
        h
        for h in board.hosts(run_id, act_shard=shard, limit=run.stored.shard_size)
        if (h.report is None or h.outcome == HostOutcome.INTERRUPTED.value)
        and h.attempts <= run.stored.act_attempts
    ]
    with run.context():
        if dist.cancelled:
            reason = f"run cancelled by {dist.cancelled}"
            results = [
                _result(HostReport(host=h.host, outcome=HostOutcome.SKIPPED, reason=reason))
                for h in hosts
            ]
            _end_act_shard(run, shard, job_id, results, ShardState.DONE, reason, stopping)
            return
        try:
            results = _act(run, hosts, stopping)
        except Exception as exc:  # noqa: BLE001 - the shard's hosts end interrupted, never retried
            why = f"the act shard failed: {type(exc).__name__}: {exc}"
            results = [
                _result(HostReport(host=h.host, outcome=HostOutcome.INTERRUPTED, reason=why))
                for h in hosts
            ]
            _end_act_shard(run, shard, job_id, results, ShardState.FAILED, why, stopping)
            return
        _end_act_shard(run, shard, job_id, results, ShardState.DONE, "", stopping)


def _end_act_shard(
    run: _Run,
    shard: int,
    job_id: int,
    results: Sequence[HostResult],
    state: ShardState,
    reason: str,
    stopping: Callable[[], bool],
) -> None:
    """End an act shard, trying again while the state database is away.

    Its hosts were acted on: a write lost here would leave the shard ``running`` for as long
    as its worker lives (no one recovers a live worker's job) and its run waiting.  The
    write is fenced by the job's id: a try after a commit whose answer was lost, or after
    another worker interrupted the shard, changes nothing.  The worker stopping past its
    grace, or :data:`FINAL_WRITE_PATIENCE` spent, gives up (the error is raised): the shard
    is then recovered like a dead worker's once this one stops.
    """
    services = run.worker.services
    deadline = services.clock() + FINAL_WRITE_PATIENCE
    wait = 0.5
    while True:
        try:
            _end_shard(run, ShardKind.ACT, shard, job_id, results, state, reason)
        except StateError as exc:
            if stopping() or services.clock() >= deadline:
                raise
            log_anyway(
                run.log.warning,
                "shard.write_retried",
                kind=ShardKind.ACT.value,
                shard=shard,
                job=job_id,
                error=str(exc),
            )
        else:
            return
        services.sleep(wait)
        wait = min(wait * 2, _FINAL_WRITE_WAIT)


def _result(report: HostReport, *, recorded: bool = False) -> HostResult:
    return HostResult(
        host=report.host,
        outcome=report.outcome.value,
        data=report.model_dump(mode="json"),
        recorded=recorded,
    )


def _act(run: _Run, hosts: Sequence[BoardHost], stopping: Callable[[], bool]) -> list[HostResult]:
    """The shard's hosts through the single-process path's batch (Apply.act_on)."""
    worker = run.worker
    services = worker.services
    plans = {h.host: _plan(h) for h in hosts}
    with _shard_folder(worker) as folder:
        inventory = write_inventory(folder, hosts)
        request = run.request.model_copy(update={"inventory": inventory})
        targets = TargetSet(
            inventory=inventory,
            pattern=run.runbook.spec.targets.hosts,
            limit=run.request.limit,
            hosts=tuple(Host(name=h.host, vars=h.vars) for h in hosts),
        )
        ctx = PlanContext(
            run.runbook, request, targets, run.params, {}, run.dist.targeted, run.secrets
        )
        plan = run.plan_meta().model_copy(update={"hosts": tuple(plans.values())})
        decided: dict[str, HostReport] = {}

        def before_acting(batch: Sequence[HostPlan]) -> dict[str, HostReport]:
            """Under the leases: probe again, decide again; those that no longer need it."""
            names = [h.host for h in batch]
            probes = run_probes(
                services.executor, inventory, names, run.runbook.spec.checks, run.params
            )
            ctx.probes.update(probes)  # verify compares with the state right before acting
            return _no_longer_needed(run, batch, probes, ctx.host_vars)

        def stop() -> str | None:
            if stopping():
                return f"the worker {worker.name} stopped before this host's first step"
            return None

        apply = Apply(plan, ctx, services, stop=stop, before_acting=before_acting)
        with apply.keeper:
            apply.act_on(run.dist.batch, plan.acting)
        decided.update(apply.reports)
    return [_result(decided[h.host], recorded=h.host in apply.recorded) for h in hosts]


def _no_longer_needed(
    run: _Run,
    batch: Sequence[HostPlan],
    probes: Mapping[str, HostProbe],
    host_vars: Mapping[str, Mapping[str, Any]],
) -> dict[str, HostReport]:
    """Hosts a fresh probe and the guards (cool-down, other runs' leases) no longer let act."""
    services = run.worker.services
    now = services.clock()
    out: dict[str, HostReport] = {}
    for host_plan in batch:
        probe = probes[host_plan.host]
        try:
            decision = evaluate_host(
                run.runbook,
                probe,
                run.params,
                host_vars[host_plan.host],
                services.store,
                now,
                own_run=run.run_id,
            )
        except EvaluationError as exc:  # cannot tell: do less, never more
            out[host_plan.host] = host_report(host_plan, HostOutcome.ERROR, f"before acting: {exc}")
            continue
        if decision.proceeds:
            continue
        reason = f"on the probe right before acting: {decision.reason or decision.outcome}"
        if decision.outcome is HostOutcome.HEALTHY:
            reason = "the symptom is gone on the probe right before acting"
        outcome = decision.outcome or HostOutcome.SKIPPED
        if probe.status is not ProbeStatus.OK:
            outcome = (
                HostOutcome.UNREACHABLE
                if probe.status is ProbeStatus.UNREACHABLE
                else HostOutcome.ERROR
            )
        run.log.info("host.rechecked", host=host_plan.host, outcome=outcome.value, reason=reason)
        out[host_plan.host] = host_report(host_plan, outcome, reason)
    return out
