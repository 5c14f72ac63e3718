"""The webhook over mutual TLS: a client needs a certificate from the CA; Alertmanager delivers.

One server for the module: HTTPS with client certificates, its token from the environment,
started with umask 000; its runbook's step echoes the token (as a misconfigured command
would) and fails.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.alertmanager import ClientTls, StartAlertmanager
from tests.support.tls import Authority, Issued, certificate_authority
from tests.support.webhook import (
    ROOT,
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

#: Appends ``acted <host>`` to the log, prints the token the way a careless command prints a
#: credential it was given, shows whether it sees the server's own variable, then fails.
ECHO_PLAYBOOK = f"""\
- name: Act and print a credential
  hosts: all
  gather_facts: false
  tasks:
    - name: Act, then echo
      ansible.builtin.raw: >-
        echo "acted {{{{ inventory_hostname }}}}" >> {{{{ log | quote }}}};
        echo "Authorization: Bearer {TOKEN}";
        printf 'user:%s' '{TOKEN}' | base64;
        echo "env: [${{REMEDIATE_WEBHOOK_TOKEN:-withheld}}]";
        echo "curl: 401 for {TOKEN}" >&2;
        exit 7
"""


@dataclass(frozen=True)
class TlsServer:
    """The running server and what a test needs to speak to it."""

    server: ServerProcess
    project: Project
    acted: Path
    ca: Authority
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A server on HTTPS requiring client certificates from a CA made here."""
    root = tmp_path_factory.mktemp("tls")
    acted = root / "acted.log"
    project = write_project(
        root / "project",
        runbooks={"mark.yml": mark_runbook(acted)},
        playbooks={"mark.yml": ECHO_PLAYBOOK},
        hosts={"dev-a": {}, "dev-b": {}},
    )
    ca = certificate_authority(root / "pki", "remediate")
    cert = ca.issue("server", server=True)
    client = ca.issue("alertmanager", server=False)
    stranger = certificate_authority(root / "other", "other").issue("stranger", server=False)
    port = free_port()
    config = project.write_config(
        f"listen: {{port: {port}, tls: {{cert: {cert.cert}, key: {cert.key}, "
        f"client_ca: {ca.cert}}}}}\nworkers: 1\n"
    )
    server = ServerProcess(
        project,
        config,
        port,
        tls=ca.client_context(client),
        umask=0o000,
        env={"REMEDIATE_WEBHOOK_TOKEN": TOKEN},
    )
    server.start()
    try:
        yield TlsServer(server, project, acted, ca, client, stranger)
    finally:
        server.kill_group()


def _done(server: ServerProcess, host: str) -> bool:
    items = server.get("/queue?limit=100").json()["items"]
    return any(i["host"] == host and i["state"] in {"done", "failed"} for i in items)


def test_the_server_says_https_and_refuses_plain_http(tls_server: TlsServer) -> None:
    """The start line names https; a plain HTTP request gets no answer at all."""
    server = tls_server.server
    assert f"listening on https://127.0.0.1:{server.port}" in server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)


def test_a_missing_or_foreign_client_certificate_is_refused(tls_server: TlsServer) -> None:
    """HTTPS without a client certificate, or with one from another CA, is cut off."""
    url = f"{tls_server.server.url}/healthz"
    for client in (None, tls_server.stranger):
        with pytest.raises(httpx.TransportError):
            httpx.get(
                url, verify=tls_server.ca.client_context(client), timeout=5
            ).raise_for_status()
    good = tls_server.ca.client_context(tls_server.client)
    assert httpx.get(url, verify=good, timeout=5).status_code == 200
    # The certificate opens the connection; the token is still needed on top of it.
    assert httpx.post(f"{tls_server.server.url}/webhook", json={}, verify=good).status_code == 401


def test_alertmanager_delivers_over_mutual_tls_and_the_run_happens(
    tls_server: TlsServer, start_alertmanager: StartAlertmanager
) -> None:
    """The real Alertmanager with tls_config (CA, client certificate) notifies; a run acts."""
    manager = start_alertmanager(
        f"{tls_server.server.url}/webhook",
        TOKEN,
        tls=ClientTls(
            ca_file=tls_server.ca.cert,
            cert_file=tls_server.client.cert,
            key_file=tls_server.client.key,
        ),
    )
    manager.push([{"labels": {"alertname": "MarkMe", "edge": "dev-a"}}])
    wait_for("the alert's run", lambda: _done(tls_server.server, "dev-a"), timeout=90)
    assert "acted dev-a" in tls_server.acted.read_text().splitlines()


def test_the_server_keeps_private_files_without_its_token(tls_server: TlsServer) -> None:
    """Started under umask 000, the server writes 0700/0600 only; its token is in no file."""
    server = tls_server.server
    notified = server.post(body(alert({"alertname": "MarkMe", "edge": "dev-b"}, fingerprint="b1")))
    assert notified.status_code == 202, notified.text
    wait_for("the alert's run", lambda: _done(server, "dev-b"), timeout=90)

    state = tls_server.project.state
    entries = [state, *state.rglob("*")]
    modes = {str(p): stat.S_IMODE(p.lstat().st_mode) for p in entries}
    assert {m for p, m in modes.items() if Path(p).is_dir()} == {0o700}, modes
    assert {m for p, m in modes.items() if not Path(p).is_dir()} == {0o600}, modes
    names = {p.name for p in entries}
    assert {"state.db", "state.db-wal", "audit.jsonl", "server.lock", "stdout"} <= names
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()[8:-4]
    for path in (p for p in entries if p.is_file()):
        data = path.read_bytes().decode("utf-8", errors="replace")
        assert TOKEN not in data, path
        assert basic not in data, path
    events = [
        json.loads(p.read_text())
        for p in state.rglob("job_events/*.json")
        if "dev-b" in p.read_text()
    ]
    printed = [e["event_data"]["res"]["stdout"] for e in events if e["event"] == "runner_on_failed"]
    assert len(printed) == 1
    assert "Authorization: Bearer [REDACTED]" in printed[0]
    assert "env: [withheld]" in printed[0]  # ansible-playbook never saw the server's variable


def test_a_key_readable_by_others_stops_the_start(tmp_path: Path) -> None:
    """`serve` with a private key group or others can read exits 2 naming the key file."""
    ca = certificate_authority(tmp_path / "pki", "remediate")
    cert = ca.issue("server", server=True)
    cert.key.chmod(0o640)
    project = write_project(tmp_path / "project", runbooks={})
    config = project.write_config(
        f"listen: {{port: {free_port()}, tls: {{cert: {cert.cert}, key: {cert.key}}}}}\n"
        f"auth: {{token: {TOKEN}}}\n"
    )
    started = subprocess.run(
        [sys.executable, "-m", "engine.server", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "REMEDIATE_STATE_DIR": str(project.state)},
    )
    assert started.returncode == 2, started.stderr
    assert f"{cert.key}: listen.tls.key: the private key is readable" in started.stderr
    assert not project.state.exists()
