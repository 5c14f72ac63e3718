"""The server's one configuration file (YAML), with secrets overridable from the environment.

Relative paths are relative to the file.  Problems are raised as one :class:`ConfigError`
listing ``file:line: field: message`` for each.  A file that holds secrets itself must be
readable by its owner only.
"""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

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


class Tls(_Section):
    """HTTPS on the listening socket; with ``client_ca``, mutual TLS."""

    cert: Path = Field(description="The server's certificate (PEM), intermediates after it.")
    key: Path = Field(description="Its private key (PEM, unencrypted), readable by its owner only.")
    client_ca: Path | None = Field(
        default=None,
        description="CA certificate(s) (PEM): a client must present a certificate they signed.",
    )


class Listen(_Section):
    """Where the HTTP server listens (loopback unless said otherwise), and its TLS."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9095
    tls: Tls | None = None

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect (a loopback address or ``localhost``)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    @property
    def client_certificates(self) -> bool:
        """Whether clients must present a certificate (mutual TLS)."""
        return self.tls is not None and self.tls.client_ca is not None


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
    executor: Literal["local", "distributed"] = Field(
        default="local",
        description="local: runs execute in this server's worker threads; distributed: each "
        "run is enqueued for `remediate worker` processes (state in PostgreSQL, see "
        "docs/distributed.md) and a worker thread follows it to its end.",
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
        if self.auth.configured or self.listen.client_certificates:
            return self
        if not self.auth.allow_unauthenticated:
            raise ValueError(
                f"no authentication configured: set auth.token or auth.hmac_key (or "
                f"{TOKEN_ENV} / {HMAC_KEY_ENV}), listen.tls.client_ca, or "
                "auth.allow_unauthenticated: true"
            )
        if not self.listen.loopback:
            raise ValueError(
                f"auth.allow_unauthenticated is for a loopback listen.host only: on "
                f"{self.listen.host} anyone who reaches the port could trigger remediations; "
                "set auth.token or auth.hmac_key, or listen.tls.client_ca"
            )
        return self

    @property
    def secret_values(self) -> tuple[str, ...]:
        """The token, the HMAC key and the approvers' tokens (to be scrubbed wherever seen)."""
        found = [self.auth.token, self.auth.hmac_key, *self.approvals.approvers.values()]
        return tuple(s.get_secret_value() for s in found if s is not None)

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
    _refuse_shared_secrets(path, data)
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


def _refuse_shared_secrets(path: Path, data: dict[str, Any]) -> None:
    """A file holding a token or key must be readable by its owner only."""
    auth, approvals = data.get("auth"), data.get("approvals")
    held = [f"auth.{k}" for k in ("token", "hmac_key") if isinstance(auth, dict) and auth.get(k)]
    if isinstance(approvals, dict) and isinstance(approvals.get("approvers"), dict):
        approvers = approvals["approvers"].items()
        held += [f"approvals.approvers.{name}" for name, token in approvers if token]
    if not held:
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the server configuration: {exc.strerror}") from exc
    if mode & 0o044:
        raise ConfigError(
            f"{path}: holds secrets ({', '.join(held)}) but is readable by group or others "
            f"(mode {mode:04o}): make it readable by its owner only (chmod 600), or pass "
            f"them in the environment ({TOKEN_ENV}, {HMAC_KEY_ENV}, {APPROVER_ENV_PREFIX}<NAME>)"
        )


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    for key in ("inventory", "runbooks_dir", "playbooks_dir"):
        value = data.get(key)
        if isinstance(value, str) and value:
            data[key] = str(base / Path(value).expanduser())
    listen = data.get("listen")
    tls = listen.get("tls") if isinstance(listen, dict) else None
    if isinstance(tls, dict):
        for key in ("cert", "key", "client_ca"):
            value = tls.get(key)
            if isinstance(value, str) and value:
                tls[key] = str(base / Path(value).expanduser())


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
