"""Guards: the blast radius arithmetic and its refusal message."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.guards import allowed_hosts, blast_radius_refusal
from engine.runbooks import load_runbook
from engine.runbooks.spec import Policy

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    ("pct", "cap", "targeted", "allowed"),
    [(10, None, 3, 1), (10, None, 100, 10), (50, None, 7, 3), (100, 4, 10, 4), (25, 1, 100, 1)],
)
def test_allowed_hosts(pct: int, cap: int | None, targeted: int, allowed: int) -> None:
    """max_hosts_pct of the targeted hosts, at least one, at most max_hosts."""
    assert allowed_hosts(Policy(max_hosts_pct=pct, max_hosts=cap), targeted) == allowed


def test_blast_radius_refusal_names_the_numbers() -> None:
    """Within policy there is no refusal; beyond it the message gives acting, allowed, targeted."""
    runbook = load_runbook(DATA / "runbooks" / "pipeline.yml")
    assert blast_radius_refusal(runbook, 4, 2) is None
    refusal = blast_radius_refusal(runbook, 4, 3)
    assert refusal is not None
    assert "3 hosts need action, the policy allows 2 of 4 targeted (max_hosts_pct 50)" in refusal
