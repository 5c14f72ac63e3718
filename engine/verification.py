"""Verify: re-probe the hosts that were acted on and evaluate the runbook's ``verify``.

``checks`` in the expression are the fresh values; ``before.<check>`` the values the plan was
made from.  A runbook can ask for several tries with a delay (an engine takes a while to come
back); a host is ``fixed`` at the first try that holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.executors.base import Executor
from engine.expressions import EvaluationError
from engine.guards import context_for
from engine.outcomes import HostOutcome
from engine.probes import HostProbe, ProbeStatus, run_probes
from engine.runbooks import Runbook


class VerifyResult(BaseModel):
    """How one host ended after its steps ran."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    outcome: HostOutcome
    reason: str = ""
    tries: int = 0
    evidence: dict[str, Any] = Field(default_factory=dict)


def _judge(
    runbook: Runbook,
    probe: HostProbe,
    before: HostProbe,
    params: Mapping[str, Any],
    host_vars: Mapping[str, Any],
) -> tuple[HostOutcome, str]:
    if probe.status is ProbeStatus.UNREACHABLE:
        return HostOutcome.UNREACHABLE, f"after the steps: {probe.message}"
    if probe.status is ProbeStatus.ERROR:
        return HostOutcome.ERROR, f"after the steps: {probe.message}"
    context = {**context_for(probe, params, host_vars), "before": before.values()}
    try:
        holds = runbook.verify.test(context)
    except EvaluationError as exc:
        return HostOutcome.ERROR, f"verify: {exc}"
    if holds:
        return HostOutcome.FIXED, "verify holds"
    reason = f"verify does not hold: {runbook.verify.source}"
    if runbook.explain is not None:
        try:
            reason += f"; {runbook.explain.render(context)}"
        except EvaluationError as exc:
            reason += f"; (explain failed: {exc})"
    return HostOutcome.NOT_FIXED, reason


def verify_hosts(
    runbook: Runbook,
    hosts: Sequence[str],
    before: Mapping[str, HostProbe],
    params: Mapping[str, Any],
    host_vars: Mapping[str, Mapping[str, Any]],
    executor: Executor,
    inventory: Path,
    *,
    sleep: Callable[[float], None],
) -> dict[str, VerifyResult]:
    """Re-probe ``hosts`` up to ``verify.retries`` times; a result for every host."""
    spec = runbook.spec.verify
    results: dict[str, VerifyResult] = {}
    pending = list(hosts)
    for attempt in range(1, spec.retries + 1):
        if not pending:
            break
        if attempt > 1:
            sleep(spec.delay.total_seconds())
        probes = run_probes(executor, inventory, pending, runbook.spec.checks, params)
        still: list[str] = []
        for host in pending:
            probe = probes[host]
            outcome, reason = _judge(runbook, probe, before[host], params, host_vars[host])
            results[host] = VerifyResult(
                host=host, outcome=outcome, reason=reason, tries=attempt, evidence=probe.evidence()
            )
            if outcome is not HostOutcome.FIXED:
                still.append(host)
        pending = still
    log = structlog.get_logger()
    for host in hosts:
        result = results[host]
        log.info(
            "verify.finished",
            host=host,
            outcome=result.outcome.value,
            reason=result.reason,
            tries=result.tries,
            evidence=result.evidence,
        )
    return results
