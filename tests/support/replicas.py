"""Replicas of ``remediate serve`` on one state URL, and the project they run (mark runbook)."""

from __future__ import annotations

from pathlib import Path

from tests.support.webhook import (
    MARK_PLAYBOOK,
    TOKEN,
    Project,
    ServerProcess,
    alert,
    body,
    free_port,
    mark_runbook,
    write_project,
)

HOSTS: dict[str, dict[str, str]] = {"dev-a": {}, "dev-b": {}}


def mark(edge: str, fingerprint: str) -> dict[str, object]:
    """A MarkMe notification for ``edge``."""
    return body(alert({"alertname": "MarkMe", "edge": edge}, fingerprint=fingerprint))


def project_for(tmp_path: Path, pause: int) -> tuple[Project, Path]:
    """The mark runbook (slow on dev-a by ``pause`` s) over dev-a and dev-b; the acted log."""
    log = tmp_path / "acted.log"
    project = write_project(
        tmp_path,
        runbooks={"mark.yml": mark_runbook(log, slow_hosts="dev-a", pause=pause)},
        playbooks={"mark.yml": MARK_PLAYBOOK},
        hosts=HOSTS,
    )
    return project, log


def new_replica(project: Project, url: str, name: str, workers: int = 1) -> ServerProcess:
    """A server process (not started) on ``url``, leases of 3 s, its own port and log."""
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
    config.chmod(0o600)  # it holds the token: the server refuses it readable by others
    server = ServerProcess(project, config, port)
    server.log = project.root / f"{name}.log"
    return server


def lines(log: Path) -> list[str]:
    """The acted log's lines."""
    return log.read_text().splitlines() if log.exists() else []


def states(server: ServerProcess) -> dict[str, str]:
    """Queue item state by fingerprint."""
    return {i["fingerprint"]: i["state"] for i in server.get("/queue").json()["items"]}
