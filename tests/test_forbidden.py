"""No runbook or playbook uses a command BALENA.md §4 forbids (volumes, purge, reset marker).

Nor anything that removes or re-creates the balena Supervisor or touches its database; and the
supervisor-unhealthy runbook restarts nothing but the Supervisor's own unit.
"""

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
    (
        "remove the Supervisor's container",
        re.compile(r"\b(rm|container\s+rm|container\s+prune)\b[^\n;|&]*(balena|resin)_supervisor"),
    ),
    ("remove the Supervisor's image", re.compile(r"\b(rmi|image\s+rm)\b[^\n;|&]*supervisor")),
    (
        "write to the Supervisor's database",
        re.compile(
            r"\b(rm|mv|cp|truncate|shred|chmod|chown|sqlite3|touch|mkdir|rmdir|ln|tee|dd)\b"
            r"[^\n;|&]*resin-data|>>?\s*[\"']?/\S*resin-data"
        ),
    ),
)
#: What supervisor-unhealthy may run with systemctl: reads, and a restart of its own unit.
SUPERVISOR_RUNBOOK = ROOT / "runbooks" / "supervisor-unhealthy.yml"
_SYSTEMCTL = re.compile(
    r"\bsystemctl[ \t]+(?:-\S+[ \t]+)*([a-z-]+)((?:[ \t]+[A-Za-z0-9@._\"$-]+)*)"
)
_READ_ONLY_VERBS = frozenset({"show", "status", "is-active", "is-failed", "is-enabled", "cat"})


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


def _supervisor_runbook_commands() -> str:
    """Everything supervisor-unhealthy can run: its checks and its steps' playbooks."""
    text = _commands_of_runbook(SUPERVISOR_RUNBOOK)
    data = yaml.safe_load(SUPERVISOR_RUNBOOK.read_text(encoding="utf-8"))
    for step in data["steps"]:
        playbook = ROOT / "playbooks" / step["playbook"]
        text += _without_comments(playbook.read_text(encoding="utf-8"))
    return text


def systemctl_actions(text: str) -> set[str]:
    """Every ``systemctl VERB UNIT...`` in ``text`` that is not a read, as 'verb unit...'.

    Quotes and a ``.service`` suffix are dropped; plan lines count as much as commands.
    """
    found = set()
    for verb, units in _SYSTEMCTL.findall(text):
        if verb in _READ_ONLY_VERBS:
            continue
        names = [u.strip('"').removesuffix(".service") for u in units.split()]
        found.add(" ".join([verb, *names]))
    return found


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
        "balena rm -f balena_supervisor",
        'docker container rm "resin_supervisor"',
        "balena rmi balena/amd64-supervisor:v14.11.3",
        "rm -rf /mnt/data/resin-data/balena-supervisor/database.sqlite",
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
        "balena inspect balena_supervisor",
        "balena stop balena_supervisor",
    ],
)
def test_scanner_allows_safe_commands(command: str) -> None:
    """Safe look-alikes are not flagged."""
    assert violations(command) == []


def test_supervisor_runbook_restarts_only_the_supervisor_unit() -> None:
    """supervisor-unhealthy changes nothing with systemctl but a restart of balena-supervisor."""
    assert systemctl_actions(_supervisor_runbook_commands()) == {"restart balena-supervisor"}


def test_supervisor_runbook_never_changes_containers_or_images() -> None:
    """supervisor-unhealthy asks the engine only read-only things (ps, inspect)."""
    text = _supervisor_runbook_commands()
    verbs = re.findall(r'"\$(?:param_engine_)?cli" +([a-z]+)', text)
    assert set(verbs) == {"ps", "inspect"}
    assert not re.search(r"\b(balena|docker|balena-engine) +(?!ps\b|inspect\b)[a-z]+", text)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("systemctl restart balena.service", {"restart balena"}),
        ('systemctl -q stop "$unit" balena-supervisor', {"stop $unit balena-supervisor"}),
        ('systemctl show -p NRestarts "$unit"; systemctl is-active -q x', set()),
    ],
)
def test_systemctl_scan_is_not_vacuous(command: str, expected: set[str]) -> None:
    """The systemctl scan finds state changes and lets reads through."""
    assert systemctl_actions(command) == expected
