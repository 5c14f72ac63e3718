"""What balena devices become in the inventory: names, groups, filters, vars, configuration."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.balena import carries_error, inventory_error, marked
from engine.balena.api import Actor
from engine.balena.inventory import (
    Device,
    InventoryConfig,
    build_inventory,
    group_name,
    host_names,
    load_config,
    parse_devices,
    plain_name,
)
from engine.errors import InventoryError, InventorySourceError
from engine.server.routing import _PLAIN_HOST_NAME
from tests.support.balena_api import uuid_of

PLUGIN = Path(__file__).parents[1] / "engine" / "ansible_plugins" / "inventory" / "balena_cloud.py"
USER = Actor(actor_type="user", username="gh_fleetops")
HELPER = ["/venv/bin/remediate-tunnel"]


def device(n: int, name: str = "", *, online: bool = True, **fields: Any) -> Device:
    row: dict[str, Any] = {
        "id": 1000 + n,
        "uuid": uuid_of(n),
        "device_name": name or f"dev-{n}",
        "is_online": online,
        "is_connected_to_vpn": online,
        "os_version": "balenaOS 2.83.18+rev5",
        "os_variant": "prod",
        "supervisor_version": "12.11.38",
        "ip_address": "10.0.0.5 192.168.1.7",
        "belongs_to__application": [{"id": 7, "slug": "myorg/gateways"}],
        "device_tag": [],
        "is_of__device_type": [{"slug": "raspberrypi4-64"}],
    }
    row.update(fields)
    return Device.model_validate(row)


def config(**options: Any) -> InventoryConfig:
    return load_config({"fleets": ["myorg/gateways"], **options}, "inv.yml")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gateway berlin #1", "gateway-berlin-1"),
        ("Café Zürich", "Cafe-Zurich"),
        ("$(touch /tmp/x); `id` | rm -rf / &", "touch-tmp-x-id-rm-rf"),
        ("..hidden", "hidden"),
        ("日本語", "device"),
        ("a" * 100, "a" * 63),
        ("edge_04.local", "edge_04.local"),
    ],
)
def test_host_names_are_plain(given: str, expected: str) -> None:
    """Spaces, accents, unicode and shell metacharacters never reach a host name."""
    assert plain_name(given) == expected
    assert _PLAIN_HOST_NAME.fullmatch(plain_name(given))


def test_shared_names_get_the_uuid_start() -> None:
    """Names two devices share (after cleaning), group names and localhost get ``-<uuid[:7]>``."""
    devices = [
        device(1, "gw 1"),
        device(2, "gw-1"),
        device(3, "offline"),
        device(4, "localhost"),
        device(5, "fleet_myorg_gateways"),
        device(6, "unique"),
    ]
    names = host_names(devices, taken={"fleet_myorg_gateways"})
    assert names[uuid_of(1)] == f"gw-1-{uuid_of(1)[:7]}"
    assert names[uuid_of(2)] == f"gw-1-{uuid_of(2)[:7]}"
    assert names[uuid_of(3)] == f"offline-{uuid_of(3)[:7]}"
    assert names[uuid_of(4)] == f"localhost-{uuid_of(4)[:7]}"
    assert names[uuid_of(5)] == f"fleet_myorg_gateways-{uuid_of(5)[:7]}"
    assert names[uuid_of(6)] == "unique"
    assert len(set(names.values())) == len(devices)


def test_same_uuid_start_falls_back_to_the_full_uuid() -> None:
    """Two same-named devices whose uuids share 7 hex digits get the whole uuid."""
    a = device(1, "gw", uuid="abcdef0" + "1" * 25)
    b = device(2, "gw", uuid="abcdef0" + "2" * 25)
    assert host_names([a, b]) == {a.uuid: f"gw-{a.uuid}", b.uuid: f"gw-{b.uuid}"}


def test_groups_per_fleet_tag_os_and_type_all_in_balena_fleet() -> None:
    """An online device is in balena_fleet and its fleet, tag, OS and device type groups."""
    dev = device(
        1,
        device_tag=[
            {"tag_key": "Site", "value": "Berlin Mitte"},
            {"tag_key": "canary", "value": ""},
        ],
    )
    (host,) = build_inventory(config(), USER, [dev], HELPER)
    assert host.groups == (
        "balena_fleet",
        "fleet_myorg_gateways",
        "tag_site_berlin_mitte",
        "tag_canary",
        "os_2_83_18_rev5",
        "device_type_raspberrypi4_64",
    )
    assert host.vars["balena_tags"] == {"Site": "Berlin Mitte", "canary": ""}
    assert group_name("tag", "k", "{{ x }}") == "tag_k____x___"


def test_offline_devices_are_no_hosts_unless_asked() -> None:
    """Offline: no host by default; ``include_offline``: only in ``offline``; else everywhere."""
    devices = [device(1, "up"), device(2, "down", online=False)]
    by_default = build_inventory(config(), USER, devices, HELPER)
    assert [h.name for h in by_default] == ["up"]
    listed = build_inventory(config(include_offline=True), USER, devices, HELPER)
    assert [(h.name, h.groups) for h in listed][1] == ("down", ("offline",))
    everyone = build_inventory(config(online_only=False), USER, devices, HELPER)
    assert "balena_fleet" in everyone[1].groups
    assert everyone[1].groups[-1] == "offline"
    assert everyone[1].vars["balena_is_online"] is False


def test_filters_on_tags_device_types_and_os_range() -> None:
    """Only devices passing every filter become hosts; an unknown OS version fails a range."""
    devices = [
        device(1, "berlin", device_tag=[{"tag_key": "site", "value": "berlin"}]),
        device(2, "paris", device_tag=[{"tag_key": "site", "value": "paris"}]),
        device(
            3, "new", os_version="balenaOS 6.0.13", device_tag=[{"tag_key": "site", "value": "x"}]
        ),
        device(4, "nuc", is_of__device_type=[{"slug": "intel-nuc"}]),
        device(5, "noversion", os_version=None),
    ]

    def names(filters: dict[str, Any]) -> list[str]:
        return [h.name for h in build_inventory(config(filters=filters), USER, devices, HELPER)]

    assert names({"tags": {"site": "berlin"}}) == ["berlin"]
    assert names({"tags": {"site": ["berlin", "paris"]}}) == ["berlin", "paris"]
    assert names({"tags": {"site": None}}) == ["berlin", "paris", "new"]
    assert names({"device_types": ["intel-nuc"]}) == ["nuc"]
    assert names({"os_version": ">=2.83, <3"}) == ["berlin", "paris", "nuc"]
    assert names({"os_version": ">=6"}) == ["new"]


def test_tunnel_connection_vars_hold_the_proxy_command_not_the_token() -> None:
    """The ProxyCommand names the helper, the user and the token's variable; never a token."""
    (host,) = build_inventory(
        config(ca_file="/etc/ca.pem", max_tunnels=5, ssh_common_args="-o LogLevel=ERROR"),
        USER,
        [device(1)],
        ["/opt/my venv/bin/remediate-tunnel"],
    )
    assert host.vars["ansible_host"] == f"{uuid_of(1)}.balena"
    assert (host.vars["ansible_port"], host.vars["ansible_user"]) == (22222, "gh_fleetops")
    args = shlex.split(host.vars["ansible_ssh_common_args"])
    assert args[0] == "-o"
    assert args[2:] == ["-o", "LogLevel=ERROR"]
    proxy = args[1].removeprefix("ProxyCommand=")
    assert shlex.split(proxy) == [
        "/opt/my venv/bin/remediate-tunnel",
        "--tunnel-host",
        "tunnel.balena-cloud.com:443",
        "--user",
        "gh_fleetops",
        "--token-env",
        "BALENA_API_KEY",
        "--ca-file",
        "/etc/ca.pem",
        "--max-tunnels",
        "5",
        "--wait",
        "300",
        "--timeout",
        "20",
        "%h",
        "%p",
    ]
    assert host.vars["ansible_ssh_args"] == "-C -o ControlMaster=no -o ControlPath=none"
    assert host.vars["ansible_ssh_timeout"] == 350


def test_persist_user_and_direct_connections() -> None:
    """ControlPersist when asked; root by ssh_user; direct connections use the device address."""
    persist = build_inventory(
        config(control_persist="30s", ssh_user="root"), USER, [device(1)], HELPER
    )
    assert persist[0].vars["ansible_ssh_args"] == "-C -o ControlMaster=auto -o ControlPersist=30s"
    assert persist[0].vars["ansible_user"] == "root"
    assert "--user gh_fleetops" in persist[0].vars["ansible_ssh_common_args"]
    local = build_inventory(config(connection="direct"), USER, [device(1)], HELPER)[0].vars
    assert (local["ansible_host"], local["ansible_user"]) == (f"{uuid_of(1)[:7]}.local", "root")
    assert "ansible_ssh_common_args" not in local
    by_ip = build_inventory(
        config(connection="direct", direct_address="ip"), USER, [device(1)], HELPER
    )
    assert by_ip[0].vars["ansible_host"] == "10.0.0.5"


def test_tunnel_user_of_a_fleet_key_is_root_and_odd_usernames_are_refused() -> None:
    """A non-user key makes the tunnel user root (as balena-cli does); odd usernames fail."""
    (host,) = build_inventory(config(), Actor("application", None), [device(1)], HELPER)
    assert host.vars["ansible_user"] == "root"
    with pytest.raises(InventorySourceError, match="not a plain name"):
        build_inventory(config(), Actor("user", "evil; rm -rf /"), [device(1)], HELPER)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"fleets": ["gateways"]}, r"fleets: Value error, 'gateways': a fleet slug is org/fleet"),
        ({"fleets": []}, r"fleets: Tuple should have at least 1 item"),
        ({"filters": {"os_version": "newest"}}, r"filters\.os_version: Value error, not a version"),
        ({"filters": {"color": "red"}}, r"filters\.color: Extra inputs are not permitted"),
        ({"api_url": "api.balena-cloud.com"}, r"api_url: Value error, not an http\(s\) URL"),
        ({"api_url": "http://10.0.0.1"}, r"tunnel_host: cannot be derived from api_url"),
        ({"token_env": "MY-TOKEN"}, r"token_env: Value error, not an environment variable"),
        ({"control_persist": "forever"}, r"control_persist: Value error"),
        ({"max_tunnels": 0}, r"max_tunnels: Input should be greater than or equal to 1"),
    ],
)
def test_bad_configuration_names_the_field(options: dict[str, Any], expected: str) -> None:
    """Each configuration error is an InventoryError naming the file and the field."""
    with pytest.raises(InventoryError, match=rf"^inv\.yml: .*{expected}"):
        load_config({"fleets": ["myorg/gateways"], **options}, "inv.yml")


def test_openbalena_tunnel_host_comes_from_the_api_host() -> None:
    """``api.<domain>`` gives ``tunnel.<domain>``; a configured tunnel_host wins."""
    assert (
        config(api_url="https://api.balena.example.org:8443/").tunnel == "tunnel.balena.example.org"
    )
    assert config(api_url="http://10.0.0.1", tunnel_host="t.example").tunnel == "t.example"


def test_malformed_devices_from_the_api_are_refused() -> None:
    """A device without a hex uuid or a fleet link is an InventorySourceError naming it."""
    row = device(1).model_dump()
    bad_rows: list[dict[str, Any]] = [{"uuid": "../../etc"}, {"belongs_to__application": []}]
    for bad in bad_rows:
        with pytest.raises(InventorySourceError, match=r"device #1 \(id 1001\) is malformed"):
            parse_devices([{**row, **bad}], "https://api.example")


def test_plugin_documentation_defaults_are_the_models() -> None:
    """The defaults ``ansible-doc`` shows are the ones the plugin applies."""
    tree = ast.parse(PLUGIN.read_text())
    text = next(
        str(node.value.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], "id", "") == "DOCUMENTATION"
        and isinstance(node.value, ast.Constant)
    )
    options = yaml.safe_load(text)["options"]
    fields = InventoryConfig.model_fields
    assert set(fields) <= set(options)
    for name, field in fields.items():
        if field.is_required():
            assert options[name]["required"] is True
            continue
        documented = options[name].get("default")
        default = field.get_default(call_default_factory=True)
        if name == "filters":  # documented as {}: no filter
            assert default == load_config({"fleets": ["o/f"], "filters": {}}, "x").filters
        else:
            assert documented == default, name


def test_errors_travel_through_ansible_as_one_marked_line() -> None:
    """The plugin's line carries the class; the engine maps it back to exit 2 or 3."""
    auth = marked(InventoryError("balena API refused the token in $BALENA_API_KEY\n(HTTP 401)"))
    down = marked(InventorySourceError("balena API unavailable: HTTP 503"))
    assert "\n" not in auth
    text = f"[WARNING]: Failed to parse inventory with 'auto' plugin: {down}\nmore\n"
    assert carries_error(text)
    error = inventory_error(Path("inv.yml"), text)
    assert isinstance(error, InventorySourceError)
    assert error.exit_code == 3
    assert str(error) == "inventory inv.yml: balena API unavailable: HTTP 503"
    again = inventory_error(Path("inv.yml"), auth)
    assert isinstance(again, InventoryError)
    assert again.exit_code == 2
    assert inventory_error(Path("x"), "ERROR! Completely failed to parse") is None
    assert re.search(r"\(HTTP 401\)$", str(again))


def test_the_shipped_example_and_its_commented_options_are_valid() -> None:
    """inventories/balena-cloud.yml loads, and so does each option it shows commented out."""
    example = Path(__file__).parents[1] / "inventories" / "balena-cloud.yml"
    text = example.read_text()
    given = yaml.safe_load(text)
    assert given.pop("plugin") == "balena_cloud"
    load_config(given, str(example))
    shown = re.findall(r"^# ([a-z_]+): (.*?)[ \t]*(?:#.*)?$", text, re.MULTILINE)
    options = {k: yaml.safe_load(v) for k, v in shown if k in InventoryConfig.model_fields}
    assert {"api_url", "token_env", "connection", "max_tunnels", "ssh_user"} <= set(options)
    load_config({**given, **options}, str(example))
