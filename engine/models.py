"""The base of the engine's value models.

Every result, request and record the stages pass around is a :class:`FrozenModel`: immutable
once built (a stage cannot quietly change what another one decided) and strict about its
fields (a misspelt field is an error, not a silently ignored value).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """A pydantic model that is frozen and forbids fields it does not declare."""

    model_config = ConfigDict(frozen=True, extra="forbid")
