"""A real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) on loopback.

Clustering is off, storage is a temp dir, and the route's timings are tiny so a test sees a
group notified, re-sent (``repeat_interval``) and resolved within seconds.  With
``shipped=True`` it runs the project's own ``config/prometheus/alertmanager.yml``, with only
the webhook URL, the token file and the timings replaced.
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
from ruamel.yaml import YAML

from tests.support.processes import start_daemon, stop_daemon
from tests.support.webhook import ROOT, free_port

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
SHIPPED = ROOT / "config" / "prometheus" / "alertmanager.yml"


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
    """Start an Alertmanager notifying ``webhook_url`` (or several) with bearer ``token``."""

    def __call__(
        self,
        webhook_url: str | list[str],
        token: str,
        *,
        shipped: bool = False,
        tls: ClientTls | None = None,
    ) -> Alertmanager:
        """Start it and wait until it is ready."""
        ...


def _config(
    webhook_url: str | list[str], token: str, repeat_interval: str, tls: ClientTls | None
) -> str:
    urls = [webhook_url] if isinstance(webhook_url, str) else webhook_url
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
                            "url": url,
                            "send_resolved": True,
                            "http_config": http_config,
                        }
                        for url in urls
                    ],
                }
            ],
        }
    )


def _shipped_config(webhook_url: str, token_file: Path) -> str:
    """The shipped configuration, sending to ``webhook_url`` with 1 s timings."""
    config = YAML(typ="safe", pure=True).load(SHIPPED.read_text(encoding="utf-8"))
    (receiver,) = [r for r in config["receivers"] if r["name"] == "remediate"]
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = webhook_url
    webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "remediate"]
    for node in (config["route"], route):
        node.update({"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"})
    return json.dumps(config)


@pytest.fixture
def start_alertmanager(tmp_path: Path) -> Iterator[StartAlertmanager]:
    """Start an Alertmanager notifying ``webhook_url`` (or several), bearer ``token``."""
    if not Path(ALERTMANAGER).exists() or shutil.which("amtool") is None:
        pytest.skip("prometheus-alertmanager is not installed")
    started: list[Alertmanager] = []

    def start(
        webhook_url: str | list[str],
        token: str,
        *,
        shipped: bool = False,
        tls: ClientTls | None = None,
    ) -> Alertmanager:
        base = tmp_path / f"alertmanager{len(started)}"
        base.mkdir()
        config = base / "alertmanager.yml"
        if shipped:
            if tls is not None or not isinstance(webhook_url, str):
                raise ValueError("the shipped config is tried with one URL and no client TLS")
            token_file = base / "remediate-token"
            token_file.write_text(token)
            config.write_text(_shipped_config(webhook_url, token_file))
        else:
            config.write_text(_config(webhook_url, token, repeat_interval="2s", tls=tls))
        check = subprocess.run(
            ["amtool", "check-config", str(config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]
        log = base / "alertmanager.log"
        manager = Alertmanager(url=url, proc=start_daemon(argv, log, f"{url}/-/ready"), log=log)
        started.append(manager)
        return manager

    yield start
    for manager in started:
        stop_daemon(manager.proc)
