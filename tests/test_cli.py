"""The command line: validate, list, show; exit codes and no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import run_cli
from engine.schema import SCHEMA_PATH, runbook_schema_text

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _project_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run each CLI test from the project root with a private state dir."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("REMEDIATE_STATE_DIR", str(tmp_path / "state"))


def test_validate_bundled_runbooks_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """`remediate validate` on the default folder passes."""
    assert run_cli(["validate"]) == 0
    assert "ok" in capsys.readouterr().out


def test_validate_corpus_exits_two_with_locations(capsys: pytest.CaptureFixture[str]) -> None:
    """The broken corpus exits 2 and every file is named with a line number."""
    assert run_cli(["validate", str(DATA / "invalid")]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    for path in (DATA / "invalid").glob("*.yml"):
        assert f"{path}:" in out.out


def test_validate_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    """`-o json` reports per file, with structured problems."""
    bad = DATA / "invalid" / "unknown-parse-kind.yml"
    assert run_cli(["validate", str(DATA / "valid"), str(bad), "-o", "json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    by_file = {Path(f["file"]).name: f for f in report["files"]}
    assert by_file["base.yml"]["ok"] is True
    (problem,) = by_file["unknown-parse-kind.yml"]["problems"]
    assert problem["field"] == "checks[0].parse"
    assert isinstance(problem["line"], int)


def test_validate_missing_path_is_input_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist exits 2 with a one-line message."""
    assert run_cli(["validate", "no/such/dir"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`remediate list -o json` names every bundled runbook."""
    assert run_cli(["list", "-o", "json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert "data-partition-full" in names


def test_show_prints_operator_view(capsys: pytest.CaptureFixture[str]) -> None:
    """`remediate show` prints what the runbook checks, guards, does and never does."""
    assert run_cli(["show", "data-partition-full"]) == 0
    out = capsys.readouterr().out
    for needle in ("It will never", "Guards", "Steps", "Verify", "Policy"):
        assert needle in out


def test_show_unknown_runbook_is_input_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown runbook name exits 2."""
    assert run_cli(["show", "nope"]) == 2
    assert "no runbook named 'nope'" in capsys.readouterr().err


def test_console_script_runs_without_traceback() -> None:
    """The installed entry point answers --help and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-c", "from engine.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0
    assert "Exit codes" in proc.stdout


def test_usage_errors_exit_two_with_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing option, an unknown option or no command at all is invalid input (exit 2)."""
    assert run_cli(["plan", "stale-probe-scratch"]) == 2
    err = capsys.readouterr().err
    assert "Usage: remediate plan" in err
    assert "Missing option '--inventory'" in err
    assert run_cli(["--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err
    assert run_cli([]) == 2
    assert "Commands:" in capsys.readouterr().err
    assert run_cli(["lab", "inject"]) == 2
    assert "Usage: remediate lab inject" in capsys.readouterr().err


def test_lab_help_through_the_remediate_command() -> None:
    """`remediate lab --help` lists the lab's commands under the remediate program name."""
    proc = subprocess.run(
        [sys.executable, "-c", "from engine.cli import main; main()", "lab", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0
    assert "Usage: remediate lab [OPTIONS] COMMAND" in proc.stdout
    for command in ("up", "down", "status", "inject", "clear"):
        assert f"  {command} " in proc.stdout


def test_importing_the_cli_loads_only_what_every_command_needs() -> None:
    """Registering the commands imports no stage, no Ansible, no lab and no server module."""
    code = "import sys, engine.cli; print('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = set(proc.stdout.split())
    assert "engine.cli.runs" in loaded
    heavy = {
        "engine.pipeline",
        "engine.state",
        "engine.runbooks",
        "engine.lab",
        "engine.server",
        "ansible_runner",
        "structlog",
        "click",
    }
    assert loaded & heavy == set()


def test_schema_file_is_up_to_date() -> None:
    """The committed JSON Schema matches the models (regenerate: python -m engine.schema)."""
    assert SCHEMA_PATH.read_text(encoding="utf-8") == runbook_schema_text()
