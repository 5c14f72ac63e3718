"""FakeExecutor: table-driven answers and a record of every call."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.executors.base import (
    Executor,
    HostStatus,
    PlaybookRequest,
    PlaybookResult,
    SelectingExecutor,
    Selection,
)
from engine.executors.fake import FakeExecutor, FakeReply

INV = Path("inventory.ini")


def test_script_answers_from_table() -> None:
    """Hosts answer with their reply, a script-dependent callable, or unreachable."""
    fake = FakeExecutor(
        scripts={
            "ok": FakeReply(stdout="42\n"),
            "bad": FakeReply(rc=2, stdout="partial"),
            "gone": FakeReply(unreachable="connection refused"),
            "echo": lambda script: script.upper(),
        }
    )
    executor: Executor = fake
    results = executor.run_script(INV, ["ok", "bad", "gone", "echo", "ghost"], "df", timeout=5)
    assert results["ok"].status is HostStatus.OK
    assert results["ok"].stdout == "42\n"
    assert (results["bad"].status, results["bad"].rc, results["bad"].stdout) == (
        HostStatus.FAILED,
        2,
        "partial",
    )
    assert results["gone"].status is HostStatus.UNREACHABLE
    assert results["gone"].message == "connection refused"
    assert results["echo"].stdout == "DF"
    assert results["ghost"].status is HostStatus.FAILED
    assert fake.script_calls[0].hosts == ("ok", "bad", "gone", "echo", "ghost")
    assert fake.script_calls[0].script == "df"


def test_playbook_calls_are_recorded() -> None:
    """Playbook requests are recorded; hosts default to ok or answer from the table."""
    fake = FakeExecutor(
        playbooks={
            "b": HostStatus.FAILED,
            "c": lambda req, host: PlaybookResult(
                host=host, status=HostStatus.OK, message=req.label
            ),
        }
    )
    assert fake.playbook_calls == []
    request = PlaybookRequest(playbook=Path("playbooks/x.yml"), hosts=("a", "b", "c"), label="s1")
    results = fake.run_playbook(INV, request, artifacts_dir=Path("arts"))
    assert [r.status for r in results.values()] == [HostStatus.OK, HostStatus.FAILED, HostStatus.OK]
    assert results["c"].message == "s1"
    assert fake.playbooks_run == (Path("playbooks/x.yml"),)
    assert fake.playbook_calls[0].request == request


def test_selection_comes_from_the_host_table_and_only_kept_hosts_answer() -> None:
    """The fake selects from its own host table, reads no inventory file, answers kept hosts."""
    fake = FakeExecutor(
        scripts={"a": FakeReply(stdout="up\n"), "c": FakeReply(stdout="up\n")},
        hosts={"a": {"x": 1}, "b": {}, "c": {}, "d": {}},
        groups={"fleet": ["a", "b", "c"]},
    )
    executor: SelectingExecutor = fake
    missing = Path("/nonexistent/inventory.yml")
    selection = Selection(inventory=missing, pattern="fleet", limit="!b", only=("a", "ghost"))
    result = executor.select_and_run_script(selection, "uptime", timeout=5)
    assert [(h.name, h.vars) for h in result.hosts] == [("a", {"x": 1}), ("c", {})]
    assert list(result.results) == ["a"]
    assert result.results["a"].stdout == "up\n"
    assert fake.script_calls[0].hosts == ("a",)


@pytest.mark.parametrize(
    ("pattern", "limit", "selected"),
    [
        ("all", None, ["a", "b", "c", "d"]),
        ("fleet", "b:d", ["b"]),
        ("fleet,d", "!c", ["a", "b", "d"]),
        ("!a:fleet", None, ["b", "c"]),  # unions first, whatever the order written
        ("all:&fleet:!b", None, ["a", "c"]),
        ("*", "ghost", []),  # an unknown name selects nothing, as in Ansible
    ],
)
def test_selection_follows_ansibles_pattern_rules(
    pattern: str, limit: str | None, selected: list[str]
) -> None:
    """Unions, intersections, exclusions and groups select as Ansible selects them."""
    fake = FakeExecutor(hosts=["a", "b", "c", "d"], groups={"fleet": ["a", "b", "c"]})
    result = fake.select_and_run_script(
        Selection(inventory=INV, pattern=pattern, limit=limit), "true", timeout=5
    )
    assert [h.name for h in result.hosts] == selected


@pytest.mark.parametrize("pattern", ["dev*", "~^a$", "@limit.txt"])
def test_selection_refuses_patterns_it_cannot_answer_exactly(pattern: str) -> None:
    """Globs, regexes and @file limits are refused: only real Ansible answers them."""
    fake = FakeExecutor(hosts=["a"])
    with pytest.raises(ValueError, match="unsupported host pattern"):
        fake.select_and_run_script(Selection(inventory=INV, pattern=pattern), "true", timeout=5)
