"""Alertmanager's webhook body (``"version": "4"``) as models, and parsing with located errors.

These are the only models in the engine that ignore unknown fields (``extra="ignore"``):
the body belongs to Alertmanager, whose releases add fields (``notification_reason`` in
0.32, ``routeLabels`` in 0.34); a receiver that rejected them would drop alerts on upgrade.
Fields newer than 0.25 are never required.  Label values are untrusted data from the fleet:
nothing here interprets them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as _PydanticValidationError

from engine.errors import InputError


class _Body(BaseModel):
    # Alertmanager's schema, not ours: unknown fields are ignored on purpose (see above).
    model_config = ConfigDict(frozen=True, extra="ignore")


Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z]{1,64}$")]


class Alert(_Body):
    """One alert of a notification."""

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: AwareDatetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: Fingerprint

    @property
    def alertname(self) -> str:
        """The ``alertname`` label ("" when absent)."""
        return self.labels.get("alertname", "")


class WebhookMessage(_Body):
    """One webhook notification: a group of alerts."""

    version: Literal["4"]
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, alias="truncatedAlerts")
    status: Literal["firing", "resolved"]
    receiver: str = ""
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: tuple[Alert, ...]


class BodyError(InputError):
    """A webhook body that is not a valid Alertmanager notification; names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def parse_webhook(raw: bytes) -> WebhookMessage:
    """Parse and validate a webhook body; :class:`BodyError` names the first bad field."""
    try:
        return WebhookMessage.model_validate_json(raw)
    except _PydanticValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in err["loc"]) or "(body)"
        message = "required field is missing" if err["type"] == "missing" else err["msg"]
        raise BodyError(field, str(message)) from exc
