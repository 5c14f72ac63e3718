"""The vocabulary of outcomes shared by every stage, the state store and the audit log."""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How a run may touch devices."""

    DRY_RUN = "dry-run"
    APPLY = "apply"


class HostOutcome(StrEnum):
    """Where one host ended in one run.

    Dry runs end hosts in ``planned``; apply runs in ``fixed``/``not_fixed``/``failed``.
    """

    HEALTHY = "healthy"  # no symptom: nothing to do
    SKIPPED = "skipped"  # a guard blocked; the reason says which
    PLANNED = "planned"  # dry-run: steps would run
    NOTHING_TO_DO = "nothing_to_do"  # symptom present but no step's `when` holds
    FIXED = "fixed"  # steps ran and verify holds on fresh probes
    NOT_FIXED = "not_fixed"  # steps ran, verify does not hold
    FAILED = "failed"  # a step failed
    UNREACHABLE = "unreachable"  # the host could not be reached
    ERROR = "error"  # a probe or expression needed to decide failed
    REFUSED = "refused"  # the whole run was refused (blast radius, approval)
    INTERRUPTED = "interrupted"  # the engine stopped while acting on the host
    DRIFTED = "drifted"  # applying a saved plan: the device changed since the review


class RunStatus(StrEnum):
    """How a whole run ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every host fixed, healthy, planned or skipped
    DEGRADED = "degraded"  # something not fixed, failed, unreachable or errored
    REFUSED = "refused"  # refused before acting (blast radius, declined approval)
    ABORTED = "aborted"  # stopped because failures exceeded max_fail_pct
    INTERRUPTED = "interrupted"  # the process died or was stopped mid-run
    ERROR = "error"  # the engine could not complete the run (bad inventory, tool failure)


#: Host outcomes that make a run (and the CLI exit code) unsuccessful.
BAD_OUTCOMES = frozenset(
    {
        HostOutcome.NOT_FIXED,
        HostOutcome.FAILED,
        HostOutcome.UNREACHABLE,
        HostOutcome.ERROR,
        HostOutcome.REFUSED,
        HostOutcome.INTERRUPTED,
        HostOutcome.DRIFTED,
    }
)
