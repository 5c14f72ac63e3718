"""The invariants every distributed scenario ends with (issue #16), read from what was left.

* At most one effective fix per host: the simulated devices' own logs (every scenario's runs
  fall within the fleet runbook's 10-minute cool-down, so one per run means one in all).
* Hosts acted on by a run (``step.started`` in the audit chain) within its blast radius:
  ``max_hosts_pct`` (and ``max_hosts``) of the hosts it targeted, at least one.
* No host acted on under another run's lease (the last lease taken on it before the step
  is the acting run's own) nor, by another run of the runbook, within its cool-down.
* The audit chain verifies (``remediate audit verify``) and its records are contiguous.
* Each host of the run recorded once, and one ``run.finished``.
* One run per alert firing (:func:`check_alert_runs`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from engine.runbooks import load_runbooks
from engine.runbooks.spec import CooldownGuard, Policy
from tests.support.workers import Cluster


def running_shard(cluster: Cluster, kind: str, run_id: str = "") -> tuple[int, int] | None:
    """A running shard of ``kind`` (of ``run_id``, else any run) and its worker's pid."""
    rows = cluster.query(
        "SELECT shard, worker FROM dist_shards WHERE kind = %s AND state = 'running'"
        " AND (%s = '' OR run_id = %s)",
        (kind, run_id, run_id),
    )
    for shard, worker in rows:
        if worker:
            return shard, int(worker.rpartition(":")[2])
    return None


def acted(cluster: Cluster) -> dict[str, set[str]]:
    """The runs that started a step on each host, from the audit chain."""
    found: dict[str, set[str]] = {}
    for record in cluster.audit():
        if record["event"] == "step.started":
            found.setdefault(record["host"], set()).add(record["run_id"])
    return found


def check_invariants(cluster: Cluster, run_id: str, hosts: int | None = None) -> None:
    """Every invariant, for ``run_id`` (each host, or ``hosts`` of them, recorded once)."""
    check_runs(cluster, {run_id: hosts})


def check_runs(cluster: Cluster, runs: Mapping[str, int | None]) -> None:
    """Every invariant, for each run: run id -> hosts recorded (None: each of the fleet)."""
    fleet = cluster.fleet
    for name in fleet.names:
        assert fleet.state(name) in {"ok", "fixed", "sick"}
        assert fleet.effective_fixes(name) <= 1, f"{name}: fixed {fleet.effective_fixes(name)}x"
    verified = cluster.remediate("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    records = _contiguous_chain(cluster)
    runbooks = {r.name: r for r in load_runbooks([fleet.project / "runbooks"])}
    names = dict(cluster.query("SELECT run_id, runbook FROM runs"))
    for run_id, hosts in runs.items():
        recorded = cluster.query("SELECT count(*) FROM host_results WHERE run_id = %s", (run_id,))
        assert recorded[0][0] == (len(fleet.names) if hosts is None else hosts), run_id
        finished = [
            r for r in records if r.get("run_id") == run_id and r["event"] == "run.finished"
        ]
        assert len(finished) == 1, run_id
        _check_blast_radius(cluster, run_id, runbooks[names[run_id]].spec.policy, records)
    cooldowns = {
        name: guard.cooldown
        for name, runbook in runbooks.items()
        for guard in runbook.spec.guards
        if isinstance(guard, CooldownGuard)
    }
    _check_leases_and_cooldowns(records, names, cooldowns)


def check_alert_runs(cluster: Cluster, fingerprints: Iterable[str]) -> dict[str, str]:
    """One run per alert firing: each fingerprint's queue items ran once; fingerprint -> run."""
    runs: dict[str, str] = {}
    for fingerprint in fingerprints:
        rows = cluster.query(
            "SELECT DISTINCT q.run_id FROM queue_firings f"
            " JOIN alert_queue q USING (item_id) WHERE f.fingerprint = %s",
            (fingerprint,),
        )
        ran = [run for (run,) in rows if run]
        assert len(ran) == 1, f"firing {fingerprint}: runs {ran}"
        runs[fingerprint] = ran[0]
    return runs


def _contiguous_chain(cluster: Cluster) -> list[dict[str, Any]]:
    """The chain's records, checked to be numbered 1, 2, ... with no gap."""
    rows = cluster.query("SELECT seq, record FROM audit_chain ORDER BY seq")
    records = [json.loads(r) if isinstance(r, str) else r for _, r in rows]
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert [r["seq"] for r in records] == list(range(1, len(rows) + 1))
    return records


def _check_blast_radius(
    cluster: Cluster, run_id: str, policy: Policy, records: list[dict[str, Any]]
) -> None:
    """The run started steps on no more hosts than its policy lets it of those it targeted."""
    ((targeted,),) = cluster.query("SELECT targeted FROM dist_runs WHERE run_id = %s", (run_id,))
    allowed = max(1, math.floor(targeted * policy.max_hosts_pct / 100))
    if policy.max_hosts is not None:
        allowed = min(allowed, policy.max_hosts)
    hosts = {r["host"] for r in records if r["event"] == "step.started" and r["run_id"] == run_id}
    assert len(hosts) <= allowed, f"{run_id} acted on {len(hosts)} hosts, allowed {allowed}"


def _check_leases_and_cooldowns(
    records: list[dict[str, Any]],
    runbook_of: Mapping[str, str],
    cooldowns: Mapping[str, timedelta],
) -> None:
    """Each step under its run's own lease; no two runs of a runbook on a host within cool-down."""
    leases: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    steps: dict[tuple[str, str], list[tuple[datetime, str]]] = defaultdict(list)
    for record in records:
        if record["event"] == "lease.acquired":
            leases[record["host"]].append((_ts(record), record["run_id"]))
        elif record["event"] in {"step.started", "step.finished"}:
            steps[record["host"], record["run_id"]].append((_ts(record), record["event"]))
    spans: dict[str, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    for (host, run_id), events in steps.items():
        for moment, event in events:
            if event == "step.started":
                holders = [run for taken, run in sorted(leases[host]) if taken <= moment]
                assert holders, f"{run_id} acted on {host} holding no lease"
                assert holders[-1] == run_id, f"{run_id} acted on {host} in {holders[-1]}'s lease"
        moments = [moment for moment, _ in events]
        spans[host].append((min(moments), max(moments), run_id))
    for host, runs in spans.items():
        runs.sort()
        for (_, ended, first), (began, _, second) in itertools.pairwise(runs):
            runbook = runbook_of[first]
            if runbook_of[second] != runbook or runbook not in cooldowns:
                continue
            assert began >= ended + cooldowns[runbook], (
                f"{second} acted on {host} within {runbook}'s cool-down after {first}"
            )


def _ts(record: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(record["ts"])
