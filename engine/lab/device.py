"""One lab device as the host sees it: its saved state and how to run commands inside it.

:class:`Device` is what tests, faults and the image set work with; it knows nothing about how a
device is built or stopped (that is :mod:`engine.lab.devices`).  Commands run inside a device
through its namespaces (``nsenter`` into its PID 1: mount, PID, network, UTS, IPC and cgroup
namespaces, with a clean environment) or over SSH as Ansible would.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from engine.errors import ExecutorError

SSH_PORT = 22222
SUPERVISOR_PORT = 48484
#: Where a device sees the host's network namespace (its sshd socket, exposed ports).
HOST_NETNS = "/run/lab-host-netns"
#: A port of a device's own loopback, offered in the host's namespace (see Device.expose).
_EXPOSE_SOCKET = """[Unit]
Description=lab: the device's 127.0.0.1:{port} on {address}:{port} in the host's namespace

[Socket]
ListenStream={address}:{port}
NetworkNamespacePath={netns}
Accept=no
"""
_EXPOSE_SERVICE = """[Unit]
Description=lab: forward {address}:{port} to 127.0.0.1:{port}
Requires=lab-expose-{port}.socket
After=lab-expose-{port}.socket

[Service]
ExecStart=/usr/lib/systemd/systemd-socket-proxyd 127.0.0.1:{port}
"""
DEVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
REQUIRED_TOOLS: Mapping[str, str] = {
    "systemd-nspawn": "systemd-container",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "busybox": "busybox-static",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "losetup": "util-linux",
    "curl": "curl",
}


class DeviceState(BaseModel):
    """What ``up`` started for one device; enough for another process to stop it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    index: int
    address: str
    balena_uuid: str
    cgroup: str
    dir: str
    nspawn_pid: int
    nspawn_start: int
    leader_pid: int
    leader_start: int


class LabState(BaseModel):
    """The lab's state file: its directory, address slot, key, and devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lab_dir: str
    slot: int
    data_mb: int
    private_key: str
    inventory: str
    image_tar: str | None
    devices: tuple[DeviceState, ...]


def host_tool(name: str) -> str:
    """Absolute path of a host tool; ExecutorError naming its Debian package when missing."""
    found = shutil.which(name, path=HOST_PATH)
    if found is None:
        raise ExecutorError(f"lab: tool {name!r} not found (package {REQUIRED_TOOLS.get(name)})")
    return found


def proc_start(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])


def run_command(
    args: Sequence[str],
    *,
    check: bool = True,
    input_data: bytes | None = None,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command; ExecutorError with its stderr when it fails (unless not ``check``)."""
    try:
        proc = subprocess.run(
            list(args),
            input=input_data.decode() if input_data is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=dict(env) if env is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExecutorError(f"lab: {' '.join(args)} failed: {exc}") from exc
    if check and proc.returncode != 0:
        raise ExecutorError(
            f"lab: {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc


class Device:
    """A running lab device; commands run inside it through its namespaces or over SSH."""

    def __init__(self, state: DeviceState, lab_state: LabState) -> None:
        self.state = state
        self._lab = lab_state

    @property
    def name(self) -> str:
        """Inventory host name (``dev1`` ...)."""
        return self.state.name

    @property
    def address(self) -> str:
        """Loopback address its sshd listens on (port 22222)."""
        return self.state.address

    @property
    def balena_uuid(self) -> str:
        """The device's 32-hex-digit balena UUID."""
        return self.state.balena_uuid

    def __repr__(self) -> str:
        return f"Device({self.name!r}, {self.address})"

    def path(self, inside: str) -> Path:
        """Host path of a file as the device sees it (through ``/proc/<pid1>/root``)."""
        return Path(f"/proc/{self.state.leader_pid}/root") / inside.lstrip("/")

    def nsenter_args(self, args: Sequence[str]) -> list[str]:
        """Argument list that runs ``args`` inside the device (all its namespaces, clean env)."""
        return [
            host_tool("nsenter"),
            "-t",
            str(self.state.leader_pid),
            "-a",
            "env",
            "-i",
            f"PATH={DEVICE_PATH}",
            "HOME=/root",
            "LANG=C.UTF-8",
            *args,
        ]

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        input_data: bytes | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the device (as root, from the host) and return its result."""
        return run_command(
            self.nsenter_args(args), check=check, input_data=input_data, timeout=timeout
        )

    @contextlib.contextmanager
    def expose(self, port: int) -> Iterator[str]:
        """Offer the device's ``127.0.0.1:PORT`` to the host as ``ADDRESS:PORT``; yields that.

        A device has a network namespace of its own (loopback only), so a service on its host
        network (a container with ``network_mode: host``) is out of the host's reach, as a real
        device's is until a VPN or LAN connects them.  As for its sshd, a socket unit binds the
        port in the host's namespace and ``systemd-socket-proxyd`` in the device forwards each
        connection to ``127.0.0.1:PORT``.  Both units are removed afterwards.
        """
        names = {"socket": f"lab-expose-{port}.socket", "service": f"lab-expose-{port}.service"}
        texts = {"socket": _EXPOSE_SOCKET, "service": _EXPOSE_SERVICE}
        units = self.path("/run/systemd/system")
        for kind, name in names.items():
            text = texts[kind].format(address=self.address, port=port, netns=HOST_NETNS)
            (units / name).write_text(text)
        try:
            self.run(["systemctl", "daemon-reload"])
            self.run(["systemctl", "start", names["socket"]])
            yield f"{self.address}:{port}"
        finally:
            self.run(["systemctl", "stop", names["socket"], names["service"]], check=False)
            for name in names.values():
                (units / name).unlink(missing_ok=True)
            self.run(["systemctl", "daemon-reload"], check=False)

    def sh(self, script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a fixed POSIX sh script inside the device with positional arguments."""
        return self.run(["sh", "-c", script, "sh", *args], check=check)

    def ssh_args(self, command: str) -> list[str]:
        """Argument list of an ``ssh root@device -p 22222 command`` with the lab key."""
        return [
            host_tool("ssh"),
            "-i",
            self._lab.private_key,
            "-p",
            str(SSH_PORT),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            f"root@{self.address}",
            command,
        ]

    def ssh(self, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the device over SSH (as Ansible would); never raises on rc."""
        return run_command(self.ssh_args(command), check=False, timeout=timeout)

    def engine_ping(self) -> bool:
        """True when the engine answers ``_ping`` on ``/var/run/balena.sock`` within 2 s."""
        sock_path = str(self.path("/run/balena.sock"))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(sock_path)
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
                reply = sock.recv(4096)
        except OSError:
            return False
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] + b" "

    def wait_engine(self, timeout: float = 60) -> None:
        """Wait until ``balena.service`` is active and the engine answers ``_ping``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine_ping() and self.unit_property("ActiveState") == "active":
                return
            time.sleep(0.2)
        raise ExecutorError(f"lab: engine of {self.name} not healthy after {timeout:.0f} s")

    def unit_property(self, prop: str, unit: str = "balena.service") -> str:
        """Value of one ``systemctl show`` property of a unit inside the device."""
        return self.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()

    def supervisor_code(self, path: str = "/v1/healthy") -> int:
        """HTTP status the device's Supervisor gives ``GET path`` on 127.0.0.1:48484 (0: none)."""
        res = self.run(
            [
                *("curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"),
                f"http://127.0.0.1:{SUPERVISOR_PORT}{path}",
            ],
            check=False,
        )
        return int(res.stdout.strip() or "0") if res.stdout.strip().isdigit() else 0

    def wait_supervisor(self, timeout: float = 60) -> None:
        """Wait until the Supervisor's container runs and ``/v1/healthy`` answers 200."""
        wait_for(
            lambda: self.supervisor_code() == 200,  # noqa: PLR2004 - HTTP OK
            timeout=timeout,
            what=f"the Supervisor of {self.name} to answer /v1/healthy with 200",
        )

    def balena(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the device's ``balena`` client inside it."""
        return self.run(["balena", *args], check=check)

    def is_alive(self) -> bool:
        """True while the device's PID 1 is the process ``up`` started."""
        return proc_start(self.state.leader_pid) == self.state.leader_start


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll a zero-argument predicate until it is true; ExecutorError naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise ExecutorError(f"lab: timed out after {timeout:.0f} s waiting for {what}")
