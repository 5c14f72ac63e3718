"""Issue #16 at its scale: 1,000 simulated hosts and lab devices, three workers and a server.

One inventory holds 1,000 local-connection hosts (``tests/support/fleet.py``: a state file
per host stands in for the device) in group ``sim`` and two lab devices (real sshd, real
Docker engine) in ``balena_fleet``.  On a real PostgreSQL, three ``remediate worker``
processes run a fleet-wide ``sim-fleet`` apply from the CLI, the runs ``remediate serve``
(``executor: distributed``) enqueues for alerts about some of the same hosts, and the shipped
``orphaned-layers`` runbook over SSH on the lab devices; a worker is killed with SIGKILL while
it acts.  Every invariant of ``tests/support/invariants.py`` is checked for every run.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.lab import Device, Lab
from engine.lab import faults as lab_faults
from engine.lab.faults import layer_dirs
from engine.lab.images import APP_CONTAINER
from tests.support.fleet import SimFleet, make_fleet
from tests.support.invariants import check_alert_runs, check_runs, running_shard
from tests.support.lab import LabDevices
from tests.support.replicas import new_replica, states
from tests.support.webhook import Project, ServerProcess, alert, body, wait_for
from tests.support.workers import Cluster

pytestmark = [pytest.mark.lab, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
HOSTS = 1000
SHARD = 100  # ten probe shards for three workers
ALERT = "SimDeviceSick"
DOCKER = "/var/lib/docker"
QUARANTINE = f"{DOCKER}/orphan-quarantine"


def _fleet_with_lab(base: Path, lab: Lab, devices: list[Device]) -> SimFleet:
    """The simulated fleet (group ``sim``) and the lab devices, one inventory and project."""
    fleet = make_fleet(base, HOSTS, group="sim", alertname=ALERT)
    group = lab.inventory(devices)["all"]["children"]["balena_fleet"]  # type: ignore[index]
    fleet.add_group("balena_fleet", json.loads(json.dumps(group, default=str)))
    # The shipped orphaned-layers runbook, its check scripts and playbook, beside sim-fleet.
    for name in ("orphaned-layers.yml", "checks"):
        (fleet.project / "runbooks" / name).symlink_to(ROOT / "runbooks" / name)
    playbook = "quarantine-orphan-layers.yml"  # a copy: a playbook must be in the folder
    shutil.copy(ROOT / "playbooks" / playbook, fleet.project / "playbooks" / playbook)
    return fleet


def _server(cluster: Cluster, fleet: SimFleet, base: Path) -> ServerProcess:
    """``remediate serve`` on the cluster's database, enqueueing alert runs for the workers."""
    project = Project(
        root=fleet.project,
        runbooks=fleet.project / "runbooks",
        playbooks=fleet.project / "playbooks",
        inventory=fleet.inventory,
        state=base / "serve-state",
    )
    server = new_replica(project, cluster.url, "serve", workers=4)
    server.config.write_text(server.config.read_text() + "executor: distributed\n")
    return server


def _sim_alert(host: str, fingerprint: str) -> dict[str, object]:
    return body(alert({"alertname": ALERT, "device": host}, fingerprint=fingerprint))


def _outcomes(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {h["host"]: (h["outcome"], h["reason"]) for h in report["hosts"]}


def _orphans_run(cluster: Cluster, fleet: SimFleet, *limit: str, code: int = 0) -> dict[str, Any]:
    """A distributed apply of orphaned-layers over lab devices (orphans seconds old)."""
    done = cluster.remediate(
        "run", "orphaned-layers", "-i", str(fleet.inventory), "--apply", "--yes",
        "--distributed", "-e", "min_age=0s", "-o", "json", *limit,
    )  # fmt: skip
    assert done.returncode == code, done.stdout[-3000:] + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _assert_orphan_gone(dev: Device, orphan: str, before: set[str]) -> None:
    """Over SSH: the orphan (only it) left overlay2, no quarantine kept, all still inspects."""
    listing = dev.ssh(f"ls -A {DOCKER}/overlay2; ls -A {QUARANTINE} 2>/dev/null; true")
    assert set(listing.stdout.split()) - {"l"} == before - {orphan}, listing.stdout
    for kind in ("image", "container"):
        ids = dev.ssh(f"balena {kind} ls -aq --no-trunc").stdout.split()
        inspected = dev.ssh(f"balena {kind} inspect {' '.join(ids)} >/dev/null")
        assert ids, f"{dev.name}: no {kind} left"
        assert inspected.returncode == 0, (kind, inspected.stderr)
    app = dev.ssh(f"balena ps -q --filter name=^{APP_CONTAINER}$")
    assert app.stdout.strip(), f"{dev.name}: the app container no longer runs"


@dataclass(frozen=True)
class Killed:
    """The worker killed mid-act: its act shard, pid and hosts, and where their fixes were."""

    shard: int
    pid: int
    hosts: frozenset[str]
    cut: frozenset[str]  # started, killed before it took effect
    done: frozenset[str]  # had taken effect when the worker was killed


def _kill_mid_act(cluster: Cluster, run_id: str, slowed: Sequence[str]) -> Killed:
    """Kill (SIGKILL) the worker of one of the run's act shards once fixes run in it."""
    fleet = cluster.fleet
    shard, pid = cluster.wait_for(
        "an act shard", lambda: running_shard(cluster, "act", run_id), timeout=600
    )
    rows = cluster.query(
        "SELECT host FROM dist_hosts WHERE run_id = %s AND act_shard = %s", (run_id, shard)
    )
    hosts = frozenset(h for (h,) in rows)
    cluster.wait_for("fixes started", lambda: sum(fleet.fixes(h) > 0 for h in hosts) >= 10)
    fleet.slow(slowed, 0)  # the fixes to come are quick; those running sleep on
    fleet.slow_after(slowed, 0)
    cluster.kill(pid)
    # What the killed worker did (a retry is seconds away: the shard is found stalled and
    # its leases must expire first).
    cut = frozenset(h for h in hosts if fleet.fixes(h) and not fleet.effective_fixes(h))
    done = frozenset(h for h in hosts if fleet.effective_fixes(h))
    cluster.start_worker()  # a replacement, as a supervisor would start
    return Killed(shard=shard, pid=pid, hosts=hosts, cut=cut, done=done)


def _check_fleet(
    cluster: Cluster,
    report: dict[str, Any],
    sick: Sequence[str],
    slowed: Sequence[str],
    killed: Killed,
) -> None:
    """Every sick host fixed once (a fix cut short done again), no other host touched.

    A loaded machine can make a live worker look stalled: its act shard is interrupted
    too, and its hosts are judged like the killed one's (fixed or found healthy, once).
    """
    fleet = cluster.fleet
    run_id = report["plan"]["run_id"]
    interrupted = {
        r["shard"]: r["reason"]
        for r in cluster.audit()
        if r["event"] == "shard.interrupted" and r["run_id"] == run_id
    }
    assert f":{killed.pid}" in interrupted.get(killed.shard, ""), interrupted
    others = {
        h
        for shard in set(interrupted) - {killed.shard}
        for (h,) in cluster.query(
            "SELECT host FROM dist_hosts WHERE run_id = %s AND act_shard = %s", (run_id, shard)
        )
    }
    for host in sick:
        assert (fleet.state(host), fleet.effective_fixes(host)) == ("fixed", 1), host
        if host in killed.cut:  # cut short by the kill, then done again
            assert fleet.fixes(host) == 2, host
        else:
            assert fleet.fixes(host) in ({1, 2} if host in others else {1}), host
    assert all(fleet.fixes(h) == 0 for h in fleet.names if h not in sick)
    # One run reports each host fixed (the fleet run, or an alert's); none reports the
    # hosts whose fix had taken effect when the kill cut it off (found healthy again).
    rows = cluster.query(
        "SELECT host FROM host_results JOIN runs USING (run_id)"
        " WHERE runbook = 'sim-fleet' AND outcome = 'fixed'"
    )
    fixed = Counter(h for (h,) in rows)
    assert set(fixed) <= set(sick)
    assert set(fixed.values()) == {1}, fixed
    assert all(fixed[h] == 1 for h in sick if h not in killed.done | others), fixed
    assert not any(fixed[h] for h in killed.done & set(slowed)), fixed
    outcomes = _outcomes(report)
    for host in slowed:  # the hosts no alert was about: the fleet run's
        expected = {"healthy"} if host in killed.done else {"fixed"}
        expected |= {"fixed", "healthy"} if host in others else set()
        assert outcomes[host][0] in expected, (host, outcomes[host])


def _check_lab(
    devices: Sequence[Device],
    refused: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    orphans: Mapping[str, str],
    layers: Mapping[str, set[str]],
) -> None:
    """The run over both devices refused; one run per device fixed each, seen inside it."""
    assert refused["status"] == "refused"
    for outcome, reason in _outcomes(refused).values():
        assert outcome == "refused"
        assert "the policy allows 1 of 2 targeted (max_hosts_pct 25)" in reason
    for dev, run in zip(devices, runs, strict=True):
        (host,) = run["hosts"]
        assert (host["host"], host["outcome"]) == (dev.name, "fixed"), host
        assert host["evidence_after"]["scan"]["qualifying"] == []
        _assert_orphan_gone(dev, orphans[dev.name], layers[dev.name])


def test_a_thousand_hosts_and_lab_devices_keep_every_invariant(
    tmp_path: Path,
    cluster_factory: Callable[[SimFleet], Cluster],
    lab: Lab,
    lab_devices: LabDevices,
    server_processes: list[ServerProcess],
) -> None:
    """1,000 simulated hosts and two lab devices, three workers (one killed mid-act), a server."""
    devices = lab_devices(2)
    try:
        orphans = {d.name: lab_faults.make_orphan_layer(d, size_mb=2) for d in devices}
        for dev in devices:  # the engine killed to leave the orphan stopped it
            dev.balena("start", APP_CONTAINER)
        layers = {d.name: layer_dirs(d) for d in devices}
        fleet = _fleet_with_lab(tmp_path / "fleet", lab, devices)
        sick = fleet.names[9::10]  # 100 hosts
        fleet.make_sick(sick)
        alerted = [*sick[:3], fleet.names[0]]  # three sick hosts and a healthy one
        slowed = [h for h in sick if h not in alerted]
        fleet.slow(slowed[::2], 8)  # killed before the fix took effect: still sick
        fleet.slow_after(slowed[1::2], 8)  # killed after it took effect: not to run again
        cluster = cluster_factory(fleet)
        for _ in range(3):
            cluster.start_worker()
        server = _server(cluster, fleet, tmp_path)
        server_processes.append(server)
        server.start()
        with cluster.following(
            "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
            "--shard-size", str(SHARD), "-o", "json",
        ) as follower:  # fmt: skip
            (run_id,) = cluster.wait_for(
                "the fleet run", lambda: cluster.query("SELECT run_id FROM dist_runs")
            )[0]
            fingerprints = {host: f"f{n:03d}" for n, host in enumerate(alerted)}
            for host, fingerprint in fingerprints.items():
                assert server.post(_sim_alert(host, fingerprint)).status_code == 202
                again = server.post(_sim_alert(host, fingerprint))
                assert again.json()["queued"] == 0  # one run per firing
            killed = _kill_mid_act(cluster, run_id, slowed)
            # The lab devices while the fleet run recovers: the blast radius (25 % of two
            # devices: one) refuses a run over both; a run per device fixes each.
            refused = _orphans_run(cluster, fleet, code=1)
            assert {d.name: layer_dirs(d) for d in devices} == layers  # nothing touched
            lab_runs = [_orphans_run(cluster, fleet, "--limit", d.name) for d in devices]
            out, err = follower.communicate(timeout=600)
        assert follower.returncode == 0, err[-3000:]
        wait_for(
            "the alert runs",
            lambda: set(states(server).values()) == {"done"} and len(states(server)) == 4,
            timeout=300,
        )
        _check_fleet(cluster, json.loads(out), sick, slowed, killed)
        spread = cluster.query(
            "SELECT count(DISTINCT worker) FROM dist_shards WHERE run_id = %s AND kind = 'probe'",
            (run_id,),
        )
        assert spread[0][0] >= 2  # the probe shards were shared by the workers
        _check_lab(devices, refused, lab_runs, orphans, layers)

        # Every run: the invariants; the alerts: one run each.
        runs: dict[str, int | None] = {run_id: None}
        runs |= {r["plan"]["run_id"]: len(r["hosts"]) for r in (refused, *lab_runs)}
        runs |= dict.fromkeys(check_alert_runs(cluster, fingerprints.values()).values(), 1)
        check_runs(cluster, runs)
    finally:
        for dev in devices:
            dev.sh(f"rm -rf {QUARANTINE}")
            lab_faults.clear_all(dev)
