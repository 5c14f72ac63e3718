"""Plan: for each host that has the symptom and passed its guards, the steps whose ``when`` holds.

The plan is a value: rendered as a Rich table for people and as JSON for scripts, and it is
exactly what an apply acts on.  It comes from the read-only probes alone (Ansible's check mode
skips ``raw`` tasks, so it could prove nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.expressions import EvaluationError, Expression, Template
from engine.guards import Decision, GuardVerdict, context_for
from engine.models import FrozenModel
from engine.outcomes import HostOutcome, Mode
from engine.probes import HostProbe
from engine.redaction import REDACTED
from engine.runbooks import Runbook


class PlannedStep(FrozenModel):
    """One step as it will run on one host."""

    id: str
    playbook: str
    plan: str  # the rendered plan line
    vars: dict[str, Any] = Field(default_factory=dict)
    items: list[Any] | None = None
    destructive: bool = False


class HostPlan(FrozenModel):
    """Everything decided about one host, and the evidence it rested on."""

    host: str
    outcome: HostOutcome
    reason: str = ""
    symptom: bool | None = None
    guards: tuple[GuardVerdict, ...] = ()
    evidence: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[PlannedStep, ...] = ()


class RunbookRef(FrozenModel):
    """Which runbook, exactly, a plan or run came from."""

    name: str
    version: str
    digest: str
    path: str


class Plan(FrozenModel):
    """The whole plan of one run."""

    run_id: str
    runbook: RunbookRef
    mode: Mode
    created_at: datetime
    created_by: str
    trigger: str
    inventory: str
    pattern: str
    limit: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # secret values redacted
    overrides: dict[str, str] = Field(default_factory=dict)  # the -e values, secrets redacted
    hosts: tuple[HostPlan, ...] = ()
    refused: str | None = None  # why the whole run is refused (blast radius, approval)

    @property
    def acting(self) -> tuple[HostPlan, ...]:
        """Hosts with steps to run."""
        return tuple(h for h in self.hosts if h.outcome is HostOutcome.PLANNED)

    @property
    def destructive(self) -> bool:
        """Whether any planned step is destructive."""
        return any(s.destructive for h in self.acting for s in h.steps)


def render_vars(value: Any, context: Mapping[str, Any]) -> Any:
    """Render the Template leaves of a step's compiled vars; other values pass through."""
    if isinstance(value, Template):
        return value.render(context)
    if isinstance(value, dict):
        return {k: render_vars(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_vars(v, context) for v in value]
    return value


def plan_host(
    runbook: Runbook,
    decision: Decision,
    probe: HostProbe,
    params: Mapping[str, Any],
    host_vars: Mapping[str, Any],
) -> HostPlan:
    """The plan of one host: its decision, evidence and (when it proceeds) its steps."""
    base = HostPlan(
        host=decision.host,
        outcome=decision.outcome or HostOutcome.PLANNED,
        reason=decision.reason,
        symptom=decision.symptom,
        guards=decision.guards,
        evidence=probe.evidence(),
    )
    if decision.outcome is not None:
        return base
    context = context_for(probe, params, host_vars)
    steps: list[PlannedStep] = []
    try:
        for step in runbook.spec.steps:
            compiled = runbook.steps[step.id]
            if not compiled.when.test(context):
                continue
            items = _items(step.id, compiled.items, context)
            step_context = {**context, "items": items or []}
            steps.append(
                PlannedStep(
                    id=step.id,
                    playbook=step.playbook,
                    plan=compiled.plan.render(step_context),
                    vars=render_vars(compiled.vars, step_context),
                    items=items,
                    destructive=step.destructive,
                )
            )
    except EvaluationError as exc:
        return base.model_copy(update={"outcome": HostOutcome.ERROR, "reason": f"planning: {exc}"})
    if not steps:
        reason = "symptom present, but no step's `when` holds"
        return base.model_copy(update={"outcome": HostOutcome.NOTHING_TO_DO, "reason": reason})
    return base.model_copy(update={"steps": tuple(steps)})


def _items(
    step_id: str, expression: Expression | None, context: Mapping[str, Any]
) -> list[Any] | None:
    """The exact items a step acts on, when it declares them."""
    if expression is None:
        return None
    value = expression.evaluate(context)
    if not isinstance(value, list | tuple):
        raise EvaluationError(f"step {step_id}: items must be a list, got {value!r}")
    return list(value)


def refuse(plan_hosts: tuple[HostPlan, ...], reason: str) -> tuple[HostPlan, ...]:
    """Mark every acting host refused (the whole run is refused)."""
    return tuple(
        h.model_copy(update={"outcome": HostOutcome.REFUSED, "reason": reason})
        if h.outcome is HostOutcome.PLANNED
        else h
        for h in plan_hosts
    )


def runbook_ref(runbook: Runbook) -> RunbookRef:
    """The reference a plan keeps to its runbook."""
    return RunbookRef(
        name=runbook.name,
        version=runbook.spec.metadata.version,
        digest=runbook.digest,
        path=str(runbook.path),
    )


def shown_params(runbook: Runbook, params: Mapping[str, Any]) -> dict[str, Any]:
    """Params (or overrides) as a plan shows them: secret ones redacted."""
    secret = runbook.secret_params
    return {k: REDACTED if k in secret else v for k, v in params.items()}


def playbook_path(runbook: Runbook, step: PlannedStep) -> Path:
    """The absolute playbook path of a planned step."""
    return (runbook.playbooks_dir / step.playbook).resolve()
