"""Probe: the generated script, run by a real POSIX shell, and its parsing."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from engine.executors.base import CommandResult, HostStatus, PlaybookRequest, PlaybookResult
from engine.executors.fake import FakeExecutor, FakeReply
from engine.probes import ProbeStatus, build_probe_script, parse_probe, parse_value, run_probes
from engine.runbooks.spec import Check, ParseKind

#: POSIX shells a device may have as /bin/sh: balenaOS has bash and busybox; Debian has dash.
SHELLS = [
    pytest.param(
        argv, id=argv[0], marks=pytest.mark.skipif(not shutil.which(argv[0]), reason="absent")
    )
    for argv in (("dash",), ("bash", "--posix"), ("busybox", "sh"))
]


class ShellExecutor:
    """Runs probe scripts with a real POSIX shell (by default /bin/sh), no Ansible."""

    def __init__(self, shell: Sequence[str] = ("/bin/sh",), tmpdir: Path | None = None) -> None:
        self.calls = 0
        self.shell = tuple(shell)
        self.env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None

    def run_script(
        self, inventory: Path, hosts: Sequence[str], script: str, *, timeout: float
    ) -> Mapping[str, CommandResult]:
        del inventory
        self.calls += 1
        proc = subprocess.run(
            [*self.shell, "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        status = HostStatus.OK if proc.returncode == 0 else HostStatus.FAILED
        return {
            h: CommandResult(host=h, status=status, rc=proc.returncode, stdout=proc.stdout)
            for h in hosts
        }

    def run_playbook(
        self, inventory: Path, request: PlaybookRequest, *, artifacts_dir: Path
    ) -> Mapping[str, PlaybookResult]:
        del inventory, artifacts_dir
        raise AssertionError(f"probes never run playbooks ({request.playbook})")


def _check(cid: str, run: str, parse: ParseKind = ParseKind.STR, timeout: int = 10) -> Check:
    return Check(id=cid, run=run, parse=parse, timeout=timedelta(seconds=timeout))


def _probe(
    checks: list[Check],
    params: Mapping[str, object] | None = None,
    shell: Sequence[str] = ("/bin/sh",),
    tmpdir: Path | None = None,
) -> dict[str, object]:
    executor = ShellExecutor(shell, tmpdir)
    probes = run_probes(executor, Path("inv"), ["h"], checks, params or {})
    assert executor.calls == 1
    probe = probes["h"]
    assert probe.status is ProbeStatus.OK
    return {cid: (r.value if r.ok else f"ERROR {r.error}") for cid, r in probe.checks.items()}


@pytest.mark.parametrize("shell", SHELLS)
def test_every_parse_kind_from_a_real_shell(shell: Sequence[str]) -> None:
    """One script runs every check, in each shell a device may have; each output is parsed."""
    values = _probe(
        [
            _check("i", "echo 42", ParseKind.INT),
            _check("f", "echo 2.5", ParseKind.FLOAT),
            _check("b", "echo yes", ParseKind.BOOL),
            _check("s", "printf '  hi  \\n'", ParseKind.STR),
            _check("l", "printf 'a\\n\\nb\\n'", ParseKind.LINES),
            _check("j", "echo '{\"k\": [1, 2]}'", ParseKind.JSON),
            _check("kv", "printf 'NRestarts=3\\nActiveState=active\\n'", ParseKind.KV),
            _check("rc", "exit 7", ParseKind.RC),
            _check("ok", "false", ParseKind.OK),
        ],
        shell=shell,
    )
    assert values == {
        "i": 42,
        "f": 2.5,
        "b": True,
        "s": "hi",
        "l": ["a", "b"],
        "j": {"k": [1, 2]},
        "kv": {"NRestarts": "3", "ActiveState": "active"},
        "rc": 7,
        "ok": False,
    }


@pytest.mark.parametrize("shell", SHELLS)
def test_failures_are_values_not_crashes(shell: Sequence[str]) -> None:
    """A failing, unparsable, timed-out or too talkative check is an error; the others parse."""
    values = _probe(
        [
            _check("bad", "echo oops >&2; exit 2", ParseKind.INT),
            _check("nan", "echo many", ParseKind.INT),
            _check("slow", "sleep 5; echo 1", ParseKind.INT, timeout=1),
            _check("big", "head -c 1100000 /dev/zero | tr '\\0' a", ParseKind.STR),
            _check("fine", "echo 1", ParseKind.INT),
        ],
        shell=shell,
    )
    assert values["bad"] == "ERROR int: exit code 2: oops"
    assert str(values["nan"]).startswith("ERROR int: invalid literal")
    assert values["slow"] == "ERROR timed out after 1s"
    assert values["big"] == "ERROR output larger than 1048576 bytes"
    assert values["fine"] == 1


@pytest.mark.parametrize("shell", SHELLS)
def test_timeout_kills_everything_the_check_started(shell: Sequence[str], tmp_path: Path) -> None:
    """A hung check is killed with its children and grandchildren; nothing is left behind."""
    tag = f"{secrets.randbelow(10**6) + 10**6}.25"  # a sleep argument no other process uses
    values = _probe(
        [
            _check("pipe", f"sleep {tag} | cat; echo late", timeout=1),
            _check("nested", f"sh -c 'sleep {tag}; :'; echo late", timeout=1),
            _check("after", "echo 1", ParseKind.INT),
        ],
        shell=shell,
        tmpdir=tmp_path,
    )
    assert values == {
        "pipe": "ERROR timed out after 1s",
        "nested": "ERROR timed out after 1s",
        "after": 1,
    }
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {tag}"], capture_output=True, check=False)
    assert leftovers.stdout == b""
    assert list(tmp_path.iterdir()) == []  # the probe's scratch folder is gone


def test_output_cannot_forge_records_or_escape() -> None:
    """Control bytes, marker-shaped lines and template syntax come back as data (NULs dropped)."""
    nasty = "printf '\\000\\001\\n@@remediate-0000 C fine 0 0 0\\n{{ 7*7 }}'"
    values = _probe([_check("n", nasty, ParseKind.STR), _check("fine", "echo 5", ParseKind.INT)])
    assert values["n"] == "\x01\n@@remediate-0000 C fine 0 0 0\n{{ 7*7 }}"
    assert values["fine"] == 5


def test_params_reach_checks_as_quoted_shell_variables() -> None:
    """A hostile param value is one shell word, never code."""
    hostile = "x'; touch /tmp/remediate-pwned; echo '$(id)"
    values = _probe([_check("p", 'printf %s "$param_v"')], {"v": hostile, "flag": True})
    assert values["p"] == hostile
    assert not Path("/tmp/remediate-pwned").exists()


def test_unreachable_and_broken_hosts() -> None:
    """An unreachable host and one whose script printed no record are outcomes."""
    executor = FakeExecutor(
        scripts={"u": FakeReply(unreachable="no route"), "x": FakeReply(rc=127, stdout="sh: no")}
    )
    probes = run_probes(executor, Path("inv"), ["u", "x"], [_check("a", "true")], {})
    assert probes["u"].status is ProbeStatus.UNREACHABLE
    assert probes["x"].status is ProbeStatus.ERROR
    assert "rc 127" in probes["x"].message


def test_missing_record_is_an_error_for_that_check() -> None:
    """A check whose record never arrived (script died) fails with a clear reason."""
    checks = [_check("a", "true"), _check("b", "true")]
    script = build_probe_script(checks, {}, "@@n")
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    truncated = out.stdout.split("@@n C b")[0]
    probe = parse_probe(
        CommandResult(host="h", status=HostStatus.OK, rc=0, stdout=truncated), checks, "@@n"
    )
    assert probe.checks["a"].ok
    assert probe.checks["b"].error == "no result (the probe script stopped early)"


@pytest.mark.parametrize(("text", "value"), [("true", True), ("0", False), ("active", True)])
def test_bool_words(text: str, value: bool) -> None:
    """Bools accept the usual words, including systemd's `active`."""
    assert parse_value(ParseKind.BOOL, 0, text) is value


@pytest.mark.parametrize("shell", SHELLS)
def test_killed_probe_leaves_no_check_running(shell: Sequence[str], tmp_path: Path) -> None:
    """If the probe script is killed (Ansible gave up), the watchdog stops the check, cleans up."""
    tag = f"{secrets.randbelow(10**6) + 10**6}.75"
    script = build_probe_script([_check("hang", f"sleep {tag}", timeout=600)], {}, "@@n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with subprocess.Popen([*shell, "-c", script], stdout=subprocess.DEVNULL, env=env) as probe:
        running = _wait_for(lambda: _pids(f"sleep {tag}") != [])
        probe.kill()
    assert running
    assert _wait_for(lambda: _pids(f"sleep {tag}") == [] and not any(tmp_path.iterdir()))


@pytest.mark.parametrize("shell", SHELLS)
def test_hung_up_probe_leaves_no_check_running(shell: Sequence[str], tmp_path: Path) -> None:
    """A hang-up of the probe's process group (its ssh went): the watchdog stops it, cleans up."""
    tag = f"{secrets.randbelow(10**6) + 10**6}.25"
    script = build_probe_script([_check("hang", f"sleep {tag}", timeout=600)], {}, "@@n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        [*shell, "-c", script], stdout=subprocess.DEVNULL, env=env, process_group=0
    ) as probe:
        running = _wait_for(lambda: _pids(f"sleep {tag}") != [])
        os.killpg(probe.pid, signal.SIGHUP)
    assert running
    assert _wait_for(lambda: _pids(f"sleep {tag}") == [] and not any(tmp_path.iterdir()))


def _pids(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return found.stdout.split()


def _wait_for(condition: Callable[[], bool], attempts: int = 100) -> bool:
    """Poll ``condition`` every 0.05 s; whether it became true (a bound, not a timing claim)."""
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(0.05)
    return condition()
