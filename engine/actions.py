"""Act: run the planned steps' playbooks through the executor, one batch of hosts at a time.

Each step's playbook runs limited to the batch's hosts that planned it and have not failed a
step before.  Vars go to the executor as extra vars (data, never a command line); hosts whose
rendered vars differ run in separate invocations so nobody gets another host's items.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict

from engine.executors.base import Executor, HostStatus, PlaybookRequest
from engine.plans import HostPlan, PlannedStep, playbook_path
from engine.runbooks import Runbook


class StepRun(BaseModel):
    """One step on one host, as it ran."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: str
    status: HostStatus
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
) -> dict[str, list[StepRun]]:
    """Run every planned step of ``batch`` in runbook order; a host stops at its first failure."""
    log = structlog.get_logger()
    runs: dict[str, list[StepRun]] = {h.host: [] for h in batch}
    failed: set[str] = set()
    for spec_step in runbook.spec.steps:
        groups: dict[str, list[tuple[str, PlannedStep]]] = {}
        for host_plan in batch:
            if host_plan.host in failed:
                continue
            step = next((s for s in host_plan.steps if s.id == spec_step.id), None)
            if step is not None:
                groups.setdefault(_group_key(step), []).append((host_plan.host, step))
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
                ),
                artifacts_dir=artifacts_dir,
            )
            for host in hosts:
                result = results[host]
                failing = next((t for t in result.tasks if t.status is not HostStatus.OK), None)
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
                    status=run.status.value,
                    changed=run.changed,
                    message=run.message,
                )
    return runs
