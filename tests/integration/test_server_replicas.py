"""Two real ``remediate serve`` replicas against one PostgreSQL: one run per firing, takeover."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.cli import run_remediate
from tests.support.replicas import lines, mark, new_replica, project_for, states
from tests.support.webhook import (
    ServerProcess,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_one_notification_posted_to_two_replicas_at_once_runs_once(
    tmp_path: Path, postgres_url: str, server_processes: list[ServerProcess]
) -> None:
    """The same firing, posted to both replicas at the same instant, is run exactly once."""
    project, log = project_for(tmp_path, pause=0)
    replicas = [new_replica(project, postgres_url, f"r{n}") for n in range(2)]
    for replica in replicas:
        server_processes.append(replica)
        replica.start()
    health = replicas[0].get("/healthz").json()
    assert health["state"] == {"url": postgres_url, "reachable": True}
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def post(replica: ServerProcess) -> None:
        barrier.wait()
        answers.append(replica.post(mark("dev-b", "same")))

    threads = [threading.Thread(target=post, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [202, 202]
    assert sorted(a.json()["queued"] for a in answers) == [0, 1]
    wait_for("the run", lambda: states(replicas[1]).get("same") == "done")
    assert [line for line in lines(log) if line.startswith("acted")] == ["acted dev-b"]
    (firing,) = replicas[1].get("/alerts").json()["alerts"]
    assert firing["times_seen"] == 2
    received = [r for r in _audit_records(postgres_url) if r["event"] == "alert.received"]
    outcomes = sorted(r["notifications"][0]["alerts"][0]["outcome"] for r in received)
    assert outcomes == ["deduplicated", "queued"]


def test_a_replica_killed_mid_run_is_taken_over_by_the_other(
    tmp_path: Path, postgres_url: str, server_processes: list[ServerProcess]
) -> None:
    """A replica killed mid-run: the other marks its run interrupted and runs the queue."""
    project, log = project_for(tmp_path, pause=120)
    first = new_replica(project, postgres_url, "first")
    server_processes.append(first)
    first.start()
    assert first.post(mark("dev-a", "aaaa")).status_code == 202
    wait_for("the dev-a run to start acting", lambda: "start dev-a" in lines(log))
    assert first.post(mark("dev-b", "bbbb")).json()["queued"] == 1
    (running,) = [i for i in first.get("/queue").json()["items"] if i["state"] == "running"]

    second = new_replica(project, postgres_url, "second")
    server_processes.append(second)
    second.start()
    first.kill_group()

    wait_for("the queued dev-b run on the survivor", lambda: states(second).get("bbbb") == "done")
    wait_for(
        "the killed replica's run to be marked interrupted",
        lambda: states(second).get("aaaa") == "interrupted",
        timeout=30,
    )
    assert sorted(lines(log)) == ["acted dev-b", "start dev-a", "start dev-b"]
    again = second.post(mark("dev-a", "aaaa")).json()  # Alertmanager re-sends the group
    assert (again["deduplicated"], again["queued"]) == (1, 0)
    records = _audit_records(postgres_url)  # the chain is in the database
    interrupted = [r for r in records if r["event"] == "run.interrupted"]
    assert [r["run_id"] for r in interrupted] == [running["run_id"]]
    assert "stopped" in interrupted[0]["reason"]
    assert not (project.state / "audit.jsonl").exists()
    verified = run_remediate(["--state-url", postgres_url, "audit", "verify"], project.state)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _audit_records(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT record FROM audit_chain ORDER BY seq").fetchall()
    return [json.loads(r[0]) for r in rows]
