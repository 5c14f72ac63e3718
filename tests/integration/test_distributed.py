"""Runs spread over real ``remediate worker`` processes on a real PostgreSQL (procrastinate).

The fleet is simulated (``tests/support/fleet.py``): local-connection hosts whose device
state is a file each, so a test knows what was done to every host and how many times.
After each scenario the invariants hold (``tests/support/invariants.py``): at most one
effective fix per host, no host acted on beyond the blast radius, under another lease or
within its cool-down, the audit chain verifies and is contiguous.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.planfiles import load_plan
from tests.support.cli import run_remediate
from tests.support.fleet import SimFleet, make_fleet
from tests.support.invariants import acted, check_invariants, running_shard
from tests.support.postgres import PostgresServer
from tests.support.replicas import lines, mark, new_replica, project_for, states
from tests.support.webhook import ServerProcess, wait_for
from tests.support.workers import Cluster

pytestmark = pytest.mark.integration

Make = Callable[[SimFleet], Cluster]


def _hosts(report: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {h["host"]: (h["outcome"], len(h["steps"])) for h in report["hosts"]}


def _events(records: list[dict[str, Any]]) -> Counter[tuple[str, str | None]]:
    """Audit events per (event, host), the run's own (distribution's events left out)."""
    own = {"shard.interrupted", "shard.superseded", "host.rechecked", "batch.started"}
    return Counter((r["event"], r.get("host")) for r in records if r["event"] not in own)


def test_distributed_apply_matches_a_single_process_run(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """Three workers fix the same hosts, with the same report, history and audit events."""
    fleet = make_fleet(tmp_path / "dist", 120)
    sick = fleet.names[::4]
    fleet.make_sick(sick)
    cluster = cluster_factory(fleet)
    for _ in range(3):
        cluster.start_worker()
    plan_file = tmp_path / "plan.json"
    dry = cluster.remediate(
        "plan", "sim-fleet", "-i", str(fleet.inventory), "--distributed",
        "--shard-size", "40", "-o", "json", "--out", str(plan_file),
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert sorted(h["host"] for h in planned["hosts"] if h["outcome"] == "planned") == sorted(sick)
    assert all(fleet.fixes(n) == 0 for n in fleet.names)  # a dry-run changes nothing

    done = cluster.remediate(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
        "--shard-size", "40", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    run_id = report["plan"]["run_id"]
    assert report["status"] == "succeeded"
    assert [fleet.fixes(n) for n in sick] == [1] * len(sick)
    assert all(fleet.state(n) == "fixed" for n in sick)
    assert sum(fleet.fixes(n) for n in fleet.names) == len(sick)
    check_invariants(cluster, run_id)
    shards = cluster.query(
        "SELECT kind, count(DISTINCT worker) FROM dist_shards WHERE run_id = %s GROUP BY kind",
        (run_id,),
    )
    assert dict(shards)["probe"] >= 2  # the probe shards were spread over workers

    # The same fleet, one process, SQLite: the same outcomes and audit events.
    single = make_fleet(tmp_path / "single", 120)
    single.make_sick(sick)
    alone = run_remediate(
        ["run", "sim-fleet", "-i", str(single.inventory), "--apply", "-o", "json"],
        tmp_path / "single-state",
        env_extra=single.env,
    )
    assert alone.returncode == 0, alone.stderr
    single_report = json.loads(alone.stdout)
    assert _hosts(single_report) == _hosts(report)
    history = json.loads(cluster.remediate("history", run_id, "-o", "json").stdout)
    single_history = json.loads(
        run_remediate(
            ["history", single_report["plan"]["run_id"], "-o", "json"],
            tmp_path / "single-state",
            env_extra=single.env,
        ).stdout
    )
    assert _outcomes(history) == _outcomes(single_history)
    exported = tmp_path / "single-audit.jsonl"
    run_remediate(["audit", "export", str(exported)], tmp_path / "single-state")
    single_events = [json.loads(line) for line in exported.read_text().splitlines()]
    dist_events = [r for r in cluster.audit() if r.get("run_id") == run_id]
    assert _events(dist_events) == _events(
        [r for r in single_events if r.get("run_id") == single_report["plan"]["run_id"]]
    )

    # The distributed dry-run's plan applies like any other: these hosts drifted (fixed).
    applied = cluster.remediate("apply", str(plan_file), "-o", "json")
    assert applied.returncode in {0, 1}, applied.stderr
    outcomes = Counter(h["outcome"] for h in json.loads(applied.stdout)["hosts"])
    assert outcomes["fixed"] == 0
    assert sum(fleet.fixes(n) for n in fleet.names) == len(sick)


def _outcomes(history: Any) -> dict[str, str]:
    hosts = history["hosts"] if isinstance(history, dict) else history
    return {h["host"]: h["outcome"] for h in hosts}


def test_worker_killed_mid_act_interrupts_its_hosts_and_never_reruns_them_blindly(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """A worker killed mid-act: its hosts are interrupted; a retry acts only where still sick."""
    fleet = make_fleet(tmp_path, 40)
    sick = fleet.names[:20]
    fleet.make_sick(sick)
    before, after = sick[::2], sick[1::2]
    fleet.slow(before, 6)  # killed before the fix took effect: still sick
    fleet.slow_after(after, 6)  # killed after it took effect: fixed, must not run again
    cluster = cluster_factory(fleet)
    for _ in range(3):
        cluster.start_worker()
    with cluster.following(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed", "--yes",
        "--shard-size", "10", "-o", "json",
    ) as follower:  # fmt: skip
        shard, pid = cluster.wait_for("an act shard", lambda: running_shard(cluster, "act"))
        run_id = cluster.query("SELECT run_id FROM dist_runs")[0][0]
        hosts = [
            r[0]
            for r in cluster.query(
                "SELECT host FROM dist_hosts WHERE run_id = %s AND act_shard = %s", (run_id, shard)
            )
        ]
        cluster.wait_for("the fix started", lambda: all(fleet.fixes(h) for h in hosts))
        fleet.slow(before, 0)
        fleet.slow_after(after, 0)
        cluster.kill(pid)
        out, _ = follower.communicate(timeout=180)
    report = json.loads(out)
    outcomes = {h["host"]: (h["outcome"], h["reason"]) for h in report["hosts"]}
    for host in hosts:
        assert fleet.state(host) == "fixed"
        if host in after:  # its fix took effect: the retry's probe found it healthy
            assert fleet.fixes(host) == 1, host
            assert outcomes[host][0] == "healthy", outcomes[host]
        else:  # still sick when re-probed, under its attempt limit: acted on again
            assert fleet.fixes(host) == 2, host
            assert outcomes[host][0] == "fixed", outcomes[host]
    assert all(fleet.fixes(h) == 1 for h in sick if h not in hosts)
    interrupted = [
        r for r in cluster.audit() if r["event"] == "shard.interrupted" and r["shard"] == shard
    ]
    assert len(interrupted) == 1
    assert f":{pid}" in interrupted[0]["reason"]
    check_invariants(cluster, run_id)


def test_worker_killed_mid_probe_has_its_shard_retried(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """A worker killed mid-probe: its stalled probe shard is retried and the run completes."""
    fleet = make_fleet(tmp_path, 40)
    sick = fleet.names[5:15]
    fleet.make_sick(sick)
    fleet.slow_probe(fleet.names, 30)
    cluster = cluster_factory(fleet)
    for _ in range(2):
        cluster.start_worker()
    with cluster.following(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
        "--shard-size", "20", "-o", "json",
    ) as follower:  # fmt: skip
        shard, pid = cluster.wait_for("a probe shard", lambda: running_shard(cluster, "probe"))
        fleet.slow_probe(fleet.names, 0)
        cluster.kill(pid)
        cluster.start_worker()  # a replacement, as a supervisor would start
        out, _ = follower.communicate(timeout=180)
    report = json.loads(out)
    run_id = report["plan"]["run_id"]
    assert report["status"] == "succeeded"
    assert {h["host"] for h in report["hosts"] if h["outcome"] == "fixed"} == set(sick)
    assert all(fleet.fixes(n) == 1 for n in sick)
    tries = cluster.query(
        "SELECT attempts FROM procrastinate_jobs WHERE task_name = 'remediate.probe_shard'"
        " AND (args->>'shard')::int = %s",
        (shard,),
    )
    assert max(t[0] for t in tries) >= 2  # tried again after the kill
    check_invariants(cluster, run_id)
    shutil.rmtree(fleet.root, ignore_errors=True)


def test_failures_across_shards_stop_the_next_batch(tmp_path: Path, cluster_factory: Make) -> None:
    """Failures in two shards of one batch breach max_fail_pct together: no later batch acts."""
    fleet = make_fleet(tmp_path, 40, serial=10, max_fail_pct=20)
    sick = fleet.names[:20]
    fleet.make_sick(sick)
    # Batch 1 is two act shards of 5: 2 failures in one, 1 in the other, 30% of the batch.
    fleet.break_fix([sick[0], sick[1], sick[5]])
    cluster = cluster_factory(fleet)
    for _ in range(2):
        cluster.start_worker()
    done = cluster.remediate(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
        "--shard-size", "5", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "aborted"
    outcomes = {h["host"]: h for h in report["hosts"]}
    first, second = sick[:10], sick[10:]
    assert sum(fleet.fixes(n) for n in first) == len(first)  # the whole batch ran
    assert all(fleet.fixes(n) == 0 for n in second)  # the next one never started
    assert all(outcomes[n]["outcome"] == "skipped" for n in second)
    assert "max_fail_pct 20" in outcomes[second[0]]["reason"]
    check_invariants(cluster, report["plan"]["run_id"])


def test_serve_with_the_distributed_executor_runs_an_alert_on_a_worker(
    tmp_path: Path, cluster_factory: Make, server_processes: list[ServerProcess]
) -> None:
    """`executor: distributed`: the server enqueues the alert's run; a worker runs it, once."""
    project, log = project_for(tmp_path, pause=0)
    cluster = cluster_factory(SimFleet(project=project.root, root=tmp_path, names=()))
    cluster.start_worker()
    server = new_replica(project, cluster.url, "serve")
    server.config.write_text(server.config.read_text() + "executor: distributed\n")
    server_processes.append(server)
    server.start()
    assert server.post(mark("dev-b", "ffff")).status_code == 202
    assert server.post(mark("dev-b", "ffff")).json()["queued"] == 0  # one run per firing
    wait_for("the alert's run", lambda: states(server).get("ffff") == "done", timeout=120)
    assert [line for line in lines(log) if line.startswith("acted")] == ["acted dev-b"]
    (item,) = server.get("/queue").json()["items"]
    ran = cluster.query(
        "SELECT s.worker FROM dist_shards s WHERE s.run_id = %s AND s.kind = 'act'",
        (item["run_id"],),
    )
    assert [w.rpartition(":")[2] for (w,) in ran] == [str(cluster.workers[0].pid)]  # not serve
    assert cluster.query("SELECT status FROM runs WHERE run_id = %s", (item["run_id"],)) == [
        ("succeeded",)
    ]
    assert cluster.remediate("audit", "verify").returncode == 0
    listed = json.loads(cluster.remediate("workers", "-o", "json").stdout)
    assert [w["pid"] for w in listed["workers"]] == [cluster.workers[0].pid]
    assert listed["stalled"] == []


def test_a_cancelled_run_acts_on_nothing_and_ends_aborted(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """`remediate cancel` mid-probe: no host is acted on, the run ends aborted, exit 1."""
    fleet = make_fleet(tmp_path, 20)
    fleet.make_sick(fleet.names)
    fleet.slow_probe(fleet.names, 4)
    cluster = cluster_factory(fleet)
    cluster.start_worker()
    with cluster.following(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
        "--shard-size", "10", "-o", "json",
    ) as follower:  # fmt: skip
        cluster.wait_for("a probe shard", lambda: running_shard(cluster, "probe"))
        run_id = cluster.query("SELECT run_id FROM dist_runs")[0][0]
        cancelled = cluster.remediate("cancel", run_id)
        assert cancelled.returncode == 0, cancelled.stderr
        again = cluster.remediate("cancel", run_id)
        assert again.returncode == 2  # invalid input: cancelled already
        out, _ = follower.communicate(timeout=120)
    assert follower.returncode == 1
    report = json.loads(out)
    assert report["status"] == "aborted"
    assert {h["outcome"] for h in report["hosts"]} == {"skipped"}
    assert all(fleet.fixes(n) == 0 for n in fleet.names)
    check_invariants(cluster, run_id)


def test_two_runs_over_overlapping_hosts_act_on_each_host_once(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """Two runs at once over overlapping hosts: each host acted on once, by one run's lease."""
    fleet = make_fleet(tmp_path, 24)
    sick = fleet.names[2:14]  # dev0003..dev0014
    fleet.make_sick(sick)
    fleet.slow(sick, 2)  # both runs' act shards overlap in time
    first, second = fleet.names[:16], fleet.names[4:]  # dev0005..dev0016 in both
    cluster = cluster_factory(fleet)
    for _ in range(3):
        cluster.start_worker()

    def run(hosts: Sequence[str]) -> subprocess.Popen[str]:
        args = ["run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed"]
        args += ["--limit", ":".join(hosts), "--shard-size", "4", "-o", "json"]
        return stack.enter_context(cluster.following(*args))

    with contextlib.ExitStack() as stack:
        followers = [run(first), run(second)]
        outs = [f.communicate(timeout=240)[0] for f in followers]
    reports = [json.loads(out) for out in outs]
    assert [f.returncode for f in followers] == [0, 0], [r["status"] for r in reports]
    why = [(h["host"], h["outcome"], h["reason"]) for r in reports for h in r["hosts"]]
    assert [fleet.fixes(n) for n in sick] == [1] * len(sick), why  # never twice
    assert all(fleet.fixes(n) == 0 for n in fleet.names if n not in sick)
    acted_by = acted(cluster)
    assert set(acted_by) == set(sick)  # 12 hosts: within both runs' blast radius (16 and 20)
    assert all(len(runs) == 1 for runs in acted_by.values()), acted_by  # one run's lease each
    fixed_by = Counter(h["host"] for r in reports for h in r["hosts"] if h["outcome"] == "fixed")
    assert set(fixed_by) == set(sick)
    assert set(fixed_by.values()) == {1}
    for report in reports:  # the other run's hosts: leased (skipped) or cooled down/healthy
        run_id = report["plan"]["run_id"]
        for host in report["hosts"]:
            if host["host"] in acted_by and acted_by[host["host"]] != {run_id}:
                assert host["outcome"] in {"skipped", "healthy"}, host
    for report, hosts in zip(reports, (first, second), strict=True):
        check_invariants(cluster, report["plan"]["run_id"], len(hosts))


def test_worker_killed_after_its_shard_ended_leaves_the_run_to_the_others(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """A worker killed after its act shard's results committed, before its next step: no rerun."""
    fleet = make_fleet(tmp_path, 20)
    sick = fleet.names[:10]
    fleet.make_sick(sick)
    fleet.slow(sick, 3)  # the act job's row is locked while the shard runs
    cluster = cluster_factory(fleet)
    doomed = cluster.start_worker("--concurrency", "1")
    with (
        psycopg.connect(cluster.url) as blocker,
        cluster.following(
            "run",
            "sim-fleet",
            "-i",
            str(fleet.inventory),
            "--apply",
            "--distributed",
            "--shard-size",
            "10",
            "-o",
            "json",
        ) as follower,  # fmt: skip
    ):
        # The act job's row is held: the worker ends the shard (its own transaction), then
        # waits to mark its job done, its only slot busy, the coordinator's step not taken.
        def act_job_locked() -> bool:
            rows = blocker.execute(
                b"SELECT id FROM procrastinate_jobs WHERE task_name = 'remediate.act_shard'"
                b" FOR UPDATE"
            ).fetchall()
            return bool(rows)

        cluster.wait_for("the act job", act_job_locked)
        cluster.wait_for(
            "the act shard's end",
            lambda: (
                cluster.query("SELECT state FROM dist_shards WHERE kind = 'act'") == [("done",)]
            ),
        )
        run_id = cluster.query("SELECT run_id FROM dist_runs")[0][0]
        assert cluster.query("SELECT phase FROM dist_runs")[0][0] == "act"
        cluster.kill(doomed.pid)
        blocker.rollback()
        cluster.start_worker()  # a replacement, as a supervisor would start
        out, _ = follower.communicate(timeout=180)
    report = json.loads(out)
    assert report["status"] == "succeeded"
    assert [fleet.fixes(n) for n in sick] == [1] * len(sick)
    assert {h["host"] for h in report["hosts"] if h["outcome"] == "fixed"} == set(sick)
    assert not [r for r in cluster.audit() if r["event"] == "shard.interrupted"]
    check_invariants(cluster, run_id)


def test_postgres_restarted_mid_act_acts_on_no_host_twice(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    """PostgreSQL restarted under acting shards: the run ends, no host acted on twice."""
    fleet = make_fleet(tmp_path, 20)
    sick = fleet.names[:10]
    fleet.make_sick(sick)
    fleet.slow(sick, 4)
    cluster = Cluster(url=own_postgres.url("remediate"), fleet=fleet, base=tmp_path)
    try:
        for _ in range(2):
            cluster.start_worker()
        with cluster.following(
            "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
            "--shard-size", "5", "-o", "json",
        ) as follower:  # fmt: skip
            cluster.wait_for("an act shard", lambda: running_shard(cluster, "act"))
            cluster.wait_for("a fix started", lambda: any(fleet.fixes(h) for h in sick))
            own_postgres.stop()
            time.sleep(7)  # longer than a connection is waited for: following waits on
            own_postgres.start()
            out, err = follower.communicate(timeout=240)
        assert follower.returncode in {0, 1}, err
        report = json.loads(out)
        run_id = report["plan"]["run_id"]
        outcomes = {h["host"]: h["outcome"] for h in report["hosts"]}
        assert all(fleet.fixes(n) <= 1 for n in fleet.names)  # never double-acted
        for host in sick:  # healthy: its fix took effect, a retry's probe found it so
            if outcomes[host] in {"fixed", "healthy"}:
                assert (fleet.fixes(host), fleet.state(host)) == (1, "fixed"), host
            else:
                assert outcomes[host] in {"interrupted", "error"}, (host, outcomes[host])
        assert cluster.query("SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]
        check_invariants(cluster, run_id)
    finally:
        cluster.stop()


def test_act_shard_whose_final_write_fails_tries_it_again(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """An act shard's final write refused by the database: it tries again; the run then ends."""
    fleet = make_fleet(tmp_path, 10)
    sick = fleet.names[:5]
    fleet.make_sick(sick)
    cluster = cluster_factory(fleet)
    # The database refuses to end act shards (a fault of the real server) until dropped.
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(
            b"CREATE FUNCTION refuse_shard_end() RETURNS trigger LANGUAGE plpgsql AS $$"
            b" BEGIN RAISE EXCEPTION 'the database is away'; END $$"
        )
        conn.execute(
            b"CREATE TRIGGER refuse_shard_end BEFORE UPDATE ON dist_shards FOR EACH ROW"
            b" WHEN (NEW.kind = 'act' AND NEW.state IN ('done', 'failed'))"
            b" EXECUTE FUNCTION refuse_shard_end()"
        )
    cluster.start_worker("--stalled-after", "120")  # no one else would recover the shard
    with cluster.following(
        "run", "sim-fleet", "-i", str(fleet.inventory), "--apply", "--distributed",
        "--shard-size", "5", "-o", "json",
    ) as follower:  # fmt: skip
        cluster.wait_for(
            "a refused final write",
            lambda: any(r["event"] == "shard.write_retried" for r in cluster.audit()),
        )
        assert cluster.query("SELECT state FROM dist_shards WHERE kind = 'act'") == [("running",)]
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute(b"DROP TRIGGER refuse_shard_end ON dist_shards")
        out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    report = json.loads(out)
    assert report["status"] == "succeeded"
    assert {h["host"] for h in report["hosts"] if h["outcome"] == "fixed"} == set(sick)
    assert [fleet.fixes(n) for n in sick] == [1] * len(sick)
    check_invariants(cluster, report["plan"]["run_id"])


def test_a_fleet_over_a_thousand_hosts_is_listed_and_written_in_pages(
    tmp_path: Path, cluster_factory: Make
) -> None:
    """Over 1,000 hosts, targets.resolved comes in parts and -o json, --out hold every host."""
    fleet = make_fleet(tmp_path / "big", 1001)
    cluster = cluster_factory(fleet)
    cluster.start_worker()
    plan_file = tmp_path / "plan.json"
    with cluster.following(
        "plan", "sim-fleet", "-i", str(fleet.inventory), "--distributed",
        "--shard-size", "25", "-o", "json", "--out", str(plan_file),
    ) as proc:  # fmt: skip
        (run_id,) = cluster.wait_for(
            "the targets resolved",
            lambda: [
                r[0] for r in cluster.query("SELECT run_id FROM dist_runs WHERE phase <> 'resolve'")
            ],
        )
        cancelled = cluster.remediate("cancel", run_id)
        assert cancelled.returncode == 0, cancelled.stderr
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err  # aborted: not every host was planned
    report = json.loads(out)
    assert report["status"] == "aborted"
    assert [h["host"] for h in report["hosts"]] == list(fleet.names)
    assert [h["host"] for h in report["plan"]["hosts"]] == list(fleet.names)
    saved = load_plan(plan_file)  # its digest verifies
    assert [h.host for h in saved.plan.hosts] == list(fleet.names)
    resolved = [
        r for r in cluster.audit() if r.get("run_id") == run_id and r["event"] == "targets.resolved"
    ]
    assert [(r["part"], r["parts"], r["total"], len(r["hosts"])) for r in resolved] == [
        (1, 2, 1001, 1000),
        (2, 2, 1001, 1),
    ]
    assert [name for r in resolved for name in r["hosts"]] == list(fleet.names)
    check_invariants(cluster, run_id)
