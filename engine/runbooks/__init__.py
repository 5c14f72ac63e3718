"""Runbooks: the language (:mod:`.spec`) and the loader (:mod:`.loader`)."""

from __future__ import annotations

from engine.runbooks.loader import (
    CompiledStep,
    Runbook,
    find_runbook,
    load_runbook,
    load_runbooks,
    runbook_files,
)
from engine.runbooks.spec import RunbookSpec

__all__ = [
    "CompiledStep",
    "Runbook",
    "RunbookSpec",
    "find_runbook",
    "load_runbook",
    "load_runbooks",
    "runbook_files",
]
