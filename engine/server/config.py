"""The server's one configuration file (YAML), with secrets overridable from the environment.

Relative paths are relative to the file.  Problems are raised as one :class:`ConfigError`
listing ``file:line: field: message`` for each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from engine.errors import ConfigError
from engine.runbooks.spec import Duration
from engine.settings import Settings

#: Environment variables that override the secrets of the file.
TOKEN_ENV = "REMEDIATE_WEBHOOK_TOKEN"  # noqa: S105 - a variable name, not a secret
HMAC_KEY_ENV = "REMEDIATE_WEBHOOK_HMAC_KEY"
APPROVER_ENV_PREFIX = "REMEDIATE_APPROVER_"

#: Shortest accepted token or HMAC key: a guessable secret is no authentication.
MIN_SECRET_LENGTH = 16


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(_Section):
    """Where the HTTP server listens (loopback unless said otherwise)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9095


class Auth(_Section):
    """How webhook senders authenticate: bearer token, HMAC-SHA256 of the body, or both.

    With both configured, a request needs both.  Running without either needs
    ``allow_unauthenticated: true``, spelled out.
    """

    token: SecretStr | None = None
    hmac_key: SecretStr | None = None
    allow_unauthenticated: bool = False

    @model_validator(mode="after")
    def _secrets_are_long_enough(self) -> Auth:
        for name, secret in (("token", self.token), ("hmac_key", self.hmac_key)):
            if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(f"{name} must be at least {MIN_SECRET_LENGTH} characters")
        return self

    @property
    def configured(self) -> bool:
        """Whether any way of authenticating is configured."""
        return self.token is not None or self.hmac_key is not None


class Queue(_Section):
    """The durable run queue."""

    max_age: Duration = Field(
        default=timedelta(hours=1),
        description="A queued run not started within this is expired, never run late.",
    )


class Breaker(_Section):
    """The fleet-wide circuit breaker: when it is open, runs are recorded as held, not run."""

    window: Duration = timedelta(minutes=10)
    max_failures: Annotated[int, Field(ge=0)] = Field(
        default=3, description="Open when more alert-triggered runs than this fail in a window."
    )
    max_alerting_pct: Annotated[int, Field(ge=1, le=100)] = Field(
        default=20, description="Open when more than this % of the fleet starts alerting."
    )
    min_alerting_devices: Annotated[int, Field(ge=1)] = Field(
        default=3, description="...but only once at least this many devices alert."
    )
    cool_off: Duration = Field(
        default=timedelta(minutes=30), description="Close again this long after opening."
    )


class Approvals(_Section):
    """Runs from ``approve``-mode triggers wait as pending approvals for these people."""

    ttl: Duration = Field(
        default=timedelta(hours=1), description="A pending approval not decided by then expires."
    )
    approvers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="name -> bearer token; the name is who the audit log says approved. "
        "REMEDIATE_APPROVER_<NAME> overrides a token.",
    )

    @model_validator(mode="after")
    def _tokens_are_long_enough(self) -> Approvals:
        for name, token in self.approvers.items():
            if len(token.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"approver {name!r}: token must be at least {MIN_SECRET_LENGTH} characters"
                )
        return self


class State(_Section):
    """Where the state lives (``state: URL`` is short for ``state: {url: URL}``)."""

    url: str | None = Field(
        default=None,
        description="sqlite:///PATH or postgresql://...; --state-url and REMEDIATE_STATE_URL "
        "win over it; default: the state directory's SQLite file.",
    )

    lease_ttl: Duration = Field(
        default=timedelta(minutes=1),
        description="Device leases and this server's heartbeat live this long unless renewed "
        "(every third of it): a replica that dies loses its devices, and its running runs are "
        "marked interrupted, this long after its last renewal.",
    )

    @model_validator(mode="before")
    @classmethod
    def _url_alone(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data


class ServerConfig(_Section):
    """The whole server configuration file."""

    listen: Listen = Listen()
    inventory: Path
    runbooks_dir: Path | None = None
    playbooks_dir: Path | None = None
    auth: Auth = Auth()
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        default=2, description="Runs at once; 0 records and queues but runs nothing."
    )
    queue: Queue = Queue()
    breaker: Breaker = Breaker()
    approvals: Approvals = Approvals()
    state: State = State()
    inventory_refresh: Duration = Field(
        default=timedelta(minutes=5),
        description="Re-read the inventory this often (and whenever its files change).",
    )
    shutdown_timeout: Duration = Field(
        default=timedelta(minutes=5),
        description="On SIGTERM, how long running runs may take to finish.",
    )

    @model_validator(mode="after")
    def _authenticated_unless_said_otherwise(self) -> ServerConfig:
        if not self.auth.configured and not self.auth.allow_unauthenticated:
            raise ValueError(
                f"no authentication configured: set auth.token or auth.hmac_key (or "
                f"{TOKEN_ENV} / {HMAC_KEY_ENV}), or auth.allow_unauthenticated: true"
            )
        return self

    def runbooks(self, settings: Settings) -> Path:
        """The runbooks directory: the file's, else the settings'."""
        return self.runbooks_dir or settings.runbooks_dir

    def playbooks(self, settings: Settings) -> Path:
        """The playbooks directory: the file's, else the settings'."""
        return self.playbooks_dir or settings.playbooks_dir


def load_server_config(path: Path, environ: Mapping[str, str]) -> ServerConfig:
    """Read and validate the configuration file; environment secrets override the file's."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the server configuration: {exc.strerror}") from exc
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(root, CommentedMap):
        raise ConfigError(f"{path}:1: the server configuration must be a mapping")
    data = _plain(root)
    assert isinstance(data, dict)  # noqa: S101 - a CommentedMap becomes a dict
    _apply_environment(data, environ)
    _anchor_paths(data, path.parent)
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_problems(path, root, exc))) from exc


def _plain(node: object) -> object:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    auth = data.get("auth")
    if auth is None:
        auth = data["auth"] = {}
    if not isinstance(auth, dict):
        return  # validation reports it
    for var, key in ((TOKEN_ENV, "token"), (HMAC_KEY_ENV, "hmac_key")):
        if environ.get(var):
            auth[key] = environ[var]
    approvals = data.get("approvals")
    if isinstance(approvals, dict) and isinstance(approvals.get("approvers"), dict):
        for name in approvals["approvers"]:
            token = environ.get(f"{APPROVER_ENV_PREFIX}{str(name).upper()}")
            if token:
                approvals["approvers"][name] = token


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    for key in ("inventory", "runbooks_dir", "playbooks_dir"):
        value = data.get(key)
        if isinstance(value, str) and value:
            data[key] = str(base / Path(value).expanduser())


def _problems(path: Path, root: CommentedMap, exc: ValidationError) -> Iterator[str]:
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        node: object = root
        line = 1
        for seg in loc:
            if isinstance(node, CommentedMap) and seg in node:
                line = node.lc.key(seg)[0] + 1
                node = node[seg]
            elif isinstance(node, CommentedSeq) and isinstance(seg, int) and seg < len(node):
                line = node.lc.item(seg)[0] + 1
                node = node[seg]
            else:
                break
        field = ".".join(str(s) for s in loc) or "(file)"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        yield f"{path}:{line}: {field}: {str(message).removeprefix('Value error, ')}"
