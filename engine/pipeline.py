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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.actions import StepRun, run_steps
from engine.audit import REDACTED, audit_context
from engine.drift import drift_reason
from engine.errors import ExecutorError, PlanFileError
from engine.executors.base import Executor, HostStatus, SelectingExecutor
from engine.expressions import EvaluationError
from engine.guards import blast_radius_refusal, context_for, evaluate_host
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
from engine.runbooks import Runbook
from engine.runbooks.spec import Approval
from engine.state import HostRecord, RunRecord, StateStore
from engine.targets import TargetSet, resolve_targets, runbook_selection, target_set
from engine.verification import verify_hosts


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

    @property
    def host_vars(self) -> dict[str, Mapping[str, Any]]:
        """Inventory vars by host name."""
        return {h.name: h.vars for h in self.targets.hosts}


def _secret_keys(runbook: Runbook) -> list[str]:
    return sorted(runbook.secret_params)


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
    host_plans: list[HostPlan] = []
    for host in targets.hosts:
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
        host_plans.append(host_plan)
        services.reporter.advance()
    plans = tuple(host_plans)
    acting = sum(1 for h in plans if h.outcome is HostOutcome.PLANNED)
    refused = blast_radius_refusal(runbook, targeted or len(targets.hosts), acting)
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
    return plan, PlanContext(runbook, request, targets, params, probes)


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


def _status(hosts: tuple[HostReport, ...], refused: bool, aborted: bool) -> RunStatus:
    if aborted:
        return RunStatus.ABORTED
    if refused:
        return RunStatus.REFUSED
    if any(h.outcome in BAD_OUTCOMES for h in hosts):
        return RunStatus.DEGRADED
    return RunStatus.SUCCEEDED


def _from_plan(
    host_plan: HostPlan, outcome: HostOutcome | None = None, reason: str = ""
) -> HostReport:
    return HostReport(
        host=host_plan.host,
        outcome=outcome or host_plan.outcome,
        reason=reason or host_plan.reason,
    )


def _batches(hosts: tuple[HostPlan, ...], size: int) -> list[tuple[HostPlan, ...]]:
    return [hosts[i : i + size] for i in range(0, len(hosts), size)]


class _Apply:
    """One apply over a plan: batches, locks, steps, verify, failure budget."""

    def __init__(self, plan: Plan, ctx: PlanContext, services: Services) -> None:
        self.plan, self.ctx, self.services = plan, ctx, services
        self.reports: dict[str, HostReport] = {}
        self.failures = 0
        self.attempted = 0
        self.log = structlog.get_logger()

    def run(self) -> bool:
        """Act on every batch; return whether the failure budget stopped the run."""
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
                        self.reports[host_plan.host] = _from_plan(
                            host_plan, HostOutcome.SKIPPED, reason
                        )
                return True
            self._batch(number, batch)
        return False

    def _batch(self, number: int, batch: tuple[HostPlan, ...]) -> None:
        store, runbook = self.services.store, self.ctx.runbook
        locked: list[HostPlan] = []
        for host_plan in batch:
            if store.try_lock(host_plan.host, self.plan.run_id, runbook.spec.policy.lock_ttl):
                locked.append(host_plan)
            else:
                holder = store.lock_holder(host_plan.host)
                reason = f"device lock held by run {holder.run_id if holder else 'another run'}"
                self.log.info(
                    "guard.denied", host=host_plan.host, guard="device_lock", message=reason
                )
                self.reports[host_plan.host] = _from_plan(host_plan, HostOutcome.SKIPPED, reason)
        try:
            self._act(number, tuple(locked))
        finally:
            for host_plan in locked:
                store.release_lock(host_plan.host, self.plan.run_id)

    def _still_needed(self, hosts: Sequence[str], step_id: str) -> set[str]:
        """Probe ``hosts`` again: those where the symptom and the step's ``when`` still hold."""
        ctx = self.ctx
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
            )
        except BaseException:
            for host_plan in batch:
                self.reports.setdefault(
                    host_plan.host,
                    _from_plan(host_plan, HostOutcome.INTERRUPTED, "the engine stopped mid-step"),
                )
            raise
        now = services.clock()
        succeeded: list[str] = []
        for host_plan in batch:
            runs = step_runs[host_plan.host]
            if runs:
                services.store.mark_acted(ctx.runbook.name, host_plan.host, now)
            failed = next(
                (r for r in runs if r.status is not None and r.status is not HostStatus.OK), None
            )
            if failed is None:
                succeeded.append(host_plan.host)
                continue
            outcome = (
                HostOutcome.UNREACHABLE
                if failed.status is HostStatus.UNREACHABLE
                else HostOutcome.FAILED
            )
            self.reports[host_plan.host] = HostReport(
                host=host_plan.host,
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
        self.attempted += len(batch)
        self.failures += sum(
            1 for h in batch if self.reports[h.host].outcome is not HostOutcome.FIXED
        )
        services.reporter.advance(len(batch))


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
        apply = _Apply(plan, ctx, services)
        try:
            aborted = apply.run()
        finally:
            reports.update(apply.reports)
    for host_plan in plan.hosts:
        reports.setdefault(host_plan.host, _from_plan(host_plan))
    hosts = tuple(reports[h.host] for h in plan.hosts)
    status = _status(hosts, refused, aborted)
    now = services.clock()
    store.record_hosts(
        [
            HostRecord(
                run_id=plan.run_id,
                host=report.host,
                outcome=report.outcome,
                reason=report.reason,
                steps=[s.step for s in report.steps],
                finished_at=now,
            )
            for report in hosts
        ]
    )
    summary = dict(Counter(h.outcome.value for h in hosts))
    store.finish_run(plan.run_id, status, summary)
    log.info("run.finished", status=status.value, summary=summary)
    return RunReport(plan=plan, status=status, hosts=hosts, finished_at=now)


def _recorded_run(
    runbook: Runbook,
    request: RunRequest,
    services: Services,
    body: Callable[[str], RunReport],
    **context: object,
) -> RunReport:
    """Run ``body(run_id)`` inside one run's audit context and state record."""
    runbook.param_values(request.overrides)  # a bad -e fails before anything is recorded
    run_id = services.new_run_id()
    started = services.clock()
    with audit_context(
        run_id,
        runbook=runbook.name,
        runbook_digest=runbook.digest,
        trigger=request.trigger,
        mode=request.mode.value,
        **context,
    ):
        log = structlog.get_logger()
        log.info(
            "run.started",
            user=request.user,
            inventory=str(request.inventory),
            limit=request.limit,
            params=runbook.param_values(request.overrides),
            secret_keys=_secret_keys(runbook),
        )
        services.store.start_run(
            RunRecord(
                run_id=run_id,
                runbook=runbook.name,
                runbook_digest=runbook.digest,
                mode=request.mode,
                trigger=request.trigger,
                started_at=started,
            )
        )
        try:
            return body(run_id)
        except BaseException as exc:
            status = RunStatus.ERROR if isinstance(exc, Exception) else RunStatus.INTERRUPTED
            services.store.finish_run(run_id, status, {})
            log.error(  # noqa: TRY400 - the audit record names the error; no traceback in it
                "run.finished", status=status.value, error=f"{type(exc).__name__}: {exc}"
            )
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
    overrides = {k: v for k, v in saved.plan.overrides.items() if v != REDACTED}
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
            reason = drift_reason(reviewed[host.host], host)
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
