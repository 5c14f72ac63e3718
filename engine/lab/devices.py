"""Bring lab devices up and down: simulated balenaOS hosts with a real engine and a real init.

Chosen path: **systemd-nspawn with systemd as PID 1** (not the thin stand-ins).  It was tried
first, as the issue prefers, and it holds up on this kind of machine (root, no host systemd,
cgroup v1 hybrid) with four adjustments, each needed and each tested:

* ``--register=no --keep-unit``: there is no host systemd/machined to register with;
* ``SYSTEMD_SECCOMP=0`` and ``--capability=all``: without them runc fails to join the session
  keyring / to set up the container ("operation not permitted");
* a ``lab-cgroups.service`` oneshot in the device remounts the cgroup controllers read-write
  before ``balena.service`` (nspawn mounts them read-only; runc must create cgroups);
* every device runs in its own ``name=systemd``/unified cgroup (``lab<slot>-devN``), so the
  systemds of several devices do not share nspawn's ``/payload`` group, and the engine uses
  ``--cgroup-parent /lab<slot>-devN`` so teardown finds and removes every cgroup it made.

So ``systemctl``, ``journalctl -u balena.service -t balenad``, ``NRestarts`` and
``ExecMainStartTimestamp`` are the real ones: ``balena.service`` is a real unit
(``Type=notify``, ``Restart=always``) running stock ``dockerd`` 20.10.

Each device is, from the host's point of view::

    unshare -m (private)            attaches data.img (ext4, label resin-data) to a loop device
    └── systemd-nspawn -D DEV/root  /usr = overlay(host /usr, lab extras, DEV/usr-upper)
        └── systemd (PID 1)         own network namespace (lo only); /run, /tmp private tmpfs
            ├── lab-data.service    mounts /dev/resin-data on /mnt/data, binds /var/lib/docker
            ├── balena.service      dockerd -H unix:///var/run/balena.sock, overlay2
            ├── balena-supervisor   the Supervisor stand-in: container balena_supervisor,
            │                       restart always, host network, 127.0.0.1:48484
            └── lab-sshd.socket     127.77.<slot>.<n>:22222 in the HOST's namespace -> sshd

Network: every device has a network namespace of its own (``--private-network``, loopback
only), as a balenaOS host has its own, so the Supervisor stand-in can answer on
``127.0.0.1:48484`` exactly as the real one does (``--net=host`` containers share the
device's namespace) and the runbooks' checks use the real URL; several devices, and the
machine running the lab, each have their own 127.0.0.1.  (Binding the stand-in to the device's
own address and making the URL a runbook parameter was the alternative: it would have put a
lab detail into every runbook.)  Ansible still reaches every device on the host's loopback
with no forwarder: the device's ``lab-sshd.socket`` binds ``127.77.<slot>.<n>:22222`` inside
the host's network namespace (``NetworkNamespacePath=`` pointing at a bind mount of it) and
hands the listening socket to sshd, which runs, with every session it starts, in the device's
namespace.  No address outside 127.0.0.0/8 is ever assigned; engines run with
``--bridge=none --iptables=false`` and app containers with ``--network none``.

The data partition is mounted by the device itself (``lab-data.service``, which the engine
requires), not bound in by nspawn: a mount nspawn made stays referenced for the device's
lifetime, while one the device made is released when the device unmounts it, so the lab can
repair an ext4 error state as a reboot's fsck does (unmount, ``e2fsck``, mount again).

Teardown kills the device's PID 1 with SIGKILL: the kernel then kills every process of the
device's PID namespace (engine, shims, containers, sshd), the device's mount and network
namespaces vanish with their last process, and the loop device is detached.  What the kernel
does not clean (cgroup directories) is removed by name, and :func:`find_leftovers` checks that
nothing is left.  Lab state (PIDs with their start times, paths, addresses) is a JSON file in
the lab dir, so ``down`` from another process stops exactly what ``up`` started.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from ruamel.yaml import YAML

from engine.errors import ConfigError, ExecutorError
from engine.lab import images
from engine.lab.device import (
    HOST_NETNS,
    HOST_PATH,
    REQUIRED_TOOLS,
    SSH_PORT,
    Device,
    DeviceState,
    LabState,
    host_tool,
    proc_start,
    run_command,
)

DEFAULT_DATA_MB = 256
STATE_FILE = "lab-state.json"
INVENTORY_FILE = "inventory.yml"
SLOT_DIR = Path("/run/remediate-lab")
#: Units the template enables, with the target that wants each.
_ENABLED_UNITS: tuple[tuple[str, str], ...] = (
    ("balena.service", "multi-user.target"),
    ("lab-cgroups.service", "multi-user.target"),
    ("lab-data.service", "multi-user.target"),
    ("lab-sshd.socket", "sockets.target"),
    ("lab-sshd.service", "multi-user.target"),
)
#: Units installed but enabled only once the device has its images (provisioning).
_INSTALLED_UNITS = ("balena-supervisor.service",)
_LAUNCH = r"""
set -e
cg="$1"; img="$2"; data="$3"; pidfile="$4"; hostnet="$5"; shift 5
for h in systemd unified; do
  if [ -d "/sys/fs/cgroup/$h" ]; then
    mkdir -p "/sys/fs/cgroup/$h/$cg"
    echo $$ > "/sys/fs/cgroup/$h/$cg/cgroup.procs"
  fi
done
: > "$hostnet"
mount --bind /proc/self/ns/net "$hostnet"
# The data partition's loop device (detached at teardown), laid out as balenaOS's resin-data;
# the device mounts it itself (lab-data.service).  losetup -f races with other devices starting.
for try in 1 2 3 4 5 6 7 8 9 10; do
  loop=$(losetup -f --show "$img") && break
  sleep 0.2
done
[ -n "$loop" ]
mount -t ext4 "$loop" "$data"
mkdir -p "$data/docker" "$data/resin-data"
: > "$data/remove_me_to_reset"
umount "$data"
echo $$ > "$pidfile"
export SYSTEMD_SECCOMP=0
exec systemd-nspawn "--bind=$loop:/dev/resin-data" "$@"
"""


def missing_requirements() -> list[str]:
    """Return why the lab cannot run here (not root, missing tools); empty when it can."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the device lab needs root (namespaces, loop mounts, dockerd)")
    missing = sorted(
        {pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool, path=HOST_PATH) is None}
    )
    if missing:
        problems.append("missing Debian packages: " + " ".join(missing))
    if not Path("/usr/bin/docker").exists():
        problems.append("missing the docker 20.10 client /usr/bin/docker (Debian docker.io)")
    return problems


class Lab:
    """A set of lab devices sharing a lab dir, an SSH key, an address slot and an image set."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def up(
        cls,
        lab_dir: Path,
        *,
        devices: int = 3,
        data_mb: int = DEFAULT_DATA_MB,
        cache_dir: Path | None = None,
    ) -> Lab:
        """Bring a lab with ``devices`` devices up in ``lab_dir`` and write its inventory."""
        problems = missing_requirements()
        if problems:
            raise ExecutorError("lab: cannot start: " + "; ".join(problems))
        if devices < 0 or data_mb < 32:  # noqa: PLR2004 - ext4 + engine need room
            raise ConfigError(f"lab: need devices >= 0 and data_mb >= 32, got {devices}/{data_mb}")
        lab_dir = lab_dir.resolve()
        lab_dir.mkdir(parents=True, exist_ok=True)
        state_path = lab_dir / STATE_FILE
        if state_path.exists():
            raise ConfigError(f"lab: {state_path} exists; run 'lab down --lab-dir {lab_dir}' first")
        slot = _claim_slot(lab_dir)
        key = lab_dir / "id_ed25519"
        if not key.exists():
            run_command(
                [
                    host_tool("ssh-keygen"),
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "lab",
                    "-f",
                    str(key),
                ]
            )
        state = LabState(
            lab_dir=str(lab_dir),
            slot=slot,
            data_mb=data_mb,
            private_key=str(key),
            inventory=str(lab_dir / INVENTORY_FILE),
            image_tar=None,
            devices=(),
        )
        lab = cls(state)
        lab._save()
        try:
            _build_template(lab_dir)
            lab.add_devices(devices, cache_dir=cache_dir)
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def load(cls, lab_dir: Path) -> Lab:
        """Attach to a lab another process brought up, from its state file."""
        path = lab_dir.resolve() / STATE_FILE
        try:
            return cls(LabState.model_validate_json(path.read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"lab: no lab state at {path} (is the lab up?)") from exc
        except ValueError as exc:
            raise ConfigError(f"lab: {path}: invalid lab state: {exc}") from exc

    # ----------------------------------------------------------------- accessors
    @property
    def lab_dir(self) -> Path:
        """The lab's directory (state file, key, inventory, device dirs)."""
        return Path(self.state.lab_dir)

    @property
    def inventory_path(self) -> Path:
        """Path of the YAML inventory of every device (group ``balena_fleet``)."""
        return Path(self.state.inventory)

    @property
    def private_key(self) -> Path:
        """Path of the SSH private key that logs in as root on every device."""
        return Path(self.state.private_key)

    @property
    def devices(self) -> list[Device]:
        """The lab's devices, in order."""
        return [Device(d, self.state) for d in self.state.devices]

    def device(self, name: str) -> Device:
        """The device called ``name``; ConfigError if there is none."""
        for dev in self.devices:
            if dev.name == name:
                return dev
        known = ", ".join(d.name for d in self.devices) or "none"
        raise ConfigError(f"lab: no device {name!r} in {self.lab_dir} (devices: {known})")

    # ----------------------------------------------------------------- devices
    def add_devices(self, count: int, *, cache_dir: Path | None = None) -> list[Device]:
        """Start ``count`` more devices in parallel, load the image set, update the inventory."""
        if count <= 0:
            return []
        first = max((d.index for d in self.state.devices), default=0) + 1
        indexes = range(first, first + count)
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(self._start_device, i) for i in indexes]
        started = [f.result() for f in futures if f.exception() is None]
        self.state = self.state.model_copy(update={"devices": (*self.state.devices, *started)})
        self._save()
        for fut in futures:
            if (exc := fut.exception()) is not None:
                raise exc
        new = [Device(s, self.state) for s in started]
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda d: d.wait_engine(), new))
        tar = images.ensure_image_tar(new[0], cache_dir or images.default_cache_dir())
        self.state = self.state.model_copy(update={"image_tar": str(tar)})
        self._save()
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda d: images.provision(d, tar), new))
        self.write_inventory(self.inventory_path)
        return new

    def remove_device(self, name: str) -> None:
        """Stop one device and drop it from the state and the inventory."""
        dev = self.device(name)
        _stop_device(dev.state, self._procs.pop(name, None))
        remaining = tuple(d for d in self.state.devices if d.name != name)
        self.state = self.state.model_copy(update={"devices": remaining})
        self._save()
        self.write_inventory(self.inventory_path)

    def down(self) -> None:
        """Stop every device, remove what the lab made, and release its address slot."""
        errors: list[str] = []
        for dev in self.state.devices:
            try:
                _stop_device(dev, self._procs.pop(dev.name, None))
            except ExecutorError as exc:
                errors.append(str(exc))
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._procs.clear()
        shutil.rmtree(self.lab_dir / "devices", ignore_errors=True)
        shutil.rmtree(self.lab_dir / "template", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.lab_dir / STATE_FILE).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.inventory_path.unlink()
        _release_slot(self.state.slot, self.lab_dir)
        self.state = self.state.model_copy(update={"devices": ()})
        if errors:
            raise ExecutorError("lab: teardown incomplete: " + "; ".join(errors))

    def find_leftovers(self) -> list[str]:
        """List anything of this lab still present: processes, mounts, loop devices, cgroups."""
        return find_leftovers(self.lab_dir, self.state.slot, list(self.state.devices))

    # ----------------------------------------------------------------- inventory
    def inventory(self, devices: Sequence[Device] | None = None) -> dict[str, object]:
        """The Ansible inventory (as data) for ``devices`` (default: all)."""
        chosen = self.devices if devices is None else list(devices)
        hosts = {d.name: {"ansible_host": d.address, "balena_uuid": d.balena_uuid} for d in chosen}
        return {
            "all": {
                "children": {
                    "balena_fleet": {
                        "hosts": hosts,
                        "vars": {
                            "ansible_port": SSH_PORT,
                            "ansible_user": "root",
                            "ansible_ssh_private_key_file": self.state.private_key,
                            "ansible_ssh_common_args": (
                                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
                            ),
                            "ansible_host_key_checking": False,
                            "ansible_python_interpreter": "/nonexistent/python3",
                            "ansible_ssh_transfer_method": "piped",
                            "ansible_remote_tmp": "/tmp/.ansible",  # noqa: S108 - on the device
                        },
                    }
                }
            }
        }

    def write_inventory(self, path: Path, devices: Sequence[Device] | None = None) -> Path:
        """Write the YAML inventory for ``devices`` (default: all) to ``path`` and return it."""
        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        with path.open("w") as fh:
            fh.write("# Written by the remediate device lab; rewritten on every change.\n")
            yaml.dump(self.inventory(devices), fh)
        return path

    # ----------------------------------------------------------------- internals
    def _save(self) -> None:
        path = self.lab_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.state.model_dump_json(indent=2))
        tmp.replace(path)

    def _start_device(self, index: int) -> DeviceState:
        name = f"dev{index}"
        lab_dir = self.lab_dir
        ddir = lab_dir / "devices" / name
        if ddir.exists():
            shutil.rmtree(ddir)
        ddir.mkdir(parents=True)
        address = f"127.77.{self.state.slot}.{index}"
        cgroup = f"lab{self.state.slot}-{name}"
        root = ddir / "root"
        run_command(["cp", "-a", str(lab_dir / "template" / "root"), str(root)])
        _personalise_root(root, name=name, address=address, cgroup=cgroup, lab_dir=lab_dir)
        upper = ddir / "usr-upper"
        upper.mkdir()
        data = ddir / "data"
        data.mkdir()
        img = ddir / "data.img"
        with img.open("wb") as fh:
            fh.truncate(self.state.data_mb * 1024 * 1024)
        run_command([host_tool("mkfs.ext4"), "-q", "-F", "-L", "resin-data", str(img)])
        pidfile = ddir / "nspawn.pid"
        log = (ddir / "console.log").open("wb")
        nspawn = [
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--capability=all",
            f"--machine={cgroup}",
            f"--hostname={name}",
            f"--directory={root}",
            f"--overlay=/usr:{lab_dir / 'template' / 'usr-extra'}:{upper}:/usr",
            f"--bind-ro={ddir / 'host-netns'}:{HOST_NETNS}",
            # nspawn shows no /sys/fs/ext4; a balenaOS host does (the data partition's
            # error state).  The host's, read-only: it names every ext4, this device's included.
            "--bind-ro=/sys/fs/ext4",
            "--private-network",
            "--boot",
        ]
        args = [host_tool("unshare"), "-m", "--propagation", "private", "sh", "-c", _LAUNCH, "sh"]
        args += [cgroup, str(img), str(data), str(pidfile), str(ddir / "host-netns"), *nspawn]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._procs[name] = proc
        try:
            leader = _wait_leader(proc, pidfile, ddir / "console.log")
        except ExecutorError:
            _abort_start(proc, img, cgroup)
            del self._procs[name]
            raise
        nspawn_pid = proc.pid
        return DeviceState(
            name=name,
            index=index,
            address=address,
            balena_uuid=secrets.token_hex(16),
            cgroup=cgroup,
            dir=str(ddir),
            nspawn_pid=nspawn_pid,
            nspawn_start=proc_start(nspawn_pid) or 0,
            leader_pid=leader,
            leader_start=proc_start(leader) or 0,
        )


def _wait_leader(proc: subprocess.Popen[bytes], pidfile: Path, log: Path) -> int:
    """Wait for nspawn to start the device's PID 1 and return its host PID."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExecutorError(f"lab: device failed to start: {log.read_text()[-2000:]}")
        if pidfile.exists():
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError):
                for child in children.read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        time.sleep(0.05)
    raise ExecutorError(f"lab: device did not boot in 30 s: {log.read_text()[-2000:]}")


def _abort_start(proc: subprocess.Popen[bytes], img: Path, cgroup: str) -> None:
    """Undo a device start that did not boot: kill its PID 1 (if any) and nspawn, clean up."""
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout=30)
    _detach_loops(img)
    _remove_cgroups(cgroup)


def _files() -> resources.abc.Traversable:
    return resources.files("engine.lab") / "files"


def _build_template(lab_dir: Path) -> None:
    """A root file system of the host's /etc (trimmed) with the lab's units; /usr comes later."""
    tdir = lab_dir / "template"
    if (tdir / "ready").exists():
        return
    shutil.rmtree(tdir, ignore_errors=True)
    root = tdir / "root"
    root.mkdir(parents=True)
    for sub in ("usr", "proc", "sys", "dev", "run", "tmp", "root", "home", "mnt/data", "srv"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # nspawn picks the container's cgroup layout from the systemd version it finds under the
    # directory's /usr *before* mounting the /usr overlay; without this marker it falls back to
    # pure cgroup v1, where the container's systemd never hears that a unit's cgroup emptied
    # (every stop then waits for TimeoutStopSec).  The overlay hides the marker afterwards.
    marker_dir = root / "usr" / "lib" / "systemd"
    marker_dir.mkdir(parents=True)
    for lib in Path("/usr/lib").glob("*/systemd/libsystemd-shared-*.so"):
        (marker_dir / lib.name).write_bytes(b"")
    for lib in Path("/usr/lib/systemd").glob("libsystemd-shared-*.so"):
        (marker_dir / lib.name).write_bytes(b"")
    for sub in ("lib/docker", "log", "cache", "tmp", "spool", "lib/systemd"):
        (root / "var" / sub).mkdir(parents=True, exist_ok=True)
    (root / "var" / "run").symlink_to("/run")
    (root / "var" / "lock").symlink_to("/run/lock")
    (root / "var" / "lib" / "balena").symlink_to("docker")
    (root / "var" / "lib" / "balena-engine").symlink_to("docker")
    for link in ("bin", "sbin", "lib", "lib64"):
        (root / link).symlink_to(f"usr/{link}")
    _write_etc(root / "etc")
    _write_usr_extra(tdir / "usr-extra")
    (tdir / "ready").write_text("ok\n")


def _write_etc(etc: Path) -> None:
    """The template's /etc: the host's, trimmed, with the lab's units and no root password."""
    run_command(["cp", "-a", "/etc", str(etc)])
    for rel in ("os-release", "machine-id", "fstab", "hostname", "resolv.conf", "docker"):
        p = etc / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    (etc / "os-release").write_text(Path("/usr/lib/os-release").read_text())
    (etc / "machine-id").write_text("")
    (etc / "fstab").write_text("# lab device: mounts come from systemd-nspawn\n")
    (etc / "docker").mkdir()
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    system = etc / "systemd" / "system"
    for wants in list(system.glob("*.wants")) + list(system.glob("*.requires")):
        shutil.rmtree(wants)
    for unit, target in _ENABLED_UNITS:
        (system / unit).write_text((_files() / unit).read_text())
        wants = system / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    for unit in _INSTALLED_UNITS:
        (system / unit).write_text((_files() / unit).read_text())
    shadow = etc / "shadow"
    lines = shadow.read_text().splitlines()
    fixed = [("root:*:" + ln.split(":", 2)[2]) if ln.startswith("root:") else ln for ln in lines]
    shadow.write_text("\n".join(fixed) + "\n")


def _write_usr_extra(extra: Path) -> None:
    """Extras over the host's /usr: balena client, healthcheck, Supervisor start script.

    Docker 28's client in /usr/local/bin is hidden (the device uses Debian's 20.10 client).
    """
    (extra / "bin").mkdir(parents=True)
    (extra / "lib" / "balena").mkdir(parents=True)
    for name, dest in (
        ("balena", extra / "bin" / "balena"),
        ("balena-healthcheck", extra / "lib" / "balena" / "balena-healthcheck"),
        ("start-balena-supervisor", extra / "bin" / "start-balena-supervisor"),
    ):
        dest.write_text((_files() / name).read_text())
        dest.chmod(0o755)
    (extra / "bin" / "balena-engine").symlink_to("balena")
    if Path("/usr/local/bin/docker").exists():
        (extra / "local" / "bin").mkdir(parents=True)
        os.mknod(extra / "local" / "bin" / "docker", 0o600 | 0o020000, os.makedev(0, 0))


def _personalise_root(root: Path, *, name: str, address: str, cgroup: str, lab_dir: Path) -> None:
    etc = root / "etc"
    (etc / "hostname").write_text(name + "\n")
    unit = (_files() / "balena.service").read_text().replace("@CGROUP_PARENT@", "/" + cgroup)
    (etc / "systemd" / "system" / "balena.service").write_text(unit)
    socket_unit = (_files() / "lab-sshd.socket").read_text().replace("@ADDRESS@", address)
    (etc / "systemd" / "system" / "lab-sshd.socket").write_text(socket_unit)
    sshd = (_files() / "sshd_config").read_text().replace("@ADDRESS@", address)
    (etc / "ssh" / "sshd_config").write_text(sshd)
    hostkey = etc / "ssh" / "ssh_host_ed25519_key"
    run_command(
        [host_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(hostkey)]
    )
    pub = (lab_dir / "id_ed25519.pub").read_text()
    auth = etc / "ssh" / "authorized_keys"
    auth.write_text(pub)
    auth.chmod(0o600)


def _stop_device(dev: DeviceState, proc: subprocess.Popen[bytes] | None) -> None:
    """Kill the device's PID 1 (its whole PID namespace dies), then clean what remains."""
    if proc_start(dev.leader_pid) == dev.leader_start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(dev.leader_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                break
        elif proc_start(dev.nspawn_pid) != dev.nspawn_start:
            break
        time.sleep(0.05)
    else:
        if proc_start(dev.nspawn_pid) == dev.nspawn_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(dev.nspawn_pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(10)
    _detach_loops(Path(dev.dir) / "data.img")
    _remove_cgroups(dev.cgroup)


def _detach_loops(img: Path) -> None:
    if not img.exists():
        return
    out = run_command([host_tool("losetup"), "-j", str(img)], check=False).stdout
    for line in out.splitlines():
        loop = line.split(":", 1)[0]
        if loop.startswith("/dev/loop"):
            run_command([host_tool("losetup"), "-d", loop], check=False)


def _cgroup_dirs(name: str) -> Iterator[Path]:
    base = Path("/sys/fs/cgroup")
    if not base.is_dir():
        return
    for top, dirs, _ in os.walk(base):
        depth = len(Path(top).relative_to(base).parts)
        if depth >= 4:  # noqa: PLR2004 - controller/[sandbox/id]/lab-cgroup is the deepest
            dirs.clear()
            continue
        for d in list(dirs):
            if d == name:
                yield Path(top) / d
                dirs.remove(d)


def _remove_cgroups(name: str) -> None:
    for top in list(_cgroup_dirs(name)):
        for _attempt in range(50):
            for sub, _dirs, _f in sorted(os.walk(top), key=lambda t: -len(t[0])):
                with contextlib.suppress(OSError):
                    Path(sub).rmdir()
            if not top.exists():
                break
            time.sleep(0.1)


def find_leftovers(lab_dir: Path, slot: int, devices: Sequence[DeviceState]) -> list[str]:
    """Everything a lab left behind: live PIDs, mounts, loop devices, cgroups, listeners."""
    found: list[str] = []
    for dev in devices:
        for pid, start in ((dev.leader_pid, dev.leader_start), (dev.nspawn_pid, dev.nspawn_start)):
            if proc_start(pid) == start:
                found.append(f"process {pid} of {dev.name} still running")
        found.extend(f"cgroup {p}" for p in _cgroup_dirs(dev.cgroup))
    lab = str(lab_dir)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if lab in fields[3] or lab in fields[4]:
            found.append(f"mount {fields[4]}")
    out = run_command([host_tool("losetup"), "-a"], check=False).stdout
    found.extend(f"loop device {ln}" for ln in out.splitlines() if lab in ln)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if lab in cmdline and proc_start(int(pid_dir.name)) is not None:
                found.append(f"process {pid_dir.name}: {cmdline[:200]}")
    prefix = f"127.77.{slot}."
    tcp = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for line in tcp:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
        if state == "0A" and int(port_hex, 16) == SSH_PORT and ip.startswith(prefix):
            found.append(f"listener {ip}:{SSH_PORT}")
    return found


def _claim_slot(lab_dir: Path) -> int:
    """Claim a free 127.77.<slot>.0/24 for this lab (one file per slot under /run)."""
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    for slot in range(1, 255):
        path = SLOT_DIR / f"slot-{slot}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise ExecutorError(f"lab: cannot claim {path}: {exc}") from exc
            owner = Path(path.read_text().strip() or "/nonexistent")
            if (owner / STATE_FILE).exists():
                continue
            path.unlink(missing_ok=True)  # stale: its lab is gone
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(lab_dir) + "\n")
        return slot
    raise ExecutorError(f"lab: no free address slot under {SLOT_DIR}")


def _release_slot(slot: int, lab_dir: Path) -> None:
    path = SLOT_DIR / f"slot-{slot}"
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() == str(lab_dir):
            path.unlink()
