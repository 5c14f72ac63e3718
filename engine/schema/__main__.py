"""Rewrite ``engine/schema/runbook.schema.json`` from the models."""

from __future__ import annotations

from engine.schema import SCHEMA_PATH, runbook_schema_text

SCHEMA_PATH.write_text(runbook_schema_text(), encoding="utf-8")
print(f"wrote {SCHEMA_PATH}")  # noqa: T201 - a developer tool's one line of output
