"""Evaluate: per host, the symptom (does the runbook apply?), then each guard in order.

The first guard that blocks decides: the host is skipped with that guard's id and message.
Built-in guards: ``cooldown`` (from the state store), ``lock`` (another run holds the device)
and ``blast_radius`` (run-wide: refuse the whole run rather than act on more hosts than the
policy allows).  The device lock and the blast radius are enforced even when a runbook does not
list them; listing them only places them and words their message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.durations import format_duration
from engine.expressions import EvaluationError
from engine.models import FrozenModel
from engine.outcomes import HostOutcome
from engine.probes import HostProbe, ProbeStatus
from engine.runbooks import Runbook
from engine.runbooks.spec import BlastRadiusGuard, CooldownGuard, ExprGuard, LockGuard, Policy
from engine.state import StateStore


class GuardVerdict(FrozenModel):
    """One guard's verdict on one host."""

    id: str
    kind: str
    passed: bool
    message: str = ""


class Decision(FrozenModel):
    """What evaluation decided for one host.

    ``outcome`` is ``None`` when the host has the symptom and passed every guard: it goes on
    to planning.
    """

    host: str
    outcome: HostOutcome | None
    reason: str = ""
    symptom: bool | None = None
    guards: tuple[GuardVerdict, ...] = ()

    @property
    def proceeds(self) -> bool:
        """Whether the host goes on to planning."""
        return self.outcome is None


def context_for(
    probe: HostProbe, params: Mapping[str, Any], host_vars: Mapping[str, Any]
) -> dict[str, Any]:
    """The expression context of one host."""
    return {
        "checks": probe.values(),
        "params": dict(params),
        "host": {"name": probe.host, "vars": dict(host_vars)},
    }


def _verdict(
    guard: object,
    runbook: Runbook,
    context: Mapping[str, Any],
    store: StateStore,
    now: datetime,
    own_run: str | None = None,
) -> GuardVerdict:
    if isinstance(guard, ExprGuard):
        passed = runbook.guards[guard.id].test(context)
        return GuardVerdict(id=guard.id, kind="expr", passed=passed, message=guard.message)
    host = str(context["host"]["name"])
    if isinstance(guard, CooldownGuard):
        last = store.last_acted(runbook.name, host)
        if last is not None and now - last < guard.cooldown:
            ago = format_duration(now - last)
            message = (
                f"{guard.message} (last acted {ago} ago; cool-down "
                f"{format_duration(guard.cooldown)})"
            )
            return GuardVerdict(id=guard.id, kind="cooldown", passed=False, message=message)
        return GuardVerdict(id=guard.id, kind="cooldown", passed=True)
    if isinstance(guard, LockGuard):
        holder = store.lock_holder(host)  # a live lease, on the store's clock
        if holder is not None and holder.run_id != own_run:
            message = f"{guard.message} (run {holder.run_id})"
            return GuardVerdict(id=guard.id, kind="lock", passed=False, message=message)
        return GuardVerdict(id=guard.id, kind="lock", passed=True)
    # Blast radius is run-wide: judged in blast_radius_refusal once every host is decided.
    assert isinstance(guard, BlastRadiusGuard)  # noqa: S101 - the Guard union is exhaustive
    return GuardVerdict(id=guard.id, kind="blast_radius", passed=True)


def evaluate_host(
    runbook: Runbook,
    probe: HostProbe,
    params: Mapping[str, Any],
    host_vars: Mapping[str, Any],
    store: StateStore,
    now: datetime,
    *,
    own_run: str | None = None,
) -> Decision:
    """Decide one host: unreachable, error, healthy, skipped by a guard, or on to planning.

    ``own_run``: a run deciding again while it holds the device's lease (an act shard,
    right before acting): its own lease does not block it.
    """
    host = probe.host
    if probe.status is ProbeStatus.UNREACHABLE:
        return Decision(host=host, outcome=HostOutcome.UNREACHABLE, reason=probe.message)
    if probe.status is ProbeStatus.ERROR:
        return Decision(host=host, outcome=HostOutcome.ERROR, reason=probe.message)
    context = context_for(probe, params, host_vars)
    try:
        symptom = runbook.symptom.test(context)
    except EvaluationError as exc:
        return Decision(host=host, outcome=HostOutcome.ERROR, reason=f"symptom: {exc}")
    if not symptom:
        return Decision(host=host, outcome=HostOutcome.HEALTHY, symptom=False, reason="no symptom")
    verdicts: list[GuardVerdict] = []
    guards = list(runbook.spec.guards)
    if not any(isinstance(g, LockGuard) for g in guards):
        guards.append(LockGuard(id="device_lock", lock=True))
    for guard in guards:
        try:
            verdict = _verdict(guard, runbook, context, store, now, own_run)
        except EvaluationError as exc:
            return Decision(
                host=host,
                outcome=HostOutcome.ERROR,
                symptom=True,
                guards=tuple(verdicts),
                reason=f"guard {guard.id}: {exc}",
            )
        verdicts.append(verdict)
        if not verdict.passed:
            return Decision(
                host=host,
                outcome=HostOutcome.SKIPPED,
                symptom=True,
                guards=tuple(verdicts),
                reason=f"guard {verdict.id}: {verdict.message}",
            )
    return Decision(host=host, outcome=None, symptom=True, guards=tuple(verdicts))


def allowed_hosts(policy: Policy, targeted: int) -> int:
    """How many hosts a run may act on: ``max_hosts_pct`` of the targeted, at least one."""
    allowed = max(1, math.floor(targeted * policy.max_hosts_pct / 100))
    return min(allowed, policy.max_hosts) if policy.max_hosts else allowed


def blast_radius_refusal(runbook: Runbook, targeted: int, acting: int) -> str | None:
    """Why the whole run is refused for its blast radius, or ``None`` when within policy."""
    allowed = allowed_hosts(runbook.spec.policy, targeted)
    if acting <= allowed:
        return None
    declared = next(
        (g for g in runbook.spec.guards if isinstance(g, BlastRadiusGuard)),
        BlastRadiusGuard(id="blast_radius", blast_radius=True),
    )
    policy = runbook.spec.policy
    limits = f"max_hosts_pct {policy.max_hosts_pct}"
    limits += f", max_hosts {policy.max_hosts}" if policy.max_hosts else ""
    return (
        f"guard {declared.id}: {declared.message}: {acting} hosts need action, "
        f"the policy allows {allowed} of {targeted} targeted ({limits})"
    )


#: Hosts of other runs a refusal names (the rest are counted).
_SHOWN = 5


def admission_refusal(
    runbook: Runbook, targeted: int, acting: Sequence[str], in_flight: Sequence[str]
) -> str:
    """Why a run is refused when other runs of its runbook hold too much of the fleet."""
    allowed = allowed_hosts(runbook.spec.policy, targeted)
    together = len(set(acting) | set(in_flight))
    shown = ", ".join(sorted(in_flight)[:_SHOWN]) + (", ..." if len(in_flight) > _SHOWN else "")
    return (
        f"guard blast_radius: {len(acting)} hosts need action while other runs of "
        f"{runbook.name} act on {len(in_flight)} ({shown}): {together} at once, "
        f"the policy allows {allowed} of {targeted} targeted"
    )
