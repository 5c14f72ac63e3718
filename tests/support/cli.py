"""Run the real ``remediate`` CLI as a subprocess, the way an operator or a script does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


#: The command line that runs the CLI with this interpreter (no installed script needed).
REMEDIATE = (sys.executable, "-c", "from engine.cli import main; main()")


def remediate_env(state_dir: Path) -> dict[str, str]:
    """The environment of a CLI run: its own state dir, user ``tester``."""
    return {**os.environ, "REMEDIATE_STATE_DIR": str(state_dir), "REMEDIATE_USER": "tester"}


def run_remediate(
    args: Sequence[str],
    state_dir: Path,
    *,
    cwd: Path = ROOT,
    timeout: float = 600,
    umask: int | None = None,
    env_extra: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``remediate ARGS`` with its own state dir, as user ``tester``; never raises on exit codes.

    ``umask``: the one the process starts with (by default this process's); ``env_extra``:
    more environment variables.
    """
    return subprocess.run(
        [*REMEDIATE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**remediate_env(state_dir), **(env_extra or {})},
        check=False,
        timeout=timeout,
        umask=-1 if umask is None else umask,
    )


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON report a ``-o json`` run printed; it must have exited 0 or 1 (an outcome)."""
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def apply_runbook(runbook: str, inventory: Path, state_dir: Path, *extra: str) -> dict[str, Any]:
    """``remediate run RUNBOOK -i INVENTORY --apply --yes -o json EXTRA``: the report."""
    args = ["run", runbook, "-i", str(inventory), "--apply", "--yes", "-o", "json", *extra]
    return report_of(run_remediate(args, state_dir))
