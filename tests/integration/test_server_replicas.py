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
from tests.support.webhook import (
    MARK_PLAYBOOK,
    TOKEN,
    Project,
    ServerProcess,
    alert,
    body,
    free_port,
    mark_runbook,
    wait_for,
    write_project,
)

pytestmark = pytest.mark.integration

HOSTS: dict[str, dict[str, str]] = {"dev-a": {}, "dev-b": {}}


def _mark(edge: str, fingerprint: str) -> dict[str, object]:
    return body(alert({"alertname": "MarkMe", "edge": edge}, fingerprint=fingerprint))


def _project(tmp_path: Path, pause: int) -> tuple[Project, Path]:
    log = tmp_path / "acted.log"
    project = write_project(
        tmp_path,
        runbooks={"mark.yml": mark_runbook(log, slow_hosts="dev-a", pause=pause)},
        playbooks={"mark.yml": MARK_PLAYBOOK},
        hosts=HOSTS,
    )
    return project, log


def _replica(project: Project, url: str, name: str, workers: int = 1) -> ServerProcess:
    port = free_port()
    config = project.root / f"{name}.yml"
    config.write_text(
        f"inventory: {project.inventory}\n"
        f"runbooks_dir: {project.runbooks}\n"
        f"playbooks_dir: {project.playbooks}\n"
        f"listen: {{port: {port}}}\n"
        f"auth: {{token: {TOKEN}}}\n"
        f"workers: {workers}\n"
        f"state: {{url: '{url}', lease_ttl: 3s}}\n"
    )
    server = ServerProcess(project, config, port)
    server.log = project.root / f"{name}.log"
    return server


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _states(server: ServerProcess) -> dict[str, str]:
    return {i["fingerprint"]: i["state"] for i in server.get("/queue").json()["items"]}


def test_one_notification_posted_to_two_replicas_at_once_runs_once(
    tmp_path: Path, postgres_url: str, server_processes: list[ServerProcess]
) -> None:
    """The same firing, posted to both replicas at the same instant, is run exactly once."""
    project, log = _project(tmp_path, pause=0)
    replicas = [_replica(project, postgres_url, f"r{n}") for n in range(2)]
    for replica in replicas:
        server_processes.append(replica)
        replica.start()
    health = replicas[0].get("/healthz").json()
    assert health["state"] == {"url": postgres_url, "reachable": True}
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def post(replica: ServerProcess) -> None:
        barrier.wait()
        answers.append(replica.post(_mark("dev-b", "same")))

    threads = [threading.Thread(target=post, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [202, 202]
    assert sorted(a.json()["queued"] for a in answers) == [0, 1]
    wait_for("the run", lambda: _states(replicas[1]).get("same") == "done")
    assert [line for line in _lines(log) if line.startswith("acted")] == ["acted dev-b"]
    (firing,) = replicas[1].get("/alerts").json()["alerts"]
    assert firing["times_seen"] == 2
    received = [r for r in _audit_records(postgres_url) if r["event"] == "alert.received"]
    outcomes = sorted(r["notifications"][0]["alerts"][0]["outcome"] for r in received)
    assert outcomes == ["deduplicated", "queued"]


def test_a_replica_killed_mid_run_is_taken_over_by_the_other(
    tmp_path: Path, postgres_url: str, server_processes: list[ServerProcess]
) -> None:
    """A replica killed mid-run: the other marks its run interrupted and runs the queue."""
    project, log = _project(tmp_path, pause=120)
    first = _replica(project, postgres_url, "first")
    server_processes.append(first)
    first.start()
    assert first.post(_mark("dev-a", "aaaa")).status_code == 202
    wait_for("the dev-a run to start acting", lambda: "start dev-a" in _lines(log))
    assert first.post(_mark("dev-b", "bbbb")).json()["queued"] == 1
    (running,) = [i for i in first.get("/queue").json()["items"] if i["state"] == "running"]

    second = _replica(project, postgres_url, "second")
    server_processes.append(second)
    second.start()
    first.kill_group()

    wait_for("the queued dev-b run on the survivor", lambda: _states(second).get("bbbb") == "done")
    wait_for(
        "the killed replica's run to be marked interrupted",
        lambda: _states(second).get("aaaa") == "interrupted",
        timeout=30,
    )
    assert sorted(_lines(log)) == ["acted dev-b", "start dev-a", "start dev-b"]
    again = second.post(_mark("dev-a", "aaaa")).json()  # Alertmanager re-sends the group
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
