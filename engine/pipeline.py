"""The pipeline: the only place that wires every stage.

::

    load runbook → resolve targets → probe → evaluate guards → plan → act → verify → audit

Entry points (CLI, webhook server) build :class:`Services` once and call :func:`plan_run`
and :func:`execute_plan`, or :func:`run_runbook` for both.  Every stage emits audit events
through structlog; outcomes are values in the :class:`RunReport`, never exceptions.

Targets and the first probe come from one executor call.  An entry point may start that
call itself (:func:`engine.probes.start_probe`, before it opens the state store and the
audit log) and pass it as ``first_probe``: the probe is read-only, and it is collected, and
audited, here, in the order above, after ``run.started``.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.actions import StepRun, run_steps
from engine.audit import audit_context, audit_unit
from engine.drift import drift_reason
from engine.errors import ExecutorError, PlanFileError
from engine.executors.base import Executor, HostStatus, SelectingExecutor
from engine.expressions import EvaluationError
from engine.guards import (
    admission_refusal,
    allowed_hosts,
    blast_radius_refusal,
    context_for,
    evaluate_host,
)
from engine.leases import LeaseKeeper
from engine.outcomes import BAD_OUTCOMES, HostOutcome, Mode, RunStatus
from engine.planfiles import SavedPlan
from engine.plans import (
    HostPlan,
    Plan,
    plan_host,
    refuse,
    runbook_ref,
    shown_params,
)
from engine.probes import HostProbe, PendingProbe, ProbeStatus, run_probes, start_probe
from engine.redaction import NO_SECRETS, REDACTED, Secrets
from engine.runbooks import Runbook
from engine.runbooks.spec import Approval
from engine.state import HostRecord, RunRecord, StateStore
from engine.targets import Host, TargetSet, resolve_targets, runbook_selection, target_set
from engine.verification import verify_hosts

#: How long a device lease lives unless renewed (it is renewed every third of it).
DEFAULT_LEASE_TTL = timedelta(minutes=1)


class Reporter(Protocol):
    """Progress for people; the CLI shows it with Rich, others ignore it."""

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase starts (``total`` units of work, when known)."""

    def advance(self, amount: int = 1) -> None:
        """Some units of the current phase are done."""


class NullReporter:
    """Reports nothing."""

    def phase(self, name: str, total: int | None = None) -> None:
        """Ignore the phase."""

    def advance(self, amount: int = 1) -> None:
        """Ignore the progress."""


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex (the entry points' id factory)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Services:
    """Everything the pipeline needs from outside, built once by an entry point."""

    executor: Executor
    store: StateStore
    clock: Callable[[], datetime]
    new_run_id: Callable[[], str]
    artifacts_dir: Path
    sleep: Callable[[float], None]
    reporter: Reporter = field(default_factory=NullReporter)
    secrets: Secrets = NO_SECRETS
    """Values the entry point knows to be secret; a run adds its secret params' values."""
    holder: str = "cli"  # who holds the device leases of its runs (a controller's name)
    lease_ttl: timedelta = DEFAULT_LEASE_TTL  # device leases live this long unless renewed


class RunRequest(BaseModel):
    """What a person or an alert asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inventory: Path
    limit: str | None = None
    overrides: dict[str, str] = Field(default_factory=dict)
    mode: Mode = Mode.DRY_RUN
    trigger: str  # "user:<name>" or "alert:<fingerprint>"
    user: str
    hosts: tuple[str, ...] | None = None  # exact host names to keep (a saved plan's hosts)
    #: How many hosts the blast radius is judged against when the run's own targets are a
    #: part of the fleet (an alert run on one device: the hosts its runbook targets).
    fleet: int | None = None


class HostReport(BaseModel):
    """Where one host ended, with the steps that ran and the evidence after them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    outcome: HostOutcome
    reason: str = ""
    steps: tuple[StepRun, ...] = ()
    evidence_after: dict[str, Any] = Field(default_factory=dict)


class RunReport(BaseModel):
    """The whole run: the plan it acted on and how every host ended."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: Plan
    status: RunStatus
    hosts: tuple[HostReport, ...]
    finished_at: datetime

    @property
    def summary(self) -> dict[str, int]:
        """Host outcome → count."""
        return dict(Counter(h.outcome.value for h in self.hosts))

    @property
    def ok(self) -> bool:
        """Whether everything ended fixed, healthy, planned or skipped."""
        return self.status is RunStatus.SUCCEEDED


@dataclass
class PlanContext:
    """What planning learnt that acting needs again (targets, first probes, params)."""

    runbook: Runbook
    request: RunRequest
    targets: TargetSet
    params: dict[str, Any]
    probes: dict[str, HostProbe]
    targeted: int  # the hosts the blast radius is judged against
    secrets: Secrets = NO_SECRETS
    """Scrubbed from what the run keeps: the entry point's secrets and the secret params'."""

    @property
    def host_vars(self) -> dict[str, Mapping[str, Any]]:
        """Inventory vars by host name."""
        return {h.name: h.vars for h in self.targets.hosts}


def _secret_keys(runbook: Runbook) -> list[str]:
    return sorted(runbook.secret_params)


def started_run(
    runbook: Runbook,
    request: RunRequest,
    run_id: str,
    params: Mapping[str, Any],
    started: datetime,
    **extra: object,
) -> RunRecord:
    """Audit ``run.started`` (in the caller's audit context); the run's record to keep."""
    structlog.get_logger().info(
        "run.started",
        user=request.user,
        inventory=str(request.inventory),
        limit=request.limit,
        params=params,
        secret_keys=_secret_keys(runbook),
        **extra,
    )
    return RunRecord(
        run_id=run_id,
        runbook=runbook.name,
        runbook_digest=runbook.digest,
        mode=request.mode,
        trigger=request.trigger,
        started_at=started,
    )


def run_secrets(runbook: Runbook, params: Mapping[str, Any], known: Secrets) -> Secrets:
    """``known`` and the values of the runbook's secret params (see :mod:`engine.redaction`)."""
    return known.with_values(params[name] for name in runbook.secret_params if name in params)


def plan_run(
    runbook: Runbook,
    request: RunRequest,
    services: Services,
    *,
    run_id: str | None = None,
    targeted: int | None = None,
    first_probe: PendingProbe | None = None,
) -> tuple[Plan, PlanContext]:
    """Resolve targets, probe, evaluate guards and plan; nothing on a device changes.

    ``targeted`` is the fleet size the blast radius is judged against, when the request's
    hosts are a part of it (applying a saved plan: the hosts the review targeted).
    ``first_probe``, if given, is the targets and first probe already started for this
    request (see the module docstring).
    """
    log = structlog.get_logger()
    params = runbook.param_values(request.overrides)
    run_id = run_id or services.new_run_id()
    targets, probes = _targets_and_probes(runbook, request, services, params, first_probe)
    log.info("targets.resolved", run_id=run_id, hosts=list(targets.names))
    now = services.clock()
    services.reporter.phase("evaluating guards", len(targets.hosts))
    with audit_unit():  # a database-kept chain takes the per-host events in few commits
        plans = tuple(
            decide_host(runbook, host, probes, params, services, run_id, now)
            for host in targets.hosts
        )
    acting = sum(1 for h in plans if h.outcome is HostOutcome.PLANNED)
    targeted = targeted or request.fleet or len(targets.hosts)
    refused = blast_radius_refusal(runbook, targeted, acting)
    if refused:
        plans = refuse(plans, refused)
        log.warning("guard.denied", run_id=run_id, guard="blast_radius", message=refused)
    plan = Plan(
        run_id=run_id,
        runbook=runbook_ref(runbook),
        mode=request.mode,
        created_at=now,
        created_by=request.user,
        trigger=request.trigger,
        inventory=str(request.inventory),
        pattern=runbook.spec.targets.hosts,
        limit=request.limit,
        params=shown_params(runbook, params),
        overrides=shown_params(runbook, request.overrides),
        hosts=plans,
        refused=refused,
    )
    log.info(
        "plan.created",
        run_id=run_id,
        acting=[h.host for h in plan.acting],
        steps={h.host: [s.id for s in h.steps] for h in plan.acting},
        refused=refused,
    )
    secrets = run_secrets(runbook, params, services.secrets)
    return plan, PlanContext(runbook, request, targets, params, probes, targeted, secrets)


def decide_host(
    runbook: Runbook,
    host: Host,
    probes: Mapping[str, HostProbe],
    params: Mapping[str, Any],
    services: Services,
    run_id: str,
    now: datetime,
) -> HostPlan:
    """Evaluate and plan one probed host, with its audit events (a probe shard calls it too)."""
    log = structlog.get_logger()
    probe = probes[host.name]
    log.info(
        "probe.finished",
        run_id=run_id,
        host=host.name,
        status=probe.status.value,
        message=probe.message,
        evidence=probe.evidence(),
    )
    decision = evaluate_host(runbook, probe, params, host.vars, services.store, now)
    if decision.outcome is HostOutcome.SKIPPED:
        blocked = decision.guards[-1]
        log.info(
            "guard.denied",
            run_id=run_id,
            host=host.name,
            guard=blocked.id,
            message=blocked.message,
        )
    host_plan = plan_host(runbook, decision, probe, params, host.vars)
    log.info(
        "host.decided",
        run_id=run_id,
        host=host.name,
        outcome=host_plan.outcome.value,
        reason=host_plan.reason,
        steps=[s.id for s in host_plan.steps],
    )
    services.reporter.advance()
    return host_plan


def _targets_and_probes(
    runbook: Runbook,
    request: RunRequest,
    services: Services,
    params: Mapping[str, Any],
    first_probe: PendingProbe | None,
) -> tuple[TargetSet, dict[str, HostProbe]]:
    """Resolve the targets (narrowed to ``request.hosts``, if set) and probe them.

    A :class:`SelectingExecutor` does both in one call (``first_probe``, when an entry point
    started it); for other executors, targets are resolved first, then probed.
    """
    executor, pattern, checks = services.executor, runbook.spec.targets.hosts, runbook.spec.checks
    selection = runbook_selection(runbook, request.inventory, request.limit, request.hosts)
    if first_probe is None:
        if not isinstance(executor, SelectingExecutor):
            services.reporter.phase("resolving targets")
            targets = _kept(resolve_targets(request.inventory, pattern, request.limit), request)
            services.reporter.phase(f"probing {len(targets.hosts)} hosts", len(targets.hosts))
            probes = run_probes(executor, request.inventory, targets.names, checks, params)
            services.reporter.advance(len(targets.hosts))
            return targets, probes
        first_probe = start_probe(executor, selection, checks, params)
    elif (first_probe.selection, first_probe.checks, first_probe.params) != (
        selection,
        tuple(checks),
        dict(params),
    ):
        raise ValueError("internal: the first probe was started for another run")
    services.reporter.phase("resolving targets and probing them")
    with first_probe:
        try:
            selected = first_probe.result()
        except ExecutorError:
            # Did Ansible stop at the inventory or the limit?  Then that is the input error.
            resolve_targets(request.inventory, pattern, request.limit)
            raise
    targets = _kept(target_set(request.inventory, pattern, request.limit, selected.hosts), request)
    probes = {
        name: selected.probes.get(name)
        or HostProbe(host=name, status=ProbeStatus.ERROR, message="the executor ran no probe")
        for name in targets.names
    }
    return targets, probes


def _kept(targets: TargetSet, request: RunRequest) -> TargetSet:
    """The targets narrowed to the request's exact host names, if it names some."""
    if request.hosts is None:
        return targets
    keep = set(request.hosts)
    return targets.model_copy(update={"hosts": tuple(h for h in targets.hosts if h.name in keep)})


def needs_approval(runbook: Runbook, plan: Plan) -> bool:
    """Whether acting on ``plan`` needs a person's approval under the runbook's policy."""
    if not plan.acting:
        return False
    approval = runbook.spec.policy.approval
    return approval is Approval.ALWAYS or (approval is Approval.DESTRUCTIVE and plan.destructive)


def run_status(hosts: Sequence[HostReport], refused: bool, aborted: bool) -> RunStatus:
    """How a run ended, from its hosts' reports and whether it was refused or stopped."""
    if aborted:
        return RunStatus.ABORTED
    if refused:
        return RunStatus.REFUSED
    if any(h.outcome in BAD_OUTCOMES for h in hosts):
        return RunStatus.DEGRADED
    return RunStatus.SUCCEEDED


def host_report(
    host_plan: HostPlan, outcome: HostOutcome | None = None, reason: str = ""
) -> HostReport:
    """The report of a host that was not acted on: its plan's outcome, or the one given."""
    return HostReport(
        host=host_plan.host,
        outcome=outcome or host_plan.outcome,
        reason=reason or host_plan.reason,
    )


def _batches(hosts: tuple[HostPlan, ...], size: int) -> list[tuple[HostPlan, ...]]:
    return [hosts[i : i + size] for i in range(0, len(hosts), size)]


class Apply:
    """One apply over a plan: batches, leases, steps, verify, failure budget.

    Each batch's devices are leased (renewed by a :class:`LeaseKeeper` while its playbooks
    run); a device whose lease is lost gets no further step, and its outcome and cool-down
    are written fenced by the lease, as soon as its batch ends.
    """

    def __init__(
        self,
        plan: Plan,
        ctx: PlanContext,
        services: Services,
        *,
        stop: Callable[[], str | None] = lambda: None,
        before_acting: Callable[[Sequence[HostPlan]], dict[str, HostReport]] | None = None,
    ) -> None:
        self.plan, self.ctx, self.services = plan, ctx, services
        #: Called with a batch's leased hosts before acting: reports of those that must not
        #: be acted on after all (an act shard probes and decides them again).
        self.before_acting = before_acting
        #: Why no further step runs on any host (a cancel, a worker stopping), or None.
        self.stop = stop
        self.reports: dict[str, HostReport] = {}
        self.recorded: set[str] = set()  # hosts whose outcome is in the store already
        self.untouched: set[str] = set()  # hosts stopped before their first step
        self.failures = 0
        self.attempted = 0
        self.log = structlog.get_logger()
        self.keeper = LeaseKeeper(
            services.store,
            run_id=plan.run_id,
            holder=services.holder,
            ttl=min(services.lease_ttl, ctx.runbook.spec.policy.lock_ttl),
            max_hold=ctx.runbook.spec.policy.lock_ttl,
        )

    def run(self) -> bool:
        """Act on every batch; return whether the failure budget stopped the run."""
        with self.keeper:
            return self._run_batches()

    def _run_batches(self) -> bool:
        policy = self.ctx.runbook.spec.policy
        batches = _batches(self.plan.acting, policy.serial)
        acting = len(self.plan.acting)
        self.services.reporter.phase(f"acting on {acting} hosts", acting)
        for number, batch in enumerate(batches, start=1):
            if self.attempted and self.failures * 100 > policy.max_fail_pct * self.attempted:
                reason = (
                    f"run stopped: {self.failures} of {self.attempted} hosts failed, above "
                    f"max_fail_pct {policy.max_fail_pct}"
                )
                self.log.warning("run.aborted", reason=reason)
                for later in batches[number - 1 :]:
                    for host_plan in later:
                        self.reports[host_plan.host] = host_report(
                            host_plan, HostOutcome.SKIPPED, reason
                        )
                return True
            self.act_on(number, batch)
        return False

    def act_on(self, number: int, batch: tuple[HostPlan, ...]) -> None:
        """Lease, act on, verify and record one batch (a serial batch, or an act shard)."""
        locked: list[HostPlan] = []
        for host_plan in batch:
            grant = self.keeper.acquire(host_plan.host)
            if grant.lease is not None:
                locked.append(host_plan)
                continue
            holder = grant.held_by
            reason = f"device lock held by run {holder.run_id if holder else 'another run'}"
            self.log.info("guard.denied", host=host_plan.host, guard="device_lock", message=reason)
            self.reports[host_plan.host] = host_report(host_plan, HostOutcome.SKIPPED, reason)
        try:
            if self.before_acting is not None and locked:
                dropped = self.before_acting(locked)
                self.reports.update(dropped)
                locked = [h for h in locked if h.host not in dropped]
            self._act(number, tuple(locked))
            self._record(tuple(locked))
        finally:
            self.keeper.release_all()

    def _still_needed(self, hosts: Sequence[str], step_id: str) -> set[str]:
        """Probe ``hosts`` again: those where the symptom and the step's ``when`` still hold."""
        ctx = self.ctx
        hosts = [h for h in hosts if h not in self.keeper.lost]
        probes = run_probes(
            self.services.executor,
            ctx.request.inventory,
            hosts,
            ctx.runbook.spec.checks,
            ctx.params,
        )
        still: set[str] = set()
        for host in hosts:
            context = context_for(probes[host], ctx.params, ctx.host_vars[host])
            try:
                if ctx.runbook.symptom.test(context) and ctx.runbook.steps[step_id].when.test(
                    context
                ):
                    still.add(host)
            except EvaluationError as exc:  # cannot tell: do less, never more
                self.log.warning("step.recheck_failed", host=host, step=step_id, error=str(exc))
        return still

    def _stopped(self) -> set[str]:
        """Hosts that get no further step: their lease was lost, or every host, when stopping."""
        if self.stop() is not None:
            return set(self.reports) | {h.host for h in self.plan.acting}
        return set(self.keeper.lost)

    def _lost(self, host: str, runs: Sequence[StepRun] = ()) -> HostReport:
        return HostReport(
            host=host,
            outcome=HostOutcome.INTERRUPTED,
            reason=f"lease lost, stopped acting on it: {self.keeper.lost.get(host, '?')}",
            steps=tuple(runs),
        )

    def _act(self, number: int, batch: tuple[HostPlan, ...]) -> None:
        if not batch:
            return
        services, ctx = self.services, self.ctx
        try:
            step_runs = run_steps(
                ctx.runbook,
                batch,
                services.executor,
                ctx.request.inventory,
                run_id=self.plan.run_id,
                artifacts_dir=services.artifacts_dir / self.plan.run_id,
                label=f"batch{number}",
                recheck=self._still_needed,
                secrets=ctx.secrets,
                stopped=self._stopped,
            )
        except BaseException:
            for host_plan in batch:
                self.reports.setdefault(
                    host_plan.host,
                    host_report(host_plan, HostOutcome.INTERRUPTED, "the engine stopped mid-step"),
                )
            raise
        now = services.clock()
        succeeded: list[str] = []
        for host_plan in batch:
            host = host_plan.host
            runs = step_runs[host]
            lease = self.keeper.lease(host)  # cool-downs are written fenced, never unfenced
            if (
                runs
                and lease is not None
                and not services.store.mark_acted(ctx.runbook.name, host, now, lease=lease)
            ):
                self.keeper.mark_lost(host, "the store refused the fenced cool-down")
            if host in self.keeper.lost:
                self.reports[host] = self._lost(host, runs)
                continue
            stopped = self.stop() if not runs else None
            if stopped is not None:  # not one step ran: nothing was done to it
                self.reports[host] = host_report(host_plan, HostOutcome.SKIPPED, stopped)
                self.untouched.add(host)
                continue
            failed = next(
                (r for r in runs if r.status is not None and r.status is not HostStatus.OK), None
            )
            if failed is None:
                succeeded.append(host)
                continue
            outcome = (
                HostOutcome.UNREACHABLE
                if failed.status is HostStatus.UNREACHABLE
                else HostOutcome.FAILED
            )
            self.reports[host] = HostReport(
                host=host,
                outcome=outcome,
                reason=f"step {failed.step} {failed.status}: {failed.message}",
                steps=tuple(runs),
            )
        verified = verify_hosts(
            ctx.runbook,
            succeeded,
            ctx.probes,
            ctx.params,
            ctx.host_vars,
            services.executor,
            ctx.request.inventory,
            sleep=services.sleep,
        )
        for host in succeeded:
            result = verified[host]
            self.reports[host] = HostReport(
                host=host,
                outcome=result.outcome,
                reason=result.reason,
                steps=tuple(step_runs[host]),
                evidence_after=result.evidence,
            )
        touched = [h.host for h in batch if h.host not in self.untouched]
        self.attempted += len(touched)
        self.failures += sum(
            1 for host in touched if self.reports[host].outcome is not HostOutcome.FIXED
        )
        services.reporter.advance(len(batch))

    def _record(self, batch: tuple[HostPlan, ...]) -> None:
        """Write the batch's outcomes, each fenced by its device's lease."""
        now = self.services.clock()
        for host_plan in batch:
            host = host_plan.host
            lease = self.keeper.lease(host)
            if lease is None:
                continue  # lost: recorded (unfenced, as interrupted) with the run's other hosts
            if self.services.store.record_host(
                host_record(self.plan.run_id, self.reports[host], now, self.ctx.secrets),
                lease=lease,
            ):
                self.recorded.add(host)
            else:
                self.keeper.mark_lost(host, "the store refused the fenced outcome")
                self.reports[host] = self._lost(host, self.reports[host].steps)


def host_record(run_id: str, report: HostReport, now: datetime, secrets: Secrets) -> HostRecord:
    """What the state store keeps of a host's report (its reason scrubbed)."""
    return HostRecord(
        run_id=run_id,
        host=report.host,
        outcome=report.outcome,
        reason=secrets.scrub(report.reason),
        steps=[s.step for s in report.steps],
        finished_at=now,
    )


def execute_plan(
    plan: Plan,
    ctx: PlanContext,
    services: Services,
    *,
    approve: Callable[[Plan], bool],
) -> RunReport:
    """Act on ``plan`` (apply mode) or stop after it (dry-run); verify; record; report."""
    log = structlog.get_logger()
    store = services.store
    refused = plan.refused is not None
    aborted = False
    reports: dict[str, HostReport] = {}
    acts = plan.mode is Mode.APPLY and bool(plan.acting) and not refused
    if acts and needs_approval(ctx.runbook, plan):
        if approve(plan):
            log.info("approval.granted", approver=ctx.request.user)
        else:
            refused = True
            reason = "approval declined"
            log.warning("approval.declined", approver=ctx.request.user)
            plan = plan.model_copy(update={"hosts": refuse(plan.hosts, reason), "refused": reason})
    if plan.mode is Mode.APPLY and plan.acting and not refused:
        admitted = _admit(plan, ctx, services)
        if admitted is not None:
            refused = True
            plan = plan.model_copy(
                update={"hosts": refuse(plan.hosts, admitted), "refused": admitted}
            )
    recorded: set[str] = set()
    if plan.mode is Mode.APPLY and plan.acting and not refused:
        apply = Apply(plan, ctx, services)
        try:
            aborted = apply.run()
        finally:
            reports.update(apply.reports)
            recorded = apply.recorded
    for host_plan in plan.hosts:
        reports.setdefault(host_plan.host, host_report(host_plan))
    hosts = tuple(reports[h.host] for h in plan.hosts)
    status = run_status(hosts, refused, aborted)
    now = services.clock()
    store.record_hosts(
        [
            host_record(plan.run_id, report, now, ctx.secrets)
            for report in hosts
            if report.host not in recorded
        ]
    )
    summary = dict(Counter(h.outcome.value for h in hosts))
    with audit_unit():  # the event commits with the run's end
        log.info("run.finished", status=status.value, summary=summary)
        final = store.finish_run(plan.run_id, status, summary)
    if final.status is not status:  # marked interrupted meanwhile (its leases expired)
        log.warning("run.status_kept", status=final.status.value, ended=status.value)
        status = final.status
    # What the run shows and keeps (a saved plan, an approval) never holds a secret; the
    # plan's own vars went to the playbooks as they were.
    return ctx.secrets.scrub_model(
        RunReport(plan=plan, status=status, hosts=hosts, finished_at=now)
    )


def _admit(plan: Plan, ctx: PlanContext, services: Services) -> str | None:
    """Admit the plan's hosts under the runbook's fleet-wide blast radius; why not, or None.

    Runs of the same runbook on other controllers count: their admitted hosts and these
    together must stay within the policy (one transaction under a lock in the store).
    """
    runbook = ctx.runbook
    allowed = allowed_hosts(runbook.spec.policy, ctx.targeted)
    acting = [h.host for h in plan.acting]
    admission = services.store.admit_hosts(
        runbook.name,
        plan.run_id,
        acting,
        allowed=allowed,
        ttl=min(services.lease_ttl, runbook.spec.policy.lock_ttl),
    )
    if admission.admitted:
        return None
    reason = admission_refusal(runbook, ctx.targeted, acting, admission.in_flight)
    structlog.get_logger().warning(
        "guard.denied", guard="blast_radius", message=reason, in_flight=list(admission.in_flight)
    )
    return reason


def _recorded_run(
    runbook: Runbook,
    request: RunRequest,
    services: Services,
    body: Callable[[str], RunReport],
    **context: object,
) -> RunReport:
    """Run ``body(run_id)`` inside one run's audit context and state record."""
    params = runbook.param_values(request.overrides)  # a bad -e fails before anything is kept
    run_id = services.new_run_id()
    started = services.clock()
    with audit_context(
        run_id,
        secrets=run_secrets(runbook, params, services.secrets),
        runbook=runbook.name,
        runbook_digest=runbook.digest,
        trigger=request.trigger,
        mode=request.mode.value,
        **context,
    ):
        log = structlog.get_logger()
        with audit_unit():  # the event commits with the run's record
            services.store.start_run(started_run(runbook, request, run_id, params, started))
        try:
            return body(run_id)
        except BaseException as exc:
            status = RunStatus.ERROR if isinstance(exc, Exception) else RunStatus.INTERRUPTED
            with audit_unit():
                log.error(  # noqa: TRY400 - the audit record names the error; no traceback
                    "run.finished", status=status.value, error=f"{type(exc).__name__}: {exc}"
                )
                services.store.finish_run(run_id, status, {})
            raise


def run_runbook(
    runbook: Runbook,
    request: RunRequest,
    services: Services,
    *,
    approve: Callable[[Plan], bool],
    first_probe: PendingProbe | None = None,
) -> RunReport:
    """Plan, then act (or stop, in dry-run), with every stage in the audit log.

    ``first_probe``: the targets and first probe, if the entry point started them.
    """

    def body(run_id: str) -> RunReport:
        plan, ctx = plan_run(runbook, request, services, run_id=run_id, first_probe=first_probe)
        return execute_plan(plan, ctx, services, approve=approve)

    return _recorded_run(runbook, request, services, body)


def apply_saved_plan(
    saved: SavedPlan,
    runbook: Runbook,
    services: Services,
    *,
    user: str,
    trigger: str,
    approve: Callable[[Plan], bool],
) -> RunReport:
    """Apply a reviewed plan: re-probe its hosts, refuse drifted ones, act exactly as reviewed.

    The caller has checked the plan's digest, expiry and runbook (:mod:`engine.planfiles`).
    """
    reviewed = {h.host: h for h in saved.plan.acting}
    withheld = sorted(k for k, v in saved.plan.overrides.items() if v == REDACTED)
    if withheld:
        raise PlanFileError(
            f"the plan was made with secret parameter(s) {', '.join(withheld)} given with -e; "
            "a saved plan never holds secret values, so it cannot be applied as reviewed "
            "(use `remediate run ... -e` instead)"
        )
    overrides = dict(saved.plan.overrides)
    request = RunRequest(
        inventory=Path(saved.plan.inventory),
        limit=saved.plan.limit,
        overrides=overrides,
        mode=Mode.APPLY,
        trigger=trigger,
        user=user,
        hosts=tuple(reviewed),
    )

    def body(run_id: str) -> RunReport:
        log = structlog.get_logger()
        if saved.plan.refused or not reviewed:
            why = saved.plan.refused or "the reviewed plan acts on no host"
            raise PlanFileError(f"nothing to apply: {why}")
        fresh, ctx = plan_run(
            runbook, request, services, run_id=run_id, targeted=len(saved.plan.hosts)
        )
        hosts: list[HostPlan] = []
        for host in fresh.hosts:
            # The reviewed plan holds [REDACTED] where a secret was: compare like with like.
            reason = drift_reason(reviewed[host.host], ctx.secrets.scrub_model(host))
            if reason is None:
                hosts.append(host)
                continue
            log.warning("plan.drifted", host=host.host, reason=reason)
            hosts.append(
                host.model_copy(
                    update={
                        "outcome": HostOutcome.DRIFTED,
                        "reason": f"drifted: {reason}",
                        "steps": (),
                    }
                )
            )
        for name in reviewed.keys() - {h.host for h in fresh.hosts}:
            log.warning("plan.drifted", host=name, reason="no longer in the inventory")
            hosts.append(
                reviewed[name].model_copy(
                    update={
                        "outcome": HostOutcome.DRIFTED,
                        "reason": "drifted: no longer in the inventory",
                        "steps": (),
                    }
                )
            )
        plan = fresh.model_copy(update={"hosts": tuple(hosts)})
        return execute_plan(plan, ctx, services, approve=approve)

    return _recorded_run(
        runbook,
        request,
        services,
        body,
        plan_digest=saved.digest,
        plan_run_id=saved.plan.run_id,
    )
