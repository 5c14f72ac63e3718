"""The runbook JSON Schema, generated from the models (``python -m engine.schema`` rewrites it)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.runbooks.spec import RunbookSpec

SCHEMA_PATH = Path(__file__).with_name("runbook.schema.json")


def runbook_schema_text() -> str:
    """The schema as the committed file should hold it."""
    schema = RunbookSpec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://remediate.invalid/schema/runbook.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
