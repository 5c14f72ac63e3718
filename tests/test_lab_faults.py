"""The lab's fault table and module layout, checked without root or devices."""

from __future__ import annotations

import ast
from pathlib import Path

from engine.lab import faults

LAB = Path(__file__).resolve().parent.parent / "engine" / "lab"


def test_every_fault_has_its_own_inject_and_clear() -> None:
    """Each fault maps to an inject and a clear, and no two faults share an inject."""
    assert set(faults.FAULTS) == set(faults.Fault)
    injects = [actions.inject for actions in faults.FAULTS.values()]
    assert len(set(injects)) == len(injects)
    assert set(faults._AFTER_ENGINE) <= set(faults.FAULTS)


def _lab_imports(module: str) -> set[str]:
    tree = ast.parse((LAB / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("engine.lab")
        ):
            found.add(node.module)
            found.update(f"engine.lab.{alias.name}" for alias in node.names)
    return {name for name in found if (LAB / f"{name.rsplit('.', 1)[-1]}.py").exists()}


def test_lab_modules_import_one_way() -> None:
    """Lab imports flow one way: device imports no lab module, images only device (no cycle)."""
    assert _lab_imports("device") == set()
    assert _lab_imports("images") == {"engine.lab.device"}
    assert "engine.lab.faults" not in _lab_imports("devices")
    assert "engine.lab.devices" not in _lab_imports("faults")
