"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) on loopback.

Clustering is off, storage is a temp dir, and the route's timings are tiny so a test sees a
group notified, re-sent (``repeat_interval``) and resolved within seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.support.webhook import free_port, wait_for

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


@dataclass
class Alertmanager:
    """A running Alertmanager and its v2 API."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def push(self, alerts: list[dict[str, Any]]) -> None:
        """POST alerts to ``/api/v2/alerts`` (what Prometheus does)."""
        response = httpx.post(f"{self.url}/api/v2/alerts", json=alerts, timeout=10)
        assert response.status_code == 200, response.text


@dataclass(frozen=True)
class ClientTls:
    """What Alertmanager presents and trusts when notifying over HTTPS (``tls_config``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class StartAlertmanager(Protocol):
    """Start an Alertmanager notifying ``webhook_url`` with bearer ``token`` (and TLS)."""

    def __call__(
        self, webhook_url: str, token: str, *, tls: ClientTls | None = None
    ) -> Alertmanager:
        """Start it and wait until it is ready."""
        ...


def _config(webhook_url: str, token: str, repeat_interval: str, tls: ClientTls | None) -> str:
    http_config: dict[str, Any] = {"authorization": {"credentials": token}}
    if tls is not None:
        http_config["tls_config"] = {
            "ca_file": str(tls.ca_file),
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
        }
    return json.dumps(
        {
            "route": {
                "receiver": "remediate",
                "group_by": ["alertname", "edge"],
                "group_wait": "200ms",
                "group_interval": "1s",
                "repeat_interval": repeat_interval,
            },
            "receivers": [
                {
                    "name": "remediate",
                    "webhook_configs": [
                        {
                            "url": webhook_url,
                            "send_resolved": True,
                            "http_config": http_config,
                        }
                    ],
                }
            ],
        }
    )


@pytest.fixture
def start_alertmanager(tmp_path: Path) -> Iterator[StartAlertmanager]:
    """Start an Alertmanager notifying ``webhook_url`` with bearer ``token``; stopped after."""
    if not Path(ALERTMANAGER).exists() or shutil.which("amtool") is None:
        pytest.skip("prometheus-alertmanager is not installed")
    started: list[Alertmanager] = []

    def start(webhook_url: str, token: str, *, tls: ClientTls | None = None) -> Alertmanager:
        base = tmp_path / f"alertmanager{len(started)}"
        base.mkdir()
        config = base / "alertmanager.yml"
        config.write_text(_config(webhook_url, token, repeat_interval="2s", tls=tls))
        check = subprocess.run(
            ["amtool", "check-config", str(config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = base / "alertmanager.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    ALERTMANAGER,
                    f"--config.file={config}",
                    f"--storage.path={base / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                    "--log.level=debug",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        manager = Alertmanager(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
        started.append(manager)

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"alertmanager exited {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(f"{manager.url}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("alertmanager to be ready", ready, timeout=30)
        return manager

    yield start
    for manager in started:
        manager.proc.terminate()
        try:
            manager.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            manager.proc.kill()
            manager.proc.wait()
