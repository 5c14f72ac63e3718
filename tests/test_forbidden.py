"""No runbook or playbook uses a command BALENA.md §4 forbids (volumes, purge, reset marker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

#: (name, pattern) pairs from BALENA.md §4; checked against commands, not prose.
FORBIDDEN = (
    ("system prune -a / --all", re.compile(r"system\s+prune\b[^\n;|&]*\s(-a\b|--all\b|-[a-z]*a)")),
    ("system prune --volumes", re.compile(r"system\s+prune\b[^\n;|&]*--volumes")),
    ("volume prune", re.compile(r"\bvolume\s+prune\b")),
    ("volume rm", re.compile(r"\bvolume\s+(rm|remove)\b")),
    ("supervisor purge", re.compile(r"/v1/purge|/v2/applications/[^\s/]+/purge")),
    ("remove_me_to_reset", re.compile(r"remove_me_to_reset")),
    ("rm in overlay2 (other than l/ links)", re.compile(r"\brm\b[^\n;|&]*overlay2/(?!l/)")),
    ("rm of volume data", re.compile(r"\brm\b[^\n;|&]*/volumes/")),
)


def _commands_of_runbook(path: Path) -> str:
    """Everything a runbook can run: the file minus its prose (metadata), plus its scripts."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.pop("metadata", None)
    text = yaml.safe_dump(data)
    for check in data.get("checks", []):
        if "run_file" in check:
            text += (path.parent / check["run_file"]).read_text(encoding="utf-8")
    return text


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _sources() -> list[tuple[str, str]]:
    out = [(str(p), _commands_of_runbook(p)) for p in sorted((ROOT / "runbooks").glob("*.yml"))]
    out += [
        (str(p), _without_comments(p.read_text(encoding="utf-8")))
        for p in sorted((ROOT / "playbooks").rglob("*.yml"))
    ]
    out += [
        (str(p), _without_comments(p.read_text(encoding="utf-8")))
        for p in sorted((ROOT / "runbooks" / "checks").glob("*.sh"))
    ]
    return out


def violations(text: str) -> list[str]:
    """Names of the forbidden commands ``text`` contains."""
    return [name for name, pattern in FORBIDDEN if pattern.search(text)]


@pytest.mark.parametrize(
    ("path", "text"), _sources(), ids=lambda v: Path(v).name if "/" in v else ""
)
def test_no_forbidden_command(path: str, text: str) -> None:
    """The file contains none of the forbidden commands."""
    assert violations(text) == [], path


@pytest.mark.parametrize(
    "command",
    [
        "balena system prune -af",
        "balena system prune --all --force",
        "docker system prune -f --volumes",
        "balena volume prune -f",
        "balena volume rm data",
        "curl -X POST localhost:48484/v1/purge",
        "curl -X POST localhost:48484/v2/applications/12/purge",
        "rm -f /mnt/data/remove_me_to_reset",
        "rm -rf /var/lib/docker/overlay2/abc123",
        "rm -rf /var/lib/docker/volumes/app/_data/x",
    ],
)
def test_scanner_catches_each_forbidden_command(command: str) -> None:
    """The scan is not vacuous: each forbidden command is caught."""
    assert violations(command)


@pytest.mark.parametrize(
    "command",
    [
        "balena image prune -f",
        "rm -f /var/lib/docker/overlay2/l/ABCDEF",
        "balena volume ls",
    ],
)
def test_scanner_allows_safe_commands(command: str) -> None:
    """Safe look-alikes are not flagged."""
    assert violations(command) == []
