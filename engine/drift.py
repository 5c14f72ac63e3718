"""Drift: whether a device changed, in ways that matter, since its plan was reviewed.

What matters is what the apply would do: whether the host still needs action (symptom present,
every guard passes) and exactly which steps, with which vars and which items.  Evidence that
changed without changing any of that (a free-space figure moving by a percent) is not drift.
"""

from __future__ import annotations

from engine.outcomes import HostOutcome
from engine.plans import HostPlan


def drift_reason(reviewed: HostPlan, fresh: HostPlan) -> str | None:
    """Why ``fresh`` differs from the ``reviewed`` plan of a host, or ``None`` if it does not."""
    if fresh.outcome is not HostOutcome.PLANNED:
        why = fresh.reason or fresh.outcome.value
        return f"no longer planned: now {fresh.outcome.value} ({why})"
    planned = [s.id for s in reviewed.steps]
    now = [s.id for s in fresh.steps]
    if planned != now:
        return f"steps changed: reviewed {planned}, now {now}"
    for before, after in zip(reviewed.steps, fresh.steps, strict=True):
        if before.playbook != after.playbook:
            return f"step {before.id}: playbook changed ({before.playbook} → {after.playbook})"
        if before.items != after.items:
            gone = [i for i in before.items or [] if i not in (after.items or [])]
            new = [i for i in after.items or [] if i not in (before.items or [])]
            return f"step {before.id}: items changed (no longer: {gone}; new: {new})"
        if before.vars != after.vars:
            return f"step {before.id}: vars changed ({before.vars} → {after.vars})"
    return None
