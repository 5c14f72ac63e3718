"""What ``remediate serve`` logs on stderr: notifications, runs, shutdown; never a secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.replicas import mark, project_for
from tests.support.webhook import TOKEN, ServerProcess, wait_for

pytestmark = pytest.mark.integration

HMAC_KEY = "hmac-key-for-the-log-test-0123456789"
APPROVER = "alice-approves-with-this-0123456789"


def _events(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]


def test_serve_logs_notifications_and_runs_as_json_lines_and_never_a_secret(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """Not on a terminal: JSON lines for each notification and run, no token, key or header."""
    project, _ = project_for(tmp_path, pause=0)
    port = free_port()
    config = project.write_config(
        f"listen: {{port: {port}}}\nauth: {{token: {TOKEN}, hmac_key: {HMAC_KEY}}}\n"
        f"workers: 1\napprovals: {{approvers: {{alice: {APPROVER}}}}}\n"
    )
    server = ServerProcess(project, config, port, args=["--log-level", "debug"])
    server_processes.append(server)
    server.start()
    payload = json.dumps(mark("dev-b", "bbbb")).encode()
    signature = hmac.new(HMAC_KEY.encode(), payload, hashlib.sha256).hexdigest()
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "X-Remediate-Signature": f"sha256={signature}",
        "Content-Type": "application/json",
    }
    answer = httpx.post(f"{server.url}/webhook", content=payload, headers=headers, timeout=10)
    assert answer.status_code == 202
    # A wrong credential (an approver's token, a secret too) is refused, and not logged.
    refused = httpx.post(
        f"{server.url}/webhook",
        content=payload,
        headers={**headers, "Authorization": f"Bearer {APPROVER}"},
        timeout=10,
    )
    assert refused.status_code == 401
    wait_for(
        "the run to finish",
        lambda: any(e["event"] == "queue.finished" for e in _events(server)),
    )
    server.signal(signal.SIGTERM)
    assert server.wait() == 0

    text = server.log.read_text()
    for secret in (TOKEN, HMAC_KEY, APPROVER, signature):
        assert secret not in text
    events = _events(server)  # every line is a JSON object (stderr is not a terminal)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)
    assert by_name["server.listening"][0]["url"] == f"http://127.0.0.1:{port}"
    accepted, unauthenticated = by_name["webhook"]
    assert (accepted["status"], accepted["new"], accepted["queued"]) == (202, 1, 1)
    assert accepted["level"] == "info"
    assert accepted["latency_ms"] > 0
    assert unauthenticated["status"] == 401
    (started,) = by_name["queue.started"]
    (finished,) = by_name["queue.finished"]
    assert (started["runbook"], started["host"]) == ("mark", "dev-b")
    assert (finished["runbook"], finished["host"], finished["status"]) == (
        "mark",
        "dev-b",
        "succeeded",
    )
    assert finished["duration_s"] > 0
    # --log-level debug: the run's own pipeline events too, marked debug.
    assert {e["level"] for e in by_name["run.finished"]} == {"debug"}
    assert "server.stopped" in by_name
    assert "uvicorn" not in text  # no access log of its own
