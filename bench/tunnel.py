#!/usr/bin/env python3
"""Through balena's tunnel vs directly: ``remediate plan`` of a 12-check runbook, 50 devices.

The devices are simulated: sshd processes on loopback addresses ``127.78.0.1``…``.50``, port
22222 (16 addresses per sshd, key auth as this user, no Python needed: ``raw`` only).  Each
round runs ``remediate plan`` as a fresh subprocess, on one of:

* **direct**: a static YAML inventory, ``ansible_host`` the device's address;
* **tunnel, max_tunnels 50**: the ``balena_cloud`` plugin against the fake balena API of the
  tests (real HTTP), every SSH connection through ``remediate-tunnel`` → TLS (stunnel, a test
  CA) → an HTTP CONNECT proxy with basic auth (squid) → the device: the tunnel's own cost at
  the same concurrency as direct (the verdict);
* **tunnel, max_tunnels 10** (the default): the same with the default bound on open tunnels,
  so at most 10 devices are probed at once (for reference: the price of the bound).

Both sides use fresh SSH connections (``ControlMaster=no``, the plugin's default for the
tunnel), so no round reuses a previous round's connection.  The rounds rotate the three after
a warm-up round; medians of wall and CPU seconds (this process's children) are compared.

Target: the tunnel at most 1.3x direct.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml
from fleet import write_runbook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fake balena API and the tunnel host of the tests

from tests.support.balena_api import TOKEN, USERNAME, FakeBalenaApi, FakeDevice, uuid_of  # noqa: E402
from tests.support.tunnel import LabCa, tunnel_host  # noqa: E402

TARGET = 1.3
BIN = Path(sys.executable).parent
DIRECT, TUNNEL, TUNNEL_DEFAULT = "direct", "tunnel (max_tunnels 50)", "tunnel (max_tunnels 10)"
_PER_SSHD = 16  # sshd listens on at most 16 sockets
_SSH_ARGS = "-C -o ControlMaster=no -o ControlPath=none"
_COMMON = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"


def addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{n}" for n in range(1, count + 1)]


@contextmanager
def devices(root: Path, listen: list[str]) -> Iterator[Path]:
    """Start sshd processes serving ``listen`` on port 22222; yield the client key."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host")], check=True
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "key")], check=True
    )
    shutil.copy(root / "key.pub", root / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(0, len(listen), _PER_SSHD):
            config = root / f"sshd-{i}.conf"
            config.write_text(
                "".join(f"ListenAddress {a}:22222\n" for a in listen[i : i + _PER_SSHD])
                + f"HostKey {root / 'host'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
                f"PidFile {root / f'sshd-{i}.pid'}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "StrictModes no\nUseDNS no\nMaxStartups 200:30:400\nMaxSessions 50\n"
                "LogLevel ERROR\n"
            )
            started.append(
                subprocess.Popen(
                    ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL
                )
            )
        time.sleep(0.5)
        if any(p.poll() is not None for p in started):
            raise SystemExit("an sshd did not start (addresses taken?); try --net 127.79.0")
        yield root / "key"
    finally:
        for proc in started:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def write_direct(path: Path, listen: list[str], key: Path, user: str) -> None:
    hosts = {f"dev{n:02d}": {"ansible_host": a} for n, a in enumerate(listen, 1)}
    group = {
        "hosts": hosts,
        "vars": {
            "ansible_port": 22222,
            "ansible_user": user,
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_args": _SSH_ARGS,
            "ansible_ssh_common_args": _COMMON,
            "ansible_python_interpreter": "/nonexistent/python3",
        },
    }
    path.write_text(yaml.safe_dump({"all": {"children": {"fleet": group}}}), encoding="utf-8")


def write_tunnel(
    path: Path, api_url: str, port: int, ca: Path, user: str, key: Path, most: int
) -> None:
    path.parent.joinpath("group_vars").mkdir(parents=True, exist_ok=True)
    path.parent.joinpath("group_vars", "balena_fleet.yml").write_text(
        yaml.safe_dump(
            {
                "ansible_ssh_private_key_file": str(key),
                "ansible_python_interpreter": "/nonexistent/python3",
            }
        )
    )
    config = {
        "plugin": "balena_cloud",
        "api_url": api_url,
        "tunnel_host": "localhost",
        "tunnel_port": port,
        "ca_file": str(ca),
        "fleets": ["bench/fleet"],
        "ssh_user": user,
        "ssh_common_args": _COMMON,
        "max_tunnels": most,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def cpu_children() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def plan(
    runbook: Path, inventory: Path, state: Path, env: Mapping[str, str]
) -> tuple[float, float, dict[str, int]]:
    argv = [
        str(BIN / "remediate"),
        "--state-dir",
        str(state),
        "--runbooks",
        str(runbook.parent),
        "--playbooks",
        str(runbook.parent.parent / "playbooks"),
        "plan",
        str(runbook),
        "-i",
        str(inventory),
        "-o",
        "json",
    ]
    cpu, start = cpu_children(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(env), check=False)
    wall, used = time.perf_counter() - start, cpu_children() - cpu
    outcomes: dict[str, int] = {}
    try:
        for host in json.loads(done.stdout)["hosts"]:
            outcomes[host["outcome"]] = outcomes.get(host["outcome"], 0) + 1
    except (ValueError, KeyError):
        outcomes[f"exit {done.returncode}: {done.stderr.strip()[-300:]}"] = 1
    return wall, used, outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=50, help="simulated devices [50]")
    parser.add_argument("--checks", type=int, default=12, help="checks of the runbook [12]")
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds [5]")
    parser.add_argument("--net", default="127.78.0", help="loopback /24 of the devices [127.78.0]")
    args = parser.parse_args()
    user = os.environ.get("USER") or "root"
    listen = addresses(args.net, args.devices)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        runbook = write_runbook(root / "project", args.checks)
        key = stack.enter_context(devices(root, listen))
        uuids = [uuid_of(n) for n in range(len(listen))]
        fleet = [FakeDevice(u, f"device-{n:02d}", "bench/fleet") for n, u in enumerate(uuids)]
        api = stack.enter_context(FakeBalenaApi({"bench/fleet": 1}, fleet))
        api_url = api.start()
        ca = LabCa.make(root / "ca")
        host = stack.enter_context(
            tunnel_host(
                root, ca, user=USERNAME, token=TOKEN, devices=dict(zip(uuids, listen, strict=True))
            )
        )
        inventories = {DIRECT: root / "direct" / "inventory.yml"}
        inventories[DIRECT].parent.mkdir()
        write_direct(inventories[DIRECT], listen, key, user)
        for name, most in ((TUNNEL, 50), (TUNNEL_DEFAULT, 10)):
            inventories[name] = root / name.split()[-1].strip(")") / "balena-cloud.yml"
            write_tunnel(inventories[name], api_url, host.port, ca.ca, user, key, most)
        env = {**os.environ, "BALENA_API_KEY": TOKEN, "REMEDIATE_USER": "bench"}
        names = list(inventories)
        walls: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        outcomes: dict[str, dict[str, int]] = {n: {} for n in names}
        for round_ in range(args.repeat + 1):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                wall, used, seen = plan(runbook, inventories[name], root / "state", env)
                if round_:  # round 0 warms up
                    walls[name].append(wall)
                    cpus[name].append(used)
                    for k, v in seen.items():
                        outcomes[name][k] = outcomes[name].get(k, 0) + v
    load_after = os.getloadavg()[0]
    print(
        f"tunnel vs direct: remediate plan, {args.checks} checks, {args.devices} simulated "
        f"devices (sshd on {args.net}.x), {args.repeat} rounds after a warm-up"
    )
    print(
        f"load average before {load_before:.2f}, after {load_after:.2f} (2 CPUs shared with "
        "other work show up in every figure)"
    )
    median = {n: statistics.median(walls[n]) for n in names}
    for name in names:
        print(
            f"  {name:<24} wall {median[name]:6.2f} s (min {min(walls[name]):.2f}, max "
            f"{max(walls[name]):.2f})  CPU {statistics.median(cpus[name]):6.2f} s  "
            f"outcomes {outcomes[name]}"
        )
    ratio = median[TUNNEL] / median[DIRECT]
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"tunnel / direct at equal concurrency: {ratio:.2f} (target ≤ {TARGET}): {verdict}")
    print(f"default max_tunnels 10 / direct: {median[TUNNEL_DEFAULT] / median[DIRECT]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
