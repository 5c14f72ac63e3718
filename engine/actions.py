"""Act: run the planned steps' playbooks through the executor, one batch of hosts at a time.

Each step's playbook runs limited to the batch's hosts that planned it and have not failed a
step before.  Vars go to the executor as extra vars (data, never a command line); hosts whose
rendered vars differ run in separate invocations so nobody gets another host's items.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict

from engine.executors.base import Executor, HostStatus, PlaybookRequest
from engine.plans import HostPlan, PlannedStep, playbook_path
from engine.redaction import NO_SECRETS, Secrets
from engine.runbooks import Runbook


class StepRun(BaseModel):
    """One step on one host, as it ran."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: str
    status: HostStatus | None  # None: skipped, no longer needed when probed again
    changed: bool = False
    message: str = ""


def _group_key(step: PlannedStep) -> str:
    return json.dumps({"vars": step.vars, "items": step.items}, sort_keys=True, default=str)


def run_steps(
    runbook: Runbook,
    batch: Sequence[HostPlan],
    executor: Executor,
    inventory: Path,
    *,
    run_id: str,
    artifacts_dir: Path,
    label: str,
    recheck: Callable[[Sequence[str], str], set[str]] | None = None,
    secrets: Secrets = NO_SECRETS,
    stopped: Callable[[], AbstractSet[str]] = frozenset,
) -> dict[str, list[StepRun]]:
    """Run every planned step of ``batch`` in runbook order; a host stops at its first failure.

    For steps marked ``recheck``, ``recheck(hosts, step_id)`` probes again and returns the
    hosts that still need the step; the others skip it.  Hosts in ``stopped()`` (asked
    before every step: their lease was lost) get no further step.  ``secrets`` go to the
    executor, which scrubs them from what the playbooks leave.
    """
    log = structlog.get_logger()
    runs: dict[str, list[StepRun]] = {h.host: [] for h in batch}
    failed: set[str] = set()
    for spec_step in runbook.spec.steps:
        failed |= stopped()
        due = {
            host_plan.host: step
            for host_plan in batch
            if host_plan.host not in failed
            for step in host_plan.steps
            if step.id == spec_step.id
        }
        if spec_step.recheck and recheck is not None and due:
            still = recheck(list(due), spec_step.id)
            for host in [h for h in due if h not in still]:
                del due[host]
                runs[host].append(
                    StepRun(step=spec_step.id, status=None, message="no longer needed (recheck)")
                )
                log.info("step.skipped", host=host, step=spec_step.id, reason="recheck")
        groups: dict[str, list[tuple[str, PlannedStep]]] = {}
        for host, step in due.items():
            groups.setdefault(_group_key(step), []).append((host, step))
        for index, members in enumerate(groups.values()):
            hosts = tuple(host for host, _ in members)
            step = members[0][1]
            extravars = {
                **step.vars,
                "remediate_items": step.items or [],
                "remediate_run_id": run_id,
                "remediate_step": step.id,
            }
            for host in hosts:
                log.info("step.started", host=host, step=step.id, playbook=step.playbook)
            results = executor.run_playbook(
                inventory,
                PlaybookRequest(
                    playbook=playbook_path(runbook, step),
                    hosts=hosts,
                    extravars=extravars,
                    label=f"{label}-{step.id}-{index}",
                    secret_values=secrets.values,
                ),
                artifacts_dir=artifacts_dir,
            )
            for host in hosts:
                result = results[host]
                failing = next(
                    (t for t in result.tasks if t.status not in {HostStatus.OK, None}), None
                )
                detail = f"task {failing.name!r}: {failing.message}" if failing else ""
                message = result.message or detail
                run = StepRun(
                    step=step.id, status=result.status, changed=result.changed, message=message
                )
                runs[host].append(run)
                if result.status is not HostStatus.OK:
                    failed.add(host)
                log.info(
                    "step.finished",
                    host=host,
                    step=step.id,
                    status=result.status.value,
                    changed=run.changed,
                    message=run.message,
                )
    return runs
