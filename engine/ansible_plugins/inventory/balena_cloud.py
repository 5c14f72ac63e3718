"""The ``balena_cloud`` Ansible inventory plugin: balenaCloud / openBalena devices as hosts.

A thin adapter: the API calls are :mod:`engine.balena.api`, what devices become (names,
groups, vars) is :mod:`engine.balena.inventory`.  This file only reads the options, keeps
the API's answer in Ansible's inventory cache, and hands hosts to Ansible with every string
from the API marked unsafe (``wrap_var``: never templated).  Its errors are one line with a
class marker (:func:`engine.balena.marked`) that the engine turns back into exit 2 or 3.

Found by Ansible through ``ANSIBLE_INVENTORY_PLUGINS`` (the engine sets it for every Ansible
it runs; ``inventories/README.md`` for plain ``ansible-inventory``).
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: balena_cloud
short_description: balenaCloud or openBalena devices, reached through balena's tunnel
description:
  - Lists the devices of balena fleets from the balena API (OData v7) and connects to their
    host OS sshd (port 22222) through balena's TLS tunnel with the remediate-tunnel
    ProxyCommand, or directly (LAN, VPN, development images).
  - The API token is read from the environment variable named by O(token_env) only.
  - See docs/balena-cloud.md of the remediate project.
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks this file as a balena_cloud inventory.
    required: true
    choices: [balena_cloud]
  api_url:
    description: The balena API; for openBalena C(https://api.<your domain>).
    type: str
    default: https://api.balena-cloud.com
  token_env:
    description: Environment variable holding the API key or session token.
    type: str
    default: BALENA_API_KEY
  fleets:
    description: Fleet slugs (C(org/fleet)) whose devices become hosts.
    type: list
    elements: str
    required: true
  filters:
    description:
      - C(tags) (key to a value, a list of values, or null for any value), C(device_types)
        (list of slugs), C(os_version) (a range such as C(">=2.83, <7")). All must hold.
    type: dict
    default: {}
  online_only:
    description: Devices not connected to balena's VPN are no hosts (see O(include_offline)).
    type: bool
    default: true
  include_offline:
    description: With O(online_only), list offline devices as hosts of the group C(offline) only.
    type: bool
    default: false
  connection:
    description: C(tunnel) (through balena's tunnel) or C(direct) (the device's own address).
    type: str
    choices: [tunnel, direct]
    default: tunnel
  direct_address:
    description: With C(connection=direct), C(local) (C(<short uuid>.local)) or C(ip) (the
      first address the device reports).
    type: str
    choices: [local, ip]
    default: local
  tunnel_host:
    description: The tunnel host; default C(tunnel.) and the API host's domain.
    type: str
  tunnel_port:
    description: The tunnel host's TLS port.
    type: int
    default: 443
  ca_file:
    description: CA bundle for the API's and the tunnel's certificates (openBalena, tests).
    type: path
  ssh_user:
    description: SSH user on the device; default the token's balena username (tunnel) or
      C(root) (direct).
    type: str
  ssh_common_args:
    description: More ssh arguments (e.g. C(-o UserKnownHostsFile=~/.ssh/balena_known_hosts)).
    type: str
    default: ""
  max_tunnels:
    description: Tunnels open at once (all runs of this user on this machine).
    type: int
    default: 10
  tunnel_wait:
    description: Seconds a connection waits for a free tunnel slot.
    type: float
    default: 300
  tunnel_timeout:
    description: Seconds for the tunnel host to answer, and for the device's SSH banner.
    type: float
    default: 20
  control_persist:
    description: C(no), or how long an idle SSH master connection (and its tunnel slot) is
      kept, e.g. C(30s).
    type: str
    default: "no"
  page_size:
    description: Devices per API request.
    type: int
    default: 200
  max_retries:
    description: Retries of an API request after a 429, a 5xx or a connection failure.
    type: int
    default: 5
  request_timeout:
    description: Seconds for one API request.
    type: float
    default: 30
"""

EXAMPLES = r"""
plugin: balena_cloud
fleets: [myorg/gateways]
filters:
  tags: {site: berlin}
  os_version: ">=2.83"
"""

import hashlib  # noqa: E402 - after the documentation, as Ansible's plugins do
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable  # noqa: E402
from ansible.utils.unsafe_proxy import wrap_var  # noqa: E402

from engine.balena import marked  # noqa: E402
from engine.balena.api import Actor, BalenaApi  # noqa: E402
from engine.balena.inventory import (  # noqa: E402
    InventoryConfig,
    build_inventory,
    load_config,
    parse_devices,
)
from engine.errors import EngineError, InventoryError  # noqa: E402

#: Version of what the plugin keeps in the inventory cache (other versions are refetched).
_CACHE_FORMAT = 1
_OPTIONS = tuple(InventoryConfig.model_fields)


def tunnel_helper() -> list[str]:
    """The argv of ``remediate-tunnel`` beside this Python, or ``python -m engine.tunnel``."""
    script = Path(sys.executable).with_name("remediate-tunnel")
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "engine.tunnel"]


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):  # type: ignore[misc]
    """balenaCloud / openBalena devices as hosts (see the module docstring)."""

    NAME = "balena_cloud"

    def verify_file(self, path: str) -> bool:
        """A readable ``.yml``/``.yaml`` file (``plugin: balena_cloud`` is checked on parse)."""
        return bool(super().verify_file(path)) and path.endswith((".yml", ".yaml"))

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        """Add the fleets' devices to ``inventory`` (from the cache when allowed and fresh)."""
        super().parse(inventory, loader, path, cache)
        given = self._read_config_data(path)
        try:
            unknown = sorted(set(given) - set(self._options) - {"plugin"})
            if unknown:  # Ansible would ignore a misspelt option silently
                raise InventoryError(
                    f"{path}: unknown option(s) {', '.join(map(repr, unknown))} "
                    "(ansible-doc -t inventory balena_cloud lists them)"
                )
            config = load_config({k: self.get_option(k) for k in _OPTIONS}, path)
            data = self._fleet_data(config, path, cache)
            actor = Actor(actor_type=data["actor_type"], username=data["username"])
            devices = parse_devices(data["devices"], config.api_url)
            hosts = build_inventory(config, actor, devices, tunnel_helper())
        except EngineError as exc:
            raise AnsibleParserError(marked(exc)) from None
        for host in hosts:
            self._add(host.name, host.groups, host.vars)

    def _fleet_data(self, config: InventoryConfig, path: str, cache: bool) -> dict[str, Any]:
        """What the API said (whoami and devices), from Ansible's inventory cache if fresh."""
        use_cache = bool(self.get_option("cache"))
        key = self._cache_key(config, path)
        if use_cache and cache:
            try:
                cached = self._cache[key]
            except KeyError:
                pass
            else:
                if isinstance(cached, dict) and cached.get("format") == _CACHE_FORMAT:
                    return cached
        data = _fetch(config)
        if use_cache:
            self._cache[key] = data
        return data

    def _cache_key(self, config: InventoryConfig, path: str) -> str:
        """Per file and per what is asked of the API (another API or fleet: another entry)."""
        asked = json.dumps([config.api_url, sorted(s.lower() for s in config.fleets)])
        return f"{self.get_cache_key(path)}_{hashlib.sha256(asked.encode()).hexdigest()[:8]}"

    def _add(self, name: str, groups: tuple[str, ...], host_vars: dict[str, Any]) -> None:
        for group in groups:
            self.inventory.add_group(group)
        self.inventory.add_host(name, group=groups[0])
        for group in groups[1:]:
            self.inventory.add_child(group, name)
        safe = wrap_var(host_vars)
        for key, value in safe.items():
            self.inventory.set_variable(name, key, value)
        strict = self.get_option("strict")
        self._set_composite_vars(self.get_option("compose"), safe, name, strict=strict)
        self._add_host_to_composed_groups(self.get_option("groups"), safe, name, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), safe, name, strict=strict)


def _fetch(config: InventoryConfig) -> dict[str, Any]:
    token = os.environ.get(config.token_env, "").strip()
    if not token:
        raise InventoryError(
            f"${config.token_env} is not set: export a balena API key or session token"
        )
    with BalenaApi(
        config.api_url,
        token,
        token_env=config.token_env,
        ca_file=config.ca_file,
        timeout=config.request_timeout,
        max_retries=config.max_retries,
    ) as api:
        actor = api.whoami()
        fleets = api.fleets(config.fleets)
        devices = api.devices(fleets, page_size=config.page_size)
    return {
        "format": _CACHE_FORMAT,
        "actor_type": actor.actor_type,
        "username": actor.username,
        "devices": devices,
    }
