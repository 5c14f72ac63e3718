"""What balena devices become in an Ansible inventory: host names, groups and host vars.

Pure functions over the API's answers (:mod:`engine.balena.api`) and the plugin's
configuration (:class:`InventoryConfig`); the Ansible plugin only hands the result to Ansible.

* **Which devices.**  Those of the configured fleets that pass the ``filters`` (tags, device
  types, an OS version range).  A device is *online* when it is connected to balena's VPN
  (``is_connected_to_vpn``), the only way the tunnel reaches it.  With ``online_only`` (the
  default) offline devices are no hosts at all, or, with ``include_offline``, hosts of the
  group ``offline`` and of no other group (never a target of a runbook's ``balena_fleet``).
* **Host names** are plain: letters, digits, ``_``, ``.`` and ``-`` (what alert routing and
  Ansible limits need), made from the device name (accents dropped, any other run of
  characters a ``-``).  A name that two devices of the fleets share, or that is a group name or
  ``localhost``, gets ``-<first 7 hex of the uuid>`` (the full uuid if that still collides).
  Names are settled over all devices of the fleets, online or not, filtered or not, so a
  device's host name does not change when another one comes online.
* **Groups**: ``balena_fleet`` (every online host), ``fleet_<org>_<fleet>``,
  ``tag_<key>_<value>``, ``os_<version>``, ``device_type_<slug>`` and ``offline``; names are
  lower case with every character but ``a-z0-9_`` turned into ``_``.
* **Host vars**: ``balena_*`` facts from the API and the connection vars.  Every value is data:
  the plugin marks each string unsafe, so text such as ``{{ }}`` in a tag is never templated.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.balena.api import Actor
from engine.errors import InventoryError, InventorySourceError

BALENA_CLOUD_API = "https://api.balena-cloud.com"
DEVICE_SSH_PORT = 22222
FLEET_GROUP = "balena_fleet"
OFFLINE_GROUP = "offline"
_RESERVED = frozenset({"all", "ungrouped", "localhost", FLEET_GROUP, OFFLINE_GROUP})
_SLUG = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")
_PERSIST = re.compile(r"no|[0-9]+[smh]?")
_OS_VERSION = re.compile(r"([0-9]+\.[0-9]+\.[0-9]+)(?:[+.]?(rev[0-9]+))?")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_NOT_GROUP = re.compile(r"[^a-z0-9_]")
_NAME_MAX = 63


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Filters(_Frozen):
    """Which devices of the fleets become hosts (all must hold)."""

    tags: dict[str, str | list[str] | None] = Field(default_factory=dict)
    """Tag key → the value, one of several values, or null for any value."""
    device_types: tuple[str, ...] = ()
    """Device type slugs (e.g. ``raspberrypi4-64``); empty: every type."""
    os_version: str | None = None
    """A version range such as ``">=2.83, <7"`` (a device with no known version fails it)."""

    @field_validator("os_version")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                SpecifierSet(value)
            except InvalidSpecifier as exc:
                raise ValueError(f"not a version range like '>=2.83, <7': {exc}") from None
        return value


class InventoryConfig(_Frozen):
    """The plugin's options (the defaults are the plugin's documented ones)."""

    api_url: str = BALENA_CLOUD_API
    token_env: str = "BALENA_API_KEY"  # noqa: S105 - the variable's name, not a token
    fleets: Annotated[tuple[str, ...], Field(min_length=1)]
    filters: Filters = Filters()
    online_only: bool = True
    include_offline: bool = False
    connection: Literal["tunnel", "direct"] = "tunnel"
    direct_address: Literal["local", "ip"] = "local"
    tunnel_host: str | None = None
    tunnel_port: Annotated[int, Field(gt=0, lt=65536)] = 443
    ca_file: str | None = None
    ssh_user: str | None = None
    ssh_common_args: str = ""
    max_tunnels: Annotated[int, Field(ge=1, le=1000)] = 10
    tunnel_wait: Annotated[float, Field(ge=0)] = 300.0
    tunnel_timeout: Annotated[float, Field(gt=0)] = 20.0
    control_persist: str = "no"
    page_size: Annotated[int, Field(ge=1, le=1000)] = 200
    max_retries: Annotated[int, Field(ge=0, le=20)] = 5
    request_timeout: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("not an http(s) URL such as https://api.balena-cloud.com")
        return value.rstrip("/")

    @field_validator("token_env")
    @classmethod
    def _env(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise ValueError("not an environment variable name")
        return value

    @field_validator("fleets")
    @classmethod
    def _slugs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in value if not _SLUG.fullmatch(s)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: a fleet slug is org/fleet")
        return value

    @field_validator("ssh_user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not _USERNAME.fullmatch(value):
            raise ValueError("not a plain user name")
        return value or None

    @field_validator("control_persist")
    @classmethod
    def _persist(cls, value: str) -> str:
        if not _PERSIST.fullmatch(value):
            raise ValueError("'no' or a duration such as 30s")
        return value

    @model_validator(mode="after")
    def _tunnel_known(self) -> InventoryConfig:
        if self.connection == "tunnel" and not self.tunnel:
            raise ValueError(
                f"tunnel_host: cannot be derived from api_url {self.api_url} "
                "(its host does not start with 'api.'): set tunnel_host"
            )
        return self

    @property
    def tunnel(self) -> str:
        """The tunnel host: as configured, else ``tunnel.<domain>`` for ``api.<domain>``."""
        if self.tunnel_host:
            return self.tunnel_host
        host = re.sub(r"^https?://", "", self.api_url).split("/")[0].rsplit(":", 1)[0]
        return "tunnel." + host.removeprefix("api.") if host.startswith("api.") else ""


def load_config(options: Mapping[str, Any], source: str) -> InventoryConfig:
    """The validated configuration; an InventoryError naming the field otherwise."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return InventoryConfig.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise InventoryError(f"{source}: {problems}") from None


# -- the API's devices ------------------------------------------------------------------------


class _Loose(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class _FleetLink(_Loose):
    slug: str


class _TagLink(_Loose):
    tag_key: str
    value: str | None = ""


class _TypeLink(_Loose):
    slug: str


class Device(_Loose):
    """One device as the API describes it (the fields the inventory uses)."""

    id: int
    uuid: Annotated[str, Field(pattern=r"^(?:[0-9a-f]{32}|[0-9a-f]{62})$")]
    device_name: str
    is_online: bool | None = None
    is_connected_to_vpn: bool | None = False
    api_heartbeat_state: str | None = None
    os_version: str | None = None
    os_variant: str | None = None
    supervisor_version: str | None = None
    ip_address: str | None = None
    belongs_to__application: Annotated[list[_FleetLink], Field(min_length=1, max_length=1)]
    device_tag: list[_TagLink] = Field(default_factory=list)
    is_of__device_type: list[_TypeLink] = Field(default_factory=list)

    @property
    def online(self) -> bool:
        """Reachable through the tunnel now: connected to balena's VPN."""
        return bool(self.is_connected_to_vpn)

    @property
    def fleet(self) -> str:
        """The fleet's slug."""
        return self.belongs_to__application[0].slug

    @property
    def device_type(self) -> str | None:
        """The device type's slug, if the API gave one."""
        return self.is_of__device_type[0].slug if self.is_of__device_type else None

    @property
    def tags(self) -> dict[str, str]:
        """Tag key → value."""
        return {t.tag_key: t.value or "" for t in self.device_tag}

    @property
    def os_semver(self) -> str | None:
        """The OS version as ``2.83.18+rev5`` (from ``balenaOS 2.83.18+rev5``), if any."""
        found = _OS_VERSION.search(self.os_version or "")
        if found is None:
            return None
        return found[1] + (f"+{found[2]}" if found[2] else "")


def parse_devices(rows: Iterable[Mapping[str, Any]], api_url: str) -> list[Device]:
    """The API's device objects, checked; an InventorySourceError names a malformed one."""
    devices = []
    for index, row in enumerate(rows):
        try:
            devices.append(Device.model_validate(row))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(map(str, error["loc"]))
            raise InventorySourceError(
                f"balena API {api_url}: device #{index + 1} "
                f"(id {row.get('id')!r}) is malformed: {where}: {error['msg']}"
            ) from None
    return devices


# -- the inventory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InventoryHost:
    """One host: its name, groups and vars (API strings to be marked unsafe)."""

    name: str
    groups: tuple[str, ...]
    vars: dict[str, Any]


def group_name(*parts: str) -> str:
    """A group name: the parts joined by ``_``, lower case, other characters as ``_``."""
    return _NOT_GROUP.sub("_", "_".join(parts).lower())


def plain_name(device_name: str) -> str:
    """A host name made of ``[A-Za-z0-9_.-]`` from a device name (never empty)."""
    ascii_name = unicodedata.normalize("NFKD", device_name).encode("ascii", "ignore").decode()
    name = re.sub("-{2,}", "-", _NOT_NAME.sub("-", ascii_name)).lstrip(".-")
    name = name[:_NAME_MAX].rstrip(".-")
    return name or "device"


def host_names(devices: Sequence[Device], taken: Iterable[str] = ()) -> dict[str, str]:
    """The host name of each device (by uuid): its plain name where unique, else + the uuid."""
    reserved = _RESERVED | set(taken)
    plain = {d.uuid: plain_name(d.device_name) for d in devices}
    counts = Counter(plain.values())
    names = {
        uuid: name if counts[name] == 1 and name not in reserved else f"{name}-{uuid[:7]}"
        for uuid, name in plain.items()
    }
    again = Counter(names.values())
    return {
        uuid: f"{plain[uuid]}-{uuid}" if again[name] > 1 or name in reserved else name
        for uuid, name in names.items()
    }


def selected(device: Device, filters: Filters) -> bool:
    """Whether ``device`` passes every filter."""
    tags = device.tags
    for key, wanted in filters.tags.items():
        if key not in tags:
            return False
        if wanted is not None and tags[key] not in (
            [wanted] if isinstance(wanted, str) else wanted
        ):
            return False
    if filters.device_types and device.device_type not in filters.device_types:
        return False
    if filters.os_version is not None:
        version = device.os_semver
        try:
            return version is not None and SpecifierSet(filters.os_version).contains(
                Version(version), prereleases=True
            )
        except InvalidVersion:
            return False
    return True


def groups_of(device: Device) -> tuple[str, ...]:
    """The groups an online device is in (``balena_fleet`` first)."""
    groups = [FLEET_GROUP, group_name("fleet", device.fleet)]
    groups += [
        group_name("tag", k, v) if v else group_name("tag", k) for k, v in device.tags.items()
    ]
    groups.append(group_name("os", device.os_semver or "unknown"))
    if device.device_type:
        groups.append(group_name("device_type", device.device_type))
    return tuple(dict.fromkeys(groups))


def tunnel_user(actor: Actor) -> str:
    """The user the tunnel authenticates as: the token's username (balena-cli: ``root`` else)."""
    if actor.actor_type == "user" and actor.username:
        if not _USERNAME.fullmatch(actor.username):
            raise InventorySourceError(
                f"the balena API gave the username {actor.username!r}, which is not a plain "
                "name; set ssh_user and use connection: direct, or another token"
            )
        return actor.username
    return "root"


def build_inventory(
    config: InventoryConfig, actor: Actor, devices: Sequence[Device], helper: Sequence[str]
) -> list[InventoryHost]:
    """The hosts ``devices`` make under ``config`` (``helper``: the tunnel command's argv)."""
    kept = [d for d in devices if selected(d, config.filters)]
    hosts_of = {
        d.uuid: groups_of(d) if d.online or not config.online_only else (OFFLINE_GROUP,)
        for d in kept
        if d.online or not config.online_only or config.include_offline
    }
    taken = {g for groups in hosts_of.values() for g in groups}
    names = host_names(devices, taken)
    connection = _connection_vars(config, actor, helper)
    hosts = []
    for device in kept:
        if device.uuid not in hosts_of:
            continue
        groups = hosts_of[device.uuid]
        if not device.online and OFFLINE_GROUP not in groups:
            groups = (*groups, OFFLINE_GROUP)
        hosts.append(
            InventoryHost(
                name=names[device.uuid],
                groups=groups,
                vars={**_device_vars(device), **_address(config, device), **connection},
            )
        )
    return hosts


def _device_vars(device: Device) -> dict[str, Any]:
    return {
        "balena_uuid": device.uuid,
        "balena_device_name": device.device_name,
        "balena_fleet": device.fleet,
        "balena_os_version": device.os_version,
        "balena_os_variant": device.os_variant,
        "balena_supervisor_version": device.supervisor_version,
        "balena_device_type": device.device_type,
        "balena_tags": device.tags,
        "balena_is_online": device.online,
        "balena_api_heartbeat_state": device.api_heartbeat_state,
        "balena_ip_addresses": (device.ip_address or "").split(),
    }


def _address(config: InventoryConfig, device: Device) -> dict[str, Any]:
    if config.connection == "tunnel":
        return {"ansible_host": f"{device.uuid}.balena"}
    if config.direct_address == "ip" and device.ip_address:
        return {"ansible_host": device.ip_address.split()[0]}
    return {"ansible_host": f"{device.uuid[:7]}.local"}


def _connection_vars(
    config: InventoryConfig, actor: Actor, helper: Sequence[str]
) -> dict[str, Any]:
    common: dict[str, Any] = {
        "ansible_port": DEVICE_SSH_PORT,
        # balenaOS: read-only root, /tmp a tmpfs, maybe no sftp (docs/balena-cloud.md)
        "ansible_remote_tmp": "/tmp/.ansible",  # noqa: S108 - on the device
        "ansible_ssh_transfer_method": "piped",
    }
    if config.connection == "direct":
        return {
            **common,
            "ansible_user": config.ssh_user or "root",
            **(
                {"ansible_ssh_common_args": config.ssh_common_args}
                if config.ssh_common_args
                else {}
            ),
        }
    user = tunnel_user(actor)
    proxy = [
        *helper,
        "--tunnel-host",
        f"{config.tunnel}:{config.tunnel_port}",
        "--user",
        user,
        "--token-env",
        config.token_env,
        *(["--ca-file", config.ca_file] if config.ca_file else []),
        "--max-tunnels",
        str(config.max_tunnels),
        "--wait",
        f"{config.tunnel_wait:g}",
        "--timeout",
        f"{config.tunnel_timeout:g}",
    ]
    # ssh runs the ProxyCommand through a shell and expands %-tokens in it.
    command = " ".join(shlex.quote(a).replace("%", "%%") for a in proxy) + " %h %p"
    persist = (
        ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        if config.control_persist == "no"
        else ["-o", "ControlMaster=auto", "-o", f"ControlPersist={config.control_persist}"]
    )
    return {
        **common,
        "ansible_user": config.ssh_user or user,
        "ansible_ssh_args": shlex.join(["-C", *persist]),
        "ansible_ssh_common_args": " ".join(
            [shlex.join(["-o", f"ProxyCommand={command}"]), config.ssh_common_args]
        ).strip(),
        # ssh's ConnectTimeout also covers the wait for a tunnel slot; the helper bounds
        # each of its own steps (tunnel_wait, tunnel_timeout) and says which one failed.
        "ansible_ssh_timeout": int(config.tunnel_wait + 2 * config.tunnel_timeout + 10),
    }
