"""The runbook language: frozen pydantic models, one per runbook section.

A runbook file is YAML with ``apiVersion: remediate/v1`` and ``kind: Runbook``.  These models
check the *shape*; :mod:`engine.runbooks.loader` adds the checks that need more than one field
(unique ids, known playbooks, expressions that name only declared checks and params).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    PlainSerializer,
    StringConstraints,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from engine.durations import DURATION_PATTERN, format_duration, parse_duration


class _Spec(BaseModel):
    """Base for every runbook section: immutable, and a typo is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --- scalar types -----------------------------------------------------------------------------

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "integer", "minimum": 0},
            ],
            "description": "seconds, or e.g. 45s, 10m, 1h30m, 2d",
        }
    ),
]

Identifier = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", min_length=1, max_length=64)
]
"""Ids of checks, guards, steps and params: usable as ``checks.<id>`` in expressions."""

RunbookName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", min_length=1, max_length=64)
]


def _as_tuple(value: object) -> object:
    """Let a single string stand for a one-item list (``alertname: Foo``)."""
    return (value,) if isinstance(value, str) else value


def _one_or_more(item: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a field written as one item or a non-empty list of them."""
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_NAME_SCHEMA = {"type": "string", "pattern": f"^{_LABEL_NAME.pattern}$"}


def _label_name(value: str) -> str:
    if not _LABEL_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Prometheus label name (letters, digits and _, not first a digit)"
        )
    return value


LabelName = Annotated[str, AfterValidator(_label_name), WithJsonSchema(_LABEL_NAME_SCHEMA)]
"""A Prometheus label name (``balena_uuid``, ``exported_instance``)."""

_LABEL_MAP_SCHEMA = {
    "type": "object",
    "propertyNames": _LABEL_NAME_SCHEMA,
    "additionalProperties": {"type": "string"},
}


def _as_str(value: object) -> object:
    """Let ``version: 1`` mean the string ``"1"``."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# --- sections ----------------------------------------------------------------------------------


class Severity(StrEnum):
    """How bad the condition a runbook handles is."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Metadata(_Spec):
    """Who the runbook is, for people and for routing."""

    name: RunbookName
    title: Annotated[str, StringConstraints(min_length=1, max_length=120)]
    description: str = ""
    version: Annotated[str, BeforeValidator(_as_str)] = "1"
    tags: tuple[str, ...] = ()
    severity: Severity = Severity.MEDIUM
    never: tuple[str, ...] = Field(
        default=(), description="What this runbook will never do, in operator words."
    )


class Targets(_Spec):
    """Which inventory hosts the runbook may consider."""

    hosts: Annotated[str, StringConstraints(min_length=1)] = "all"


class ParamType(StrEnum):
    """Types a runbook parameter can have."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    DURATION = "duration"


_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"expected a bool (true/false), got {value!r}")


def _to_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError(f"expected an int, got {value!r}")


def _to_float(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and re.fullmatch(
        r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()
    ):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _to_seconds(value: object) -> int:
    return int(parse_duration(value).total_seconds())


_COERCE: dict[str, Callable[[object], int | float | bool | str]] = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "str": _to_str,
    "duration": _to_seconds,
}


def coerce_param(kind: ParamType, value: object) -> int | float | bool | str:
    """Convert a YAML value or a ``-e key=value`` string to the parameter's type.

    Durations become whole seconds, so expressions and shell checks compare numbers.
    """
    return _COERCE[kind.value](value)


class Param(_Spec):
    """A typed runbook parameter with a default; ``-e name=value`` overrides it."""

    type: ParamType
    default: int | float | bool | str
    description: str = ""
    secret: bool = Field(
        default=False,
        description="Redact the value (by value, wherever it appears) in plans, audit logs and "
        "Ansible's artifacts.",
    )

    @model_validator(mode="after")
    def _default_matches_type(self) -> Param:
        coerce_param(self.type, self.default)
        return self

    @property
    def value(self) -> int | float | bool | str:
        """The default, converted to the parameter's type."""
        return coerce_param(self.type, self.default)


class TriggerMode(StrEnum):
    """What an alert-triggered run may do."""

    APPLY = "apply"  # auto-remediate
    PLAN = "plan"  # dry-run only, for review
    APPROVE = "approve"  # plan now, act after an operator approves


class Trigger(_Spec):
    """Which Alertmanager alerts start this runbook, and which label names the device.

    ``device_label`` may list several label names: the first one the alert has names the
    device (e.g. ``[exported_instance, instance]`` for series that came through a
    federation or a Pushgateway with ``honor_labels: false``).
    """

    alertname: Annotated[
        tuple[str, ...],
        BeforeValidator(_as_tuple),
        Field(min_length=1),
        WithJsonSchema(_one_or_more({"type": "string"})),
    ]
    match: Annotated[dict[LabelName, str], WithJsonSchema(_LABEL_MAP_SCHEMA)] = Field(
        default_factory=dict, description="Labels that must be equal."
    )
    match_re: Annotated[dict[LabelName, str], WithJsonSchema(_LABEL_MAP_SCHEMA)] = Field(
        default_factory=dict, description="Labels that must fully match a regular expression."
    )
    device_label: Annotated[
        tuple[LabelName, ...],
        BeforeValidator(_as_tuple),
        Field(min_length=1),
        WithJsonSchema(
            {
                **_one_or_more(_LABEL_NAME_SCHEMA),
                "default": "instance",
                "description": "The label that names the device; with a list, the first "
                "label the alert has.",
            }
        ),
    ] = ("instance",)
    device_var: str | None = Field(
        default=None,
        description="Host var the label is compared with; by default the inventory host name.",
    )
    strip_port: bool = Field(default=False, description="Drop a ':port' suffix from the label.")
    mode: TriggerMode = TriggerMode.PLAN

    @field_validator("match_re")
    @classmethod
    def _regexes_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for label, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"label {label!r}: bad regular expression: {exc}") from exc
        return value

    @field_validator("device_label")
    @classmethod
    def _labels_differ(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"label {repeated[0]!r} is listed twice")
        return value


class ParseKind(StrEnum):
    """How a check's output becomes a value."""

    INT = "int"  # stdout is an integer
    FLOAT = "float"  # stdout is a number
    BOOL = "bool"  # stdout is true/false/yes/no/1/0
    STR = "str"  # stdout, stripped
    LINES = "lines"  # non-empty stdout lines
    JSON = "json"  # stdout is JSON
    KV = "kv"  # key=value lines (e.g. systemctl show)
    RC = "rc"  # the exit code; stdout ignored
    OK = "ok"  # exit code 0 → true, anything else → false


class Check(_Spec):
    """A read-only probe: a POSIX-sh command run on the device with ``raw``.

    Runbook params are visible to the command as shell variables ``$param_<name>``;
    the command itself is never a template.  ``run_file`` names a script beside the runbook
    (e.g. ``checks/orphan-layers.sh``) shared by several runbooks; the loader inlines it.
    The command runs in a subshell of the probe script (its ``exit``, ``cd`` and variables
    stay there) with stdin from ``/dev/null``; its output is text (NUL bytes are dropped);
    past ``timeout`` it is killed, with everything it started, within about a second.
    """

    id: Identifier
    run: Annotated[str, StringConstraints(min_length=1)] | None = None
    run_file: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")] | None = (
        None
    )
    parse: ParseKind = ParseKind.STR
    timeout: Duration = timedelta(seconds=10)
    description: str = ""

    @model_validator(mode="after")
    def _one_command(self) -> Check:
        if (self.run is None) == (self.run_file is None):
            raise ValueError("give exactly one of run (a command) or run_file (a script)")
        return self

    @property
    def command(self) -> str:
        """The POSIX-sh command (a ``run_file`` is inlined by the loader)."""
        if self.run is None:
            raise ValueError(f"check {self.id}: run_file {self.run_file} was not inlined")
        return self.run


class ExprGuard(_Spec):
    """Blocks a device when ``expr`` is false."""

    id: Identifier
    expr: Annotated[str, StringConstraints(min_length=1)]
    message: Annotated[str, StringConstraints(min_length=1)]


class CooldownGuard(_Spec):
    """Blocks a device this runbook acted on less than ``cooldown`` ago."""

    id: Identifier
    cooldown: Duration
    message: str = "this runbook acted on this device recently"


class LockGuard(_Spec):
    """Blocks a device another run is acting on (the lock is always taken before acting)."""

    id: Identifier
    lock: Literal[True]
    message: str = "another run is acting on this device"


class BlastRadiusGuard(_Spec):
    """Refuses the whole run when it would act on more hosts than the policy allows."""

    id: Identifier
    blast_radius: Literal[True]
    message: str = "the run would act on more hosts than the policy allows"


def _guard_kind(value: object) -> str:
    if isinstance(value, dict):
        for kind in ("cooldown", "lock", "blast_radius"):
            if kind in value:
                return kind
    return "expr"


Guard = Annotated[
    Annotated[ExprGuard, Tag("expr")]
    | Annotated[CooldownGuard, Tag("cooldown")]
    | Annotated[LockGuard, Tag("lock")]
    | Annotated[BlastRadiusGuard, Tag("blast_radius")],
    Discriminator(_guard_kind),
]


class Step(_Spec):
    """One action: an Ansible playbook from ``playbooks/``, run only when ``when`` holds."""

    id: Identifier
    playbook: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*\.ya?ml$", min_length=1)
    ]
    plan: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="Template of the line a dry-run shows for this step."
    )
    when: str = "true"
    vars: dict[str, Any] = Field(
        default_factory=dict, description="Extra vars; string values are templates."
    )
    items: str | None = Field(
        default=None,
        description="Expression giving the exact items the step acts on (shown in the plan, "
        "passed to the playbook as remediate_items).",
    )
    destructive: bool = False
    recheck: bool = Field(
        default=False,
        description="Before this step runs, probe again; skip it unless the symptom and `when` "
        "still hold (a step only ever does less than planned, never more).",
    )
    timeout: Duration = timedelta(minutes=10)


class Verify(_Spec):
    """What must hold after the steps, on fresh probes (``before.<check>`` is the first probe)."""

    expr: Annotated[str, StringConstraints(min_length=1)]
    retries: Annotated[int, Field(ge=1, le=100)] = 1
    delay: Duration = timedelta(0)
    explain: str | None = Field(
        default=None,
        description="Template saying what is left when verify does not hold (e.g. top consumers).",
    )


def _verify_from_str(value: object) -> object:
    return {"expr": value} if isinstance(value, str) else value


class _OrExpressionSchema:
    """JSON Schema of a section that may also be written as just its expression (a string)."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [{"type": "string", "minLength": 1}, handler(core_schema)]}


class Approval(StrEnum):
    """When acting needs a person's approval."""

    NEVER = "never"
    DESTRUCTIVE = "destructive"  # only when a planned step is destructive
    ALWAYS = "always"


class Policy(_Spec):
    """How much of the fleet a run may touch, and how fast."""

    serial: Annotated[int, Field(ge=1)] = 5
    max_fail_pct: Annotated[int, Field(ge=0, le=100)] = 20
    max_hosts_pct: Annotated[int, Field(ge=1, le=100)] = 25
    max_hosts: Annotated[int, Field(ge=1)] | None = None
    approval: Approval = Approval.DESTRUCTIVE
    four_eyes: bool = False
    lock_ttl: Duration = timedelta(minutes=30)


class RunbookSpec(_Spec):
    """A whole runbook file."""

    api_version: Literal["remediate/v1"] = Field(alias="apiVersion")
    kind: Literal["Runbook"]
    metadata: Metadata
    targets: Targets = Targets()
    params: dict[Identifier, Param] = Field(default_factory=dict)
    triggers: tuple[Trigger, ...] = ()
    checks: Annotated[tuple[Check, ...], Field(min_length=1)]
    symptom: Annotated[str, StringConstraints(min_length=1)]
    guards: tuple[Guard, ...] = ()
    steps: Annotated[tuple[Step, ...], Field(min_length=1)]
    verify: Annotated[Verify, BeforeValidator(_verify_from_str), _OrExpressionSchema()]
    policy: Policy = Policy()
