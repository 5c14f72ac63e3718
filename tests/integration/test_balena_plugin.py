"""The balena_cloud inventory plugin in real Ansible, against the fake balena API (real HTTP).

Plain ``ansible-inventory``/``ansible`` find the plugin the way ``inventories/README.md``
says; the engine's own paths (``remediate plan``, target selection) find it by themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.ansible_plugins import inventory_plugins_env
from engine.errors import InventoryError, InventorySourceError
from engine.targets import select_hosts
from tests.support.balena_api import TOKEN, FakeBalenaApi, FakeDevice, uuid_of
from tests.support.cli import run_remediate

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PWNED = Path("/tmp/remediate-balena-pwned")
HOSTILE = "{{ lookup('pipe', 'touch /tmp/remediate-balena-pwned') }}"


def fleet() -> list[FakeDevice]:
    """Two fleets; names with spaces, unicode, shell metacharacters; a duplicate; an offline one."""
    return [
        FakeDevice(uuid_of(1), "gateway berlin #1", "myorg/gateways", tags={"site": "berlin"}),
        FakeDevice(uuid_of(2), "gateway berlin #1", "myorg/gateways", tags={"site": HOSTILE}),
        FakeDevice(
            uuid_of(3),
            "Zürich; rm -rf / $(id)",
            "myorg/gateways",
            os_version="balenaOS 6.0.13",
            device_type="intel-nuc",
        ),
        FakeDevice(uuid_of(4), "asleep", "myorg/gateways", online=False),
        FakeDevice(uuid_of(5), "cam-1", "myorg/cameras", tags={"site": "berlin"}),
        FakeDevice(uuid_of(6), "not-mine", "otherorg/fleet"),
    ]


@pytest.fixture
def api() -> Iterator[FakeBalenaApi]:
    """The fake API on 127.0.0.1 with :func:`fleet`."""
    with FakeBalenaApi(
        {"myorg/gateways": 7, "myorg/cameras": 9, "otherorg/fleet": 11}, fleet()
    ) as fake:
        fake.start()
        yield fake


def write_inventory(path: Path, api: FakeBalenaApi, **options: Any) -> Path:
    config = {
        "plugin": "balena_cloud",
        "api_url": api.url,
        "tunnel_host": "tunnel.example.test",
        "fleets": ["myorg/gateways", "myorg/cameras"],
        **options,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def ansible(tool: str, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **inventory_plugins_env(), "BALENA_API_KEY": token, "NO_COLOR": "1"}
    return subprocess.run(
        [str(BIN / tool), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_ansible_inventory_lists_safe_hosts_groups_and_vars(
    api: FakeBalenaApi, tmp_path: Path
) -> None:
    """Plain ansible-inventory: safe unique names, groups, balena_* vars, 2 pages and a 429."""
    api.throttle = {4}  # the second page of devices
    inventory = write_inventory(
        tmp_path / "balena-cloud.yml", api, page_size=3, include_offline=True
    )
    listed = ansible("ansible-inventory", "-i", str(inventory), "--list")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    hostvars = data["_meta"]["hostvars"]
    twin1, twin2 = f"gateway-berlin-1-{uuid_of(1)[:7]}", f"gateway-berlin-1-{uuid_of(2)[:7]}"
    assert set(hostvars) == {twin1, twin2, "Zurich-rm-rf-id", "asleep", "cam-1"}
    assert sorted(data["balena_fleet"]["hosts"]) == sorted(
        [twin1, twin2, "Zurich-rm-rf-id", "cam-1"]
    )
    assert data["offline"]["hosts"] == ["asleep"]
    assert sorted(data["tag_site_berlin"]["hosts"]) == sorted([twin1, "cam-1"])
    assert data["fleet_myorg_cameras"]["hosts"] == ["cam-1"]
    assert data["os_6_0_13"]["hosts"] == ["Zurich-rm-rf-id"]
    assert data["device_type_intel_nuc"]["hosts"] == ["Zurich-rm-rf-id"]
    odd = _plain(hostvars["Zurich-rm-rf-id"])
    assert odd["balena_device_name"] == "Zürich; rm -rf / $(id)"
    assert odd["balena_uuid"] == uuid_of(3)
    assert odd["balena_fleet"] == "myorg/gateways"
    assert odd["ansible_host"] == f"{uuid_of(3)}.balena"
    assert (odd["balena_os_version"], odd["balena_os_variant"]) == ("balenaOS 6.0.13", "prod")
    assert (odd["balena_supervisor_version"], odd["balena_is_online"]) == ("12.11.38", True)
    assert _plain(hostvars[twin2])["balena_tags"] == {"site": HOSTILE}
    pages = [r for r in api.requests if r.startswith("/v7/device")]
    assert len(pages) == 4  # page 2 answered 429 once, then 3 devices + 2 devices + empty
    assert TOKEN not in listed.stdout + listed.stderr


def test_values_from_the_api_are_never_templated(api: FakeBalenaApi, tmp_path: Path) -> None:
    """A tag holding ``{{ lookup('pipe', ...) }}`` is printed as text by a real play; not run."""
    PWNED.unlink(missing_ok=True)
    inventory = write_inventory(tmp_path / "balena-cloud.yml", api)
    shown = ansible(
        "ansible",
        "-i",
        str(inventory),
        "tag_site_*",
        "-m",
        "ansible.builtin.debug",
        "-a",
        "msg={{ balena_tags.site }}",
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert HOSTILE in shown.stdout
    assert not PWNED.exists()


def test_engine_selection_uses_the_plugin_without_configuration(
    api: FakeBalenaApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's target selection finds the plugin and keeps the vars untemplated."""
    monkeypatch.setenv("BALENA_API_KEY", TOKEN)
    inventory = write_inventory(tmp_path / "balena-cloud.yml", api)
    hosts = {h.name: h.vars for h in select_hosts(inventory, "tag_site_berlin:&balena_fleet")}
    assert set(hosts) == {f"gateway-berlin-1-{uuid_of(1)[:7]}", "cam-1"}
    assert hosts["cam-1"]["balena_uuid"] == uuid_of(5)
    assert "ProxyCommand=" in hosts["cam-1"]["ansible_ssh_common_args"]


def test_inventory_cache_spares_the_api(api: FakeBalenaApi, tmp_path: Path) -> None:
    """With Ansible's jsonfile cache, a second read asks the API nothing; --flush-cache does."""
    cache = tmp_path / "cache"
    inventory = write_inventory(
        tmp_path / "balena-cloud.yml",
        api,
        cache=True,
        cache_plugin="jsonfile",
        cache_connection=str(cache),
        cache_timeout=300,
    )
    first = ansible("ansible-inventory", "-i", str(inventory), "--graph")
    assert first.returncode == 0, first.stderr
    asked = len(api.requests)
    api.mode = "down"  # a cached read must not need the API at all
    second = ansible("ansible-inventory", "-i", str(inventory), "--graph")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert len(api.requests) == asked
    cached = "".join(p.read_text() for p in cache.iterdir())
    assert uuid_of(5) in cached
    assert TOKEN not in cached
    api.mode = "ok"
    ansible("ansible-inventory", "-i", str(inventory), "--graph", "--flush-cache")
    assert len(api.requests) > asked


def test_errors_reach_the_cli_as_one_line_with_their_exit_code(
    api: FakeBalenaApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong token: exit 2; API down: exit 3; one line naming the cause, no traceback."""
    inventory = write_inventory(tmp_path / "balena-cloud.yml", api, max_retries=1)
    state = tmp_path / "state"
    monkeypatch.setenv("BALENA_API_KEY", "not-the-token")
    wrong = run_remediate(["plan", "stale-probe-scratch", "-i", str(inventory)], state)
    assert wrong.returncode == 2
    assert wrong.stderr == (
        f"error: inventory {inventory}: balena API {api.url}/actor/v1/whoami refused the token "
        "in $BALENA_API_KEY (HTTP 401 Unauthorized): export a valid API key or session token\n"
    )
    monkeypatch.setenv("BALENA_API_KEY", TOKEN)
    api.mode = "down"
    down = run_remediate(["plan", "stale-probe-scratch", "-i", str(inventory)], state)
    assert down.returncode == 3
    assert down.stderr == (
        f"error: inventory {inventory}: balena API unavailable: GET {api.url}/actor/v1/whoami: "
        "HTTP 503 Service Unavailable (gave up after 2 attempts)\n"
    )
    assert len([r for r in api.requests if r.startswith("/actor")]) == 3  # 1 + 2: no re-read


def test_unknown_fleets_and_nonsense_answers_fail_the_selection(
    api: FakeBalenaApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt option or an unknown fleet is an input error; truncated JSON a source fault."""
    monkeypatch.setenv("BALENA_API_KEY", TOKEN)
    inventory = write_inventory(tmp_path / "balena-cloud.yml", api, online_onyl=False)
    with pytest.raises(
        InventoryError, match=r"balena-cloud\.yml: unknown option\(s\) 'online_onyl'"
    ):
        select_hosts(inventory, "all")
    assert api.requests == []  # refused before asking the API anything
    write_inventory(tmp_path / "balena-cloud.yml", api, fleets=["myorg/gateways", "myorg/nope"])
    with pytest.raises(InventoryError, match=r"fleets: 'myorg/nope' not found on http://"):
        select_hosts(inventory, "all")
    write_inventory(inventory, api)
    api.mode = "truncated"
    with pytest.raises(InventorySourceError, match=r"with invalid JSON \(truncated\?\)"):
        select_hosts(inventory, "all")


def _plain(host_vars: dict[str, Any]) -> dict[str, Any]:
    """ansible-inventory's JSON with its ``__ansible_unsafe`` wrappers removed."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__ansible_unsafe"}:
                return value["__ansible_unsafe"]
            return {k: unwrap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unwrap(v) for v in value]
        return value

    return {k: unwrap(v) for k, v in host_vars.items()}


def test_plain_ansible_finds_the_plugin_from_the_checkout_or_the_export_line(
    api: FakeBalenaApi, tmp_path: Path
) -> None:
    """As inventories/README.md says: from the checkout `ansible-inventory --graph` just works.

    Elsewhere the line ``python -m engine.ansible_plugins`` prints names the plugin's folder.
    """
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_INVENTORY_PLUGINS"}
    root = Path(__file__).resolve().parents[2]
    inventory = write_inventory(tmp_path / "balena-cloud.yml", api)
    graph = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(inventory), "--graph"],
        cwd=root,  # ansible.cfg at the repository root names the plugin's folder
        env={**env, "BALENA_API_KEY": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert graph.returncode == 0, graph.stderr
    for group in ("@balena_fleet:", "@fleet_myorg_gateways:", "@tag_site_berlin:", "--cam-1"):
        assert group in graph.stdout
    line = subprocess.run(
        [sys.executable, "-m", "engine.ansible_plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert line == f"export ANSIBLE_INVENTORY_PLUGINS={root / 'engine/ansible_plugins/inventory'}\n"
