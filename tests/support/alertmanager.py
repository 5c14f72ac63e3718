"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) on loopback.

Clustering is off, storage is a temp dir, and the route's timings are tiny so a test sees a
group notified, re-sent (``repeat_interval``) and resolved within seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _config(webhook_url: str | list[str], token: str, repeat_interval: str) -> str:
    urls = [webhook_url] if isinstance(webhook_url, str) else webhook_url
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
                            "url": url,
                            "send_resolved": True,
                            "http_config": {"authorization": {"credentials": token}},
                        }
                        for url in urls
                    ],
                }
            ],
        }
    )


@pytest.fixture
def start_alertmanager(
    tmp_path: Path,
) -> Iterator[Callable[[str | list[str], str], Alertmanager]]:
    """Start an Alertmanager notifying ``webhook_url`` (or several), bearer ``token``."""
    if not Path(ALERTMANAGER).exists() or shutil.which("amtool") is None:
        pytest.skip("prometheus-alertmanager is not installed")
    started: list[Alertmanager] = []

    def start(webhook_url: str | list[str], token: str) -> Alertmanager:
        base = tmp_path / f"alertmanager{len(started)}"
        base.mkdir()
        config = base / "alertmanager.yml"
        config.write_text(_config(webhook_url, token, repeat_interval="2s"))
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
