"""A real Alertmanager notifies the real server (uvicorn), which runs real Ansible exactly once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.alertmanager import Alertmanager
from tests.support.ports import free_port
from tests.support.webhook import (
    MARK_PLAYBOOK,
    TOKEN,
    ServerProcess,
    mark_runbook,
    now_text,
    wait_for,
    write_project,
)

pytestmark = pytest.mark.integration

HOSTS: dict[str, dict[str, str]] = {"dev-a": {}, "dev-b": {}}


def _firing(server: ServerProcess, edge: str) -> dict[str, Any] | None:
    alerts = server.get("/alerts?limit=100").json()["alerts"]
    return next((a for a in alerts if a["labels"].get("edge") == edge), None)


def test_alertmanager_resends_but_each_firing_runs_once(
    tmp_path: Path,
    start_alertmanager: Callable[[str, str], Alertmanager],
    server_processes: list[ServerProcess],
) -> None:
    """Alerts pushed into Alertmanager reach the server; re-sends are deduplicated; one run each."""
    log = tmp_path / "acted.log"
    project = write_project(
        tmp_path,
        runbooks={"mark.yml": mark_runbook(log)},
        playbooks={"mark.yml": MARK_PLAYBOOK},
        hosts=HOSTS,
    )
    port = free_port()
    config = project.write_config(
        f"listen: {{port: {port}}}\nauth: {{token: {TOKEN}}}\nworkers: 2\n"
    )
    server = ServerProcess(project, config, port)
    server_processes.append(server)
    server.start()
    manager = start_alertmanager(f"{server.url}/webhook", TOKEN)

    manager.push(
        [
            {"labels": {"alertname": "MarkMe", "edge": "dev-a"}},
            {"labels": {"alertname": "MarkMe", "edge": "dev-b"}},
            {"labels": {"alertname": "MarkMe", "edge": "dev-a; touch /tmp/remediate-pwned"}},
        ]
    )

    def resent_and_done() -> bool:
        items = server.get("/queue").json()["items"]
        done = [i for i in items if i["state"] == "done"]
        a, b = _firing(server, "dev-a"), _firing(server, "dev-b")
        return (
            len(done) == 2
            and a is not None
            and b is not None
            and (a["times_seen"] >= 3 and b["times_seen"] >= 3)
        )

    wait_for("both runs done and the groups re-sent twice", resent_and_done, timeout=90)
    lines = log.read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("acted")) == [
        "acted dev-a",
        "acted dev-b",
    ]
    items = server.get("/queue").json()["items"]
    assert sorted(i["host"] for i in items) == ["dev-a", "dev-b"]
    assert {i["run_status"] for i in items} == {"succeeded"}
    hostile = _firing(server, "dev-a; touch /tmp/remediate-pwned")
    assert hostile is not None
    assert hostile["outcome"] == "unresolved"
    assert not Path("/tmp/remediate-pwned").exists()
    metrics = server.get("/metrics").text
    assert "remediate_alerts_deduplicated_total" in metrics

    manager.push([{"labels": {"alertname": "MarkMe", "edge": "dev-a"}, "endsAt": now_text()}])

    def resolved() -> bool:
        firing = _firing(server, "dev-a")
        return firing is not None and firing["status"] == "resolved"

    wait_for("the resolved notification", resolved, timeout=60)
    assert len(server.get("/queue").json()["items"]) == 2
    assert log.read_text().splitlines().count("acted dev-a") == 1
