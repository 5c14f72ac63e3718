"""A balenaCloud fleet end to end: the plugin's inventory, the tunnel, real lab devices.

The controller (``remediate``, Ansible, ssh, remediate-tunnel) runs in a network namespace of
its own that has nothing but loopback: the lab devices' sshd (127.77.x.y:22222 in the root
namespace) cannot be reached from it.  What it can reach, on its own 127.0.0.1, is the fake
balena API (HTTPS, the test CA) and a relay to the tunnel host (stunnel → squid with basic
auth, which alone resolves ``<uuid>.balena`` to the devices).  So every probe and every
playbook reaches the devices through the tunnel, or not at all.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.lab import Device, Lab
from tests.support.balena_api import USERNAME, FakeBalenaApi, FakeDevice, uuid_of
from tests.support.lab import LabDevices
from tests.support.ports import free_port
from tests.support.tunnel import LabCa, NetNs, Relay, TunnelHost, stop, tunnel_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.lab]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "lab-balena-token-0123456789abcdef"  # noqa: S105 - a test credential
WEBHOOK_TOKEN = "lab-webhook-token-0123456789"  # noqa: S105 - a test credential
REMEDIATE = [sys.executable, "-c", "from engine.cli import main; main()"]
GHOST = uuid_of(99)  # online for the API; the tunnel host can reach nothing there
ASLEEP = uuid_of(98)  # offline


@dataclass(frozen=True)
class Cloud:
    """What the tests drive: the namespace, the inventory, the devices, the state dir."""

    ns: NetNs
    inventory: Path
    berlin: Device
    paris: Device
    api: FakeBalenaApi
    state: Path
    root: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BALENA_API_KEY": TOKEN,
            "REMEDIATE_STATE_DIR": str(self.state),
            "REMEDIATE_USER": "tester",
        }

    def remediate(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ns.command([*REMEDIATE, *args]),
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


@pytest.fixture(scope="module")
def cloud(
    lab: Lab, lab_devices: LabDevices, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cloud]:
    """Two lab devices in a fake balenaCloud fleet, a tunnel host, and the controller's netns."""
    reason = tunnel_skip_reason()
    if reason:
        pytest.skip(reason)
    berlin, paris = lab_devices(2)
    root = tmp_path_factory.mktemp("cloud")
    ca = LabCa.make(root / "ca")
    fleet = [
        FakeDevice(
            berlin.balena_uuid, "gateway berlin #1", "lab/gateways", tags={"site": "berlin"}
        ),
        FakeDevice(paris.balena_uuid, "gateway paris", "lab/gateways", tags={"site": "paris"}),
        FakeDevice(GHOST, "ghost", "lab/gateways"),
        FakeDevice(ASLEEP, "asleep", "lab/gateways", online=False),
    ]
    api = FakeBalenaApi({"lab/gateways": 31}, fleet, token=TOKEN)
    api.throttle = {4}  # one 429 (Retry-After: 1) on the first inventory read
    routes = {
        berlin.balena_uuid: berlin.address,
        paris.balena_uuid: paris.address,
        GHOST: "127.0.0.9",
    }
    tunnel = TunnelHost(root, ca, user=USERNAME, token=TOKEN, devices=routes)
    ns = NetNs()
    relay: Relay | None = None
    try:
        tunnel.start()
        api_url = api.start(ns.listen(), tls=ca.server_context(), name="localhost")
        relay = Relay(ns.listen(443), to=("127.0.0.1", tunnel.port))
        inventories = root / "inventories"
        (inventories / "group_vars").mkdir(parents=True)
        inventory = inventories / "balena-cloud.yml"
        inventory.write_text(
            f"plugin: balena_cloud\napi_url: {api_url}\ntunnel_host: localhost\n"
            f"ca_file: {ca.ca}\nfleets: [lab/gateways]\nssh_user: root\n"
            "ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR\nmax_tunnels: 2\npage_size: 2\nmax_retries: 2\n"
        )
        (inventories / "group_vars" / "balena_fleet.yml").write_text(
            f"ansible_ssh_private_key_file: {lab.private_key}\n"
        )
        yield Cloud(ns, inventory, berlin, paris, api, root / "state", root)
    finally:
        if relay is not None:
            relay.close()
        ns.close()
        api.stop()
        tunnel.stop()


def test_devices_are_not_reachable_directly_from_the_controller(cloud: Cloud) -> None:
    """From the controller's namespace, a device's sshd is not reachable: only the tunnel is."""
    direct = subprocess.run(
        cloud.ns.command(
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=3",
                "-p",
                "22222",
                f"root@{cloud.berlin.address}",
                "true",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert direct.returncode == 255
    assert "Connection refused" in direct.stderr


def test_plan_and_apply_reach_lab_devices_through_the_tunnel(cloud: Cloud) -> None:
    """`remediate plan` and `run --apply` of a bundled runbook work through the tunnel only."""
    scratch = "/tmp/.remediate-probe.BalT01"  # the exact pattern the playbook accepts
    old = int(time.time()) - 3 * 3600
    cloud.berlin.sh(f"mkdir -p {scratch} && touch -d @{old} {scratch}")
    saved = cloud.root / "plan.json"
    plan = cloud.remediate(
        "plan", "stale-probe-scratch", "-i", str(cloud.inventory), "-o", "json", "--out", str(saved)
    )
    assert plan.returncode == 1, plan.stderr  # the ghost device is unreachable
    hosts = {h["host"]: h for h in json.loads(plan.stdout)["hosts"]}
    assert set(hosts) == {"gateway-berlin-1", "gateway-paris", "ghost"}  # not the offline one
    assert hosts["gateway-berlin-1"]["outcome"] == "planned"
    assert hosts["gateway-paris"]["outcome"] == "healthy"
    ghost = hosts["ghost"]
    assert ghost["outcome"] == "unreachable"
    assert (
        f"remediate-tunnel: {GHOST}.balena: tunnel host localhost:443 refused CONNECT "
        f"{GHOST}.balena:22222: 503 Service Unavailable"
    ) in ghost["reason"]

    run = cloud.remediate(
        "run",
        "stale-probe-scratch",
        "-i",
        str(cloud.inventory),
        "--limit",
        "fleet_lab_gateways:&tag_site_berlin",  # the example: a fleet and a tag
        "--apply",
        "--yes",
        "-o",
        "json",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    outcomes = {h["host"]: h["outcome"] for h in json.loads(run.stdout)["hosts"]}
    assert outcomes == {"gateway-berlin-1": "fixed"}
    assert cloud.berlin.sh(f"test -e {scratch}", check=False).returncode == 1


def test_serve_routes_an_alert_by_balena_uuid_to_a_plugin_host(cloud: Cloud) -> None:
    """`remediate serve` maps an alert's balena_uuid to its plugin host; an offline one is none.

    The breaker opens on the first failed run here (``max_failures: 0``): the offline
    device's alert is recorded unresolved, queues no run and leaves the breaker closed.
    """
    port = free_port()
    config = cloud.root / "server.yml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\ninventory: {cloud.inventory}\n"
        f"runbooks_dir: {ROOT / 'runbooks'}\nplaybooks_dir: {ROOT / 'playbooks'}\n"
        f"auth: {{token: {WEBHOOK_TOKEN}}}\nworkers: 1\nbreaker: {{max_failures: 0}}\n"
    )
    config.chmod(0o600)  # it holds the webhook token
    log = cloud.root / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            cloud.ns.command([sys.executable, "-m", "engine.server", "--config", str(config)]),
            env=cloud.env(),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    relay = Relay(socket.create_server(("127.0.0.1", 0)), connect=lambda: cloud.ns.connect(port))
    url = f"http://127.0.0.1:{relay.port}"
    headers = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    try:
        _wait(lambda: _answers(f"{url}/healthz"), server, log, "the server to start")
        alert: dict[str, Any] = {
            "status": "firing",
            "labels": {
                "alertname": "NodeFilesystemAlmostOutOfSpace",
                "mountpoint": "/mnt/data",
                "balena_uuid": cloud.paris.balena_uuid,
            },
            "annotations": {},
            "startsAt": "2026-12-01T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example:9090/graph",
            "fingerprint": "b4l3n4c10ud00001",
        }
        asleep = {
            **alert,
            "labels": {**alert["labels"], "balena_uuid": ASLEEP},
            "fingerprint": "b4l3n4c10ud00002",
        }
        body = {
            "version": "4",
            "groupKey": "{}:{}",
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "remediate",
            "groupLabels": {},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093",
            "alerts": [alert, asleep],
        }
        posted = httpx.post(f"{url}/webhook", json=body, headers=headers, timeout=10)
        assert posted.status_code == 202, posted.text

        def done() -> dict[str, Any] | None:
            items = httpx.get(f"{url}/queue", headers=headers, timeout=10).json()["items"]
            return next((i for i in items if i["state"] == "done"), None)

        item = _wait(done, server, log, "the alert's run to finish")
        assert item["host"] == "gateway-paris"
        assert item["runbook"] == "data-partition-full"
        assert item["run_status"] == "succeeded", log.read_text()[-3000:]
        items = httpx.get(f"{url}/queue", headers=headers, timeout=10).json()["items"]
        assert [i["host"] for i in items] == ["gateway-paris"]  # nothing for the offline one
        unresolved = httpx.get(f"{url}/alerts?status=unresolved", headers=headers, timeout=10)
        assert [a["fingerprint"] for a in unresolved.json()["alerts"]] == ["b4l3n4c10ud00002"]
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["breaker"]["open"] is False
        assert health["inventory"]["hosts"] == 3  # berlin, paris, ghost: not the offline one
    finally:
        relay.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop(server)


def test_the_token_is_in_no_file_the_runs_wrote(cloud: Cloud) -> None:
    """After the runs above, neither the token nor its Basic form is in any file they wrote.

    That is everything under the test's folder: the state dir (audit log, state store, saved
    playbook artifacts with their job events, the work dir), the saved plan and the server's
    log.
    """
    secrets = [TOKEN.encode(), base64.b64encode(f"{USERNAME}:{TOKEN}".encode())]
    files = [p for p in cloud.root.rglob("*") if p.is_file()]
    assert {"server.log", "plan.json"} <= {p.name for p in files}
    assert any("job_events" in p.parts for p in files)  # the playbook's events were kept
    assert any(p.name == "audit.jsonl" for p in files)
    leaked = [str(p) for p in files for s in secrets if s in p.read_bytes()]
    assert leaked == []


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check: Any, server: subprocess.Popen[bytes], log: Path, what: str) -> Any:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
