"""Faults around the shared state: PostgreSQL restarted under a replica; two receivers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from engine.audit import utc_now
from engine.state import open_database
from tests.support.alertmanager import Alertmanager
from tests.support.postgres import PostgresServer
from tests.support.replicas import lines, mark, new_replica, project_for, states
from tests.support.webhook import TOKEN, ServerProcess, wait_for

pytestmark = pytest.mark.integration


def test_postgres_restarted_under_a_replica_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, own_postgres: PostgresServer, server_processes: list[ServerProcess]
) -> None:
    """While the database restarts, intake answers 503 (retried later) and the acting run ends."""
    project, log = project_for(tmp_path, pause=6)
    url = own_postgres.url("remediate")
    replica = new_replica(project, url, "replica", workers=1)
    server_processes.append(replica)
    replica.start()
    assert replica.post(mark("dev-a", "aaaa")).status_code == 202
    wait_for("the dev-a run to start acting", lambda: "start dev-a" in lines(log))

    own_postgres.stop()
    refused = replica.post(mark("dev-b", "bbbb"))
    assert refused.status_code == 503
    assert refused.headers["retry-after"]
    health = httpx.get(f"{replica.url}/healthz", timeout=10)
    assert (health.status_code, health.json()["status"]) == (503, "state-unreachable")
    assert health.json()["state"]["reachable"] is False
    own_postgres.start()

    def accepted() -> bool:  # what Alertmanager's retry does
        answer = replica.post(mark("dev-b", "bbbb"))
        return answer.status_code == 202

    wait_for("the retried notification to be recorded", accepted, timeout=60)
    try:
        wait_for(
            "both runs to end",
            lambda: (
                {states(replica).get("aaaa"), states(replica).get("bbbb")}
                <= {"done", "interrupted"}
                and states(replica).get("bbbb") == "done"
            ),
            timeout=90,
        )
    except pytest.fail.Exception:  # what the replica said, for the failure's reader
        tail = replica.log.read_text(errors="replace")[-6000:]
        pytest.fail(f"queue {states(replica)}; the replica's log ends:\n{tail}")
    assert states(replica)["aaaa"] in {"done", "interrupted"}
    assert lines(log).count("acted dev-b") == 1
    assert lines(log).count("acted dev-a") <= 1
    assert lines(log).count("start dev-a") == 1
    with open_database(url, clock=utc_now) as database:
        store = database.store()
        assert [r for r in store.list_runs() if r.status.value == "running"] == []
        sink = database.audit_log()
        assert sink is not None
        assert sink.verify().ok


def test_alertmanager_notifying_two_replicas_gives_one_run_per_firing(
    tmp_path: Path,
    postgres_url: str,
    start_alertmanager: Callable[[str | list[str], str], Alertmanager],
    server_processes: list[ServerProcess],
) -> None:
    """One receiver with both replicas' URLs: every notification arrives twice, runs once."""
    project, log = project_for(tmp_path, pause=0)
    replicas = [new_replica(project, postgres_url, f"r{n}", workers=1) for n in range(2)]
    for replica in replicas:
        server_processes.append(replica)
        replica.start()
    manager = start_alertmanager([f"{r.url}/webhook" for r in replicas], TOKEN)
    manager.push(
        [
            {"labels": {"alertname": "MarkMe", "edge": "dev-a"}},
            {"labels": {"alertname": "MarkMe", "edge": "dev-b"}},
        ]
    )

    def seen_often_and_done() -> bool:
        alerts = replicas[0].get("/alerts").json()["alerts"]
        done = [i for i in replicas[0].get("/queue").json()["items"] if i["state"] == "done"]
        return len(done) == 2 and len(alerts) == 2 and all(a["times_seen"] >= 2 for a in alerts)

    wait_for("both runs done and each firing seen by both replicas", seen_often_and_done)
    acted = sorted(line for line in lines(log) if line.startswith("acted"))
    assert acted == ["acted dev-a", "acted dev-b"]
    assert len(replicas[1].get("/queue").json()["items"]) == 2
