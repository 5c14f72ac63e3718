"""The CLI's tables at 80 columns: history, approvals list and list, one line per row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.state import HostRecord, RunRecord
from engine.state.sqlite import SqliteStateStore
from tests.support.cli import run_remediate

NOW = datetime.now(UTC).replace(microsecond=0)
RUNBOOK = "data-partition-full-with-a-long-name"


def _seed(state: Path) -> list[str]:
    """Three runs: two old ones on dev-a, one recent degraded on dev-b; their ids."""
    ids = []
    with SqliteStateStore(state / "state.db", clock=lambda: NOW) as store:
        for n, (host, status, age) in enumerate(
            [
                ("dev-a", RunStatus.SUCCEEDED, timedelta(days=3)),
                ("dev-a", RunStatus.SUCCEEDED, timedelta(days=2)),
                ("dev-b", RunStatus.DEGRADED, timedelta(minutes=5)),
            ]
        ):
            run_id = f"{NOW - age:%Y%m%dT%H%M%SZ}-{n:06x}"
            started = NOW - age
            store.start_run(
                RunRecord(
                    run_id=run_id,
                    runbook=RUNBOOK,
                    runbook_digest="sha256:abc",
                    mode=Mode.APPLY,
                    trigger="alert:0123456789abcdef",
                    started_at=started,
                )
            )
            outcome = HostOutcome.FIXED if status is RunStatus.SUCCEEDED else HostOutcome.FAILED
            store.record_host(
                HostRecord(
                    run_id=run_id,
                    host=host,
                    outcome=outcome,
                    reason="",
                    steps=["s"],
                    finished_at=started,
                )
            )
            store.finish_run(run_id, status, {outcome.value: 1, "healthy": 2})
            ids.append(run_id)
    return ids


def _fits(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines), text
    return lines


def test_history_fits_80_columns_one_line_per_run_and_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 80 columns history shows short ids, compact times, counts; --wide and JSON all."""
    monkeypatch.setenv("COLUMNS", "80")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ids = _seed(state)
    shown = run_remediate(["history"], state)
    assert shown.returncode == 0, shown.stderr
    lines = _fits(shown.stdout)
    rows = [line for line in lines if line.split()[0] in {i[-6:] for i in ids}]
    assert [r.split()[0] for r in rows] == [i[-6:] for i in reversed(ids)]
    assert f"{NOW - timedelta(minutes=5):%m-%d %H:%M}" in rows[0]
    assert "degraded" in rows[0]
    assert "1 failed" in rows[0]

    def listed(*args: str) -> list[str]:
        out = run_remediate(["history", "-o", "json", *args], state)
        assert out.returncode == 0, out.stderr
        return [r["run_id"] for r in json.loads(out.stdout)]

    # Full ids in JSON; the filters reach the store (each is tested there, on both backends).
    assert listed("--host", "dev-a", "--limit", "1") == [ids[1]]
    assert listed("--status", "degraded", "--since", "1h", "--runbook", RUNBOOK) == [ids[2]]
    monkeypatch.setenv("COLUMNS", "200")
    wide = run_remediate(["history", "--wide"], state)
    assert all(i in wide.stdout for i in ids)
    assert "alert:0123456789abcdef" in wide.stdout
    monkeypatch.setenv("COLUMNS", "80")
    one = run_remediate(["history", ids[2][-6:], "-o", "json"], state)  # a short id
    assert json.loads(one.stdout)["run_id"] == ids[2]
    bad = run_remediate(["history", "--since", "yesterday"], state)
    assert (bad.returncode, "--since" in bad.stderr) == (2, True)


def test_list_and_approvals_list_fit_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 80 columns list and approvals list print one line per row; --wide shows it all."""
    monkeypatch.setenv("COLUMNS", "80")
    state = tmp_path / "state"
    listed = run_remediate(["list"], state)
    assert listed.returncode == 0, listed.stderr
    lines = _fits(listed.stdout)
    names = [line.split()[0] for line in lines]
    for name in ("data-partition-full", "engine-unresponsive", "stale-probe-scratch"):
        assert name in names  # whole, never cut
    monkeypatch.setenv("COLUMNS", "200")
    wide = run_remediate(["list", "--wide"], state)
    assert "NodeFilesystemAlmostOutOfSpace" in wide.stdout
    monkeypatch.setenv("COLUMNS", "80")
    approvals = run_remediate(["approvals", "list", "--all"], state)
    assert approvals.returncode == 0, approvals.stderr
    _fits(approvals.stdout)
