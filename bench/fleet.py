"""The simulated fleet the benchmarks probe: hosts that look like balenaOS to Ansible.

* :func:`write_inventory`: hosts with ``ansible_connection: local`` and a Python that does
  not exist, so only ``raw`` works, as on a device.
* :func:`ssh_fleet`: the same hosts reached over SSH, as devices are: one loopback address
  each (``127.0.1.N``, port 22222), served by real ``sshd`` processes of this machine (one per
  16 addresses, the most one sshd listens on), root key login only, and a Python that does
  not exist.  Ansible's connection work (ssh processes, the SSH protocol, the transfer of
  the probe script and its output) is then paid as against a fleet.
* :func:`write_runbook`: a runbook of N cheap read-only checks of the kind device runbooks
  use (and a do-nothing step), whose symptom never holds: a plan of it is all probe.
* :func:`device_tmp`: the devices' ``TMPDIR``.  The probe script keeps each check's output
  in files under ``$TMPDIR`` (else ``/tmp``), which on balenaOS is a tmpfs; on this machine
  ``/tmp`` may be a disk, where creating and removing those files costs about as much as
  cheap checks themselves.  So the devices get a fresh folder on a tmpfs (``/dev/shm`` by
  default), set as ``TMPDIR`` in this process's environment, which ansible-runner and
  ``ansible-playbook`` pass on to the ``raw`` tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import yaml

SSH_PORT = 22222
#: The most addresses one sshd listens on (its ``ListenAddress`` limit).
SSHD_ADDRESSES = 16
SSHD = Path("/usr/sbin/sshd")


def write_inventory(path: Path, hosts: int) -> list[str]:
    """A YAML inventory of ``hosts`` local-connection hosts without Python; their names."""
    names = [f"dev{i:05d}" for i in range(hosts)]
    host_vars = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/nonexistent/python3",
    }
    inventory = {"all": {"children": {"fleet": {"hosts": dict.fromkeys(names, host_vars)}}}}
    path.write_text(yaml.safe_dump(inventory, sort_keys=False), encoding="utf-8")
    return names


def add_fleet_options(parser: argparse.ArgumentParser) -> None:
    """``--ssh`` (:func:`ssh_fleet` instead of local-connection hosts) and ``--device-tmp``."""
    parser.add_argument(
        "--ssh",
        action="store_true",
        help="hosts behind real sshd on 127.0.1.N:22222 (root key login, no Python; needs "
        "root) instead of Ansible's local connection",
    )
    add_device_tmp_option(parser)


@contextmanager
def fleet(
    folder: Path, hosts: int, *, ssh: bool, device_tmp_parent: Path
) -> Iterator[tuple[Path, list[str], str]]:
    """``hosts`` devices, local or over SSH: their inventory, their names, and what they are.

    The devices' ``TMPDIR`` is made by :func:`device_tmp` under ``device_tmp_parent`` and
    set in this process's environment for as long as the fleet lives.
    """
    with device_tmp(device_tmp_parent) as where:
        if ssh:
            with ssh_fleet(folder / "ssh", hosts, os.environ["TMPDIR"]) as (inventory, names):
                yield inventory, names, f"SSH hosts (sshd on 127.0.1.N:{SSH_PORT}); {where}"
        else:
            inventory = folder / "inventory.yml"
            names = write_inventory(inventory, hosts)
            yield inventory, names, f"local-connection hosts; {where}"


def ssh_address(index: int) -> str:
    """The loopback address of host ``index`` of an SSH fleet (``127.0.1.1`` onwards)."""
    return f"127.0.{1 + index // 254}.{1 + index % 254}"


@contextmanager
def ssh_fleet(folder: Path, hosts: int, device_tmp: str | None) -> Iterator[tuple[Path, list[str]]]:
    """``hosts`` devices behind real sshd processes; yields their inventory and names.

    Root logs in with a key made here; ``device_tmp`` becomes the sessions' ``TMPDIR`` (sshd's
    ``SetEnv``), so the probe's scratch is where :func:`device_tmp` puts it for local hosts.
    Ansible keeps its connections open between runs as it does by default (``ControlPersist``
    60 s), with the control sockets in ``folder`` (``ansible_control_path_dir``): the runs of
    one benchmark share them, and no other Ansible run (or earlier fleet) does.  Afterwards
    the connections, the sshd sessions and the sshd processes (started here, stopped by PID)
    are ended.  Their files live in ``folder``.
    """
    if os.geteuid() != 0 or not SSHD.exists() or shutil.which("ssh-keygen") is None:
        raise SystemExit("an SSH fleet needs root, /usr/sbin/sshd and ssh-keygen")
    names = [f"dev{i:05d}" for i in range(hosts)]
    addresses = [ssh_address(i) for i in range(hosts)]
    taken = [a for a in addresses if _listening(a)]
    if taken:
        raise SystemExit(f"already listening on {taken[0]}:{SSH_PORT}; pick another time")
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)],
            check=True,
            capture_output=True,
        )
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with ExitStack() as stack:
        for group in range(0, hosts, SSHD_ADDRESSES):
            stack.enter_context(
                _sshd(folder, group, addresses[group : group + SSHD_ADDRESSES], device_tmp)
            )
        host_vars = {
            "ansible_port": SSH_PORT,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(folder / "client_key"),
            "ansible_ssh_common_args": (
                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
            ),
            "ansible_host_key_checking": False,
            "ansible_python_interpreter": "/nonexistent/python3",
            "ansible_control_path_dir": str(folder / "cp"),
        }
        stack.callback(_end_connections, folder / "cp")
        inventory = {
            "all": {
                "children": {
                    "fleet": {
                        "hosts": {
                            n: {"ansible_host": a} for n, a in zip(names, addresses, strict=True)
                        },
                        "vars": host_vars,
                    }
                }
            }
        }
        path = folder / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False), encoding="utf-8")
        yield path, names


@contextmanager
def _sshd(folder: Path, group: int, addresses: list[str], device_tmp: str | None) -> Iterator[None]:
    """One sshd listening on ``addresses`` (port 22222), stopped by its PID afterwards."""
    config = folder / f"sshd-{group}.conf"
    lines = [f"ListenAddress {a}:{SSH_PORT}" for a in addresses] + [
        f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / f'sshd-{group}.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "AllowUsers root",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "MaxStartups 200:30:400",  # every fork of Ansible may connect at once
        "MaxSessions 100",
        "LogLevel ERROR",
    ]
    if device_tmp is not None:
        lines.append(f"SetEnv TMPDIR={device_tmp}")
    config.write_text("\n".join(lines) + "\n")
    log = (folder / f"sshd-{group}.log").open("wb")
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    listener = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 15
        while not all(_listening(a) for a in addresses):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise SystemExit(
                    f"sshd for {addresses[0]}..: {(folder / f'sshd-{group}.log').read_text()}"
                )
            time.sleep(0.05)
        yield
    finally:
        for session in listener.children(recursive=True):  # they outlive the listener
            with contextlib.suppress(psutil.Error):
                session.kill()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _end_connections(control_dir: Path) -> None:
    """End Ansible's persistent SSH connections (``ssh: DIR/... [mux]``) of this fleet."""
    masters = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(control_dir) in " ".join(p.info["cmdline"] or ())
    ]
    for master in masters:
        with contextlib.suppress(psutil.Error):
            master.terminate()
    psutil.wait_procs(masters, timeout=5)


def _listening(address: str) -> bool:
    """Whether something accepts TCP connections on ``address``, port 22222."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, SSH_PORT)) == 0


#: Cheap, read-only commands of the kind device runbooks use: (command, parse kind).
CHECKS: tuple[tuple[str, str], ...] = (
    ("cut -d' ' -f1 /proc/loadavg", "float"),
    ("df -P /tmp | awk 'NR==2{print 100-$5}'", "int"),
    ("awk '/MemAvailable/{print $2}' /proc/meminfo", "int"),
    ("cut -d' ' -f1 /proc/uptime", "float"),
    ("uname -r", "str"),
    ("ls -A /tmp | wc -l", "int"),
    ("cat /proc/sys/kernel/hostname", "str"),
    ("grep -c ^processor /proc/cpuinfo", "int"),
    ("cut -f1 /proc/sys/fs/file-nr", "int"),
    ("test -d /tmp", "ok"),
    ("cat /etc/os-release", "kv"),
    ("id -u", "int"),
)

PLAYBOOK = """\
- name: Do nothing (benchmark runbook step)
  hosts: all
  gather_facts: false
  tasks:
    - name: Nothing
      ansible.builtin.raw: "true"
"""


def write_runbook(folder: Path, checks: int) -> Path:
    """A runbook with the first ``checks`` of :data:`CHECKS` (cycled), in ``folder/runbooks``."""
    (folder / "runbooks").mkdir(parents=True, exist_ok=True)
    (folder / "playbooks").mkdir(parents=True, exist_ok=True)
    (folder / "playbooks" / "noop.yml").write_text(PLAYBOOK, encoding="utf-8")
    spec = {
        "apiVersion": "remediate/v1",
        "kind": "Runbook",
        "metadata": {"name": f"bench-{checks}-checks", "title": f"Benchmark: {checks} checks"},
        "checks": [
            {
                "id": f"c{i + 1:02d}",
                "run": CHECKS[i % len(CHECKS)][0],
                "parse": CHECKS[i % len(CHECKS)][1],
            }
            for i in range(checks)
        ],
        "symptom": "checks.c01 == 'never'",
        "steps": [{"id": "noop", "playbook": "noop.yml", "plan": "nothing"}],
        "verify": "true",
    }
    path = folder / "runbooks" / f"bench-{checks}.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def add_device_tmp_option(parser: argparse.ArgumentParser) -> None:
    """``--device-tmp DIR``: where :func:`device_tmp` makes the devices' ``TMPDIR``."""
    parser.add_argument(
        "--device-tmp",
        type=Path,
        default=Path("/dev/shm"),
        help="where the simulated devices' TMPDIR is made [/dev/shm, a tmpfs like balenaOS's "
        "/tmp]; pass /tmp to charge them this machine's /tmp",
    )


@contextmanager
def device_tmp(parent: Path) -> Iterator[str]:
    """Set ``TMPDIR`` to a fresh folder under ``parent``; yield a line saying which and its kind.

    Python's own temporary folders stay where they were: ``tempfile`` settles its default
    once, at first use, and that use is made here before ``TMPDIR`` changes.
    """
    tempfile.gettempdir()
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="bench-device-tmp-", dir=parent) as folder:
        os.environ["TMPDIR"] = folder
        kind = "tmpfs" if _on_tmpfs(Path(folder)) else "NOT a tmpfs"
        try:
            yield f"simulated devices' TMPDIR (probe scratch): {folder} ({kind})"
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous


def _on_tmpfs(folder: Path) -> bool:
    """Whether ``folder`` is on a tmpfs (its mount is the longest mount point above it)."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return False
    above = [m for m in mounts if folder.resolve().is_relative_to(m[1])]
    return bool(above) and max(above, key=lambda m: len(m[1]))[2] == "tmpfs"
