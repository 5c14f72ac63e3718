"""Field faults a lab device can be given, each with its undo.

Every fault is made the way the field makes it, on the real engine and file system: bytes really
fill the data partition, the orphaned layer is left by a ``kill -9`` of dockerd during a
``balena import``, a crash is a real SIGKILL that systemd answers (``NRestarts`` rises), "engine
down" is a real crash loop (broken ``/etc/docker/daemon.json``) until systemd gives up, the
update lock is a real ``flock`` held by a process in the device, the pull in progress is a real
``balena import`` reading a slow stream, and a read-only data partition is a real ``ro`` remount
of the ext4 file system (on which the real engine then fails to start).  What a fault needs to
be undone is kept under ``/run/lab`` in the device (private to it, gone with it).
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import subprocess
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict

from engine.errors import ConfigError, ExecutorError
from engine.lab.device import Device, host_tool, run_command, wait_for
from engine.lab.images import (
    APP_CONTAINER,
    APP_ID,
    APP_SERVICE,
    APP_VOLUME,
    SUPERVISOR_CONTAINER,
    SUPERVISOR_UNIT,
)

DOCKER = "/var/lib/docker"
STATE = "/run/lab"
LOCK_DIR = "/tmp/balena-supervisor/services"  # noqa: S108 - the Supervisor's, on the device
#: Owner of the lock files the Supervisor itself creates.
SUPERVISOR_LOCK_UID = 65534
BREADCRUMBS = ("/mnt/state/rollback-health-breadcrumb", "/mnt/state/rollback-altboot-breadcrumb")
HOSTAPP_UPDATE = "/usr/bin/hostapp-update"
#: The device's unit that mounts its data partition (and that the engine requires).
DATA_UNIT = "lab-data.service"
_CHUNK = 1024 * 1024


class Fault(enum.StrEnum):
    """Faults the lab can inject (CLI verbs of ``lab inject``)."""

    FILL = "fill"
    ORPHAN_LAYER = "orphan-layer"
    ENGINE_HANG = "engine-hang"
    ENGINE_CRASH = "engine-crash"
    ENGINE_DOWN = "engine-down"
    UPDATE_LOCK = "update-lock"
    UPDATE_LOCK_FILE = "update-lock-file"
    PULL = "pull"
    DATA_RO = "data-ro"
    OS_UPDATE = "os-update"
    SUPERVISOR_UNHEALTHY = "supervisor-unhealthy"
    SUPERVISOR_DOWN = "supervisor-down"


class DataRoForm(enum.StrEnum):
    """How a data partition stops being writable (fault ``data-ro``)."""

    RO = "ro"  # remounted read-only: /proc/mounts shows ro
    EMERGENCY_RO = "emergency-ro"  # an ext4 error: rw,...,emergency_ro (kernels >= 6.x)


class OsUpdateStage(enum.StrEnum):
    """Which part of a host OS update is in progress (fault ``os-update``)."""

    ROLLBACK = "rollback"  # rebooted into the new OS; rollback breadcrumbs present
    RUNNING = "running"  # hostapp-update is writing the new OS


class FillKind(enum.StrEnum):
    """What the bytes that fill the data partition are."""

    JSON_LOG = "json-log"
    VOLUME = "volume"
    DANGLING_IMAGE = "dangling-image"
    ENGINE_TMP = "engine-tmp"


class FillResult(BaseModel):
    """How much a fill wrote, where, and the partition's use afterwards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FillKind
    path: str
    bytes_written: int
    use_percent: int


# ------------------------------------------------------------------------------------ helpers
def data_use_percent(device: Device) -> int:
    """``df``'s Use% of the device's ``/mnt/data`` (used / (used + available), rounded up)."""
    st = os.statvfs(device.path("/mnt/data"))
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return -(-used * 100 // (used + avail))


def _bytes_to_reach(device: Device, percent: int) -> int:
    st = os.statvfs(device.path("/mnt/data"))
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return max(0, (percent * (used + avail)) // 100 - used + 2 * st.f_frsize)


def _record(device: Device, name: str, value: str) -> None:
    path = device.path(f"{STATE}/{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(value + "\n")


def _recorded(device: Device, name: str) -> list[str]:
    path = device.path(f"{STATE}/{name}")
    try:
        return [ln for ln in path.read_text().splitlines() if ln]
    except FileNotFoundError:
        return []


def _forget(device: Device, name: str) -> None:
    device.path(f"{STATE}/{name}").unlink(missing_ok=True)


def engine_pid(device: Device) -> int:
    """PID (in the device's PID namespace) of the running dockerd; 0 when it is not running."""
    return int(device.unit_property("MainPID") or "0")


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _app_container_id(device: Device) -> str:
    return device.balena("inspect", "-f", "{{.Id}}", APP_CONTAINER).stdout.strip()


# ------------------------------------------------------------------------------------ fill
def fill_data(device: Device, percent: int, kind: FillKind = FillKind.VOLUME) -> FillResult:
    """Fill the data partition until ``df`` shows at least ``percent`` % used, with ``kind``."""
    if not 1 <= percent <= 100:  # noqa: PLR2004 - a percentage
        raise ConfigError(f"lab: fill percent must be 1..100, got {percent}")
    need = _bytes_to_reach(device, percent)
    if kind is FillKind.DANGLING_IMAGE:
        path = _fill_dangling_image(device, need)
    else:
        path = _fill_file(device, kind, need)
    return FillResult(
        kind=kind, path=path, bytes_written=need, use_percent=data_use_percent(device)
    )


def _fill_file(device: Device, kind: FillKind, size: int) -> str:
    if kind is FillKind.JSON_LOG:
        cid = _app_container_id(device)
        inside = f"{DOCKER}/containers/{cid}/{cid}-json.log"
        line = (
            b'{"log":"lab: chatty service line, filling the data partition\\n",'
            b'"stream":"stdout","time":"2024-01-01T00:00:00.000000000Z"}\n'
        )
        chunk = line * (_CHUNK // len(line))
    elif kind is FillKind.VOLUME:
        inside = f"{DOCKER}/volumes/{APP_VOLUME}/_data/lab-fill-{secrets.token_hex(4)}.bin"
        chunk = b"\0" * _CHUNK
    else:
        inside = f"{DOCKER}/tmp/GetImageBlob{secrets.randbelow(10**9)}"  # noqa: S108 - engine tmp
        chunk = b"\0" * _CHUNK
    host = device.path(inside)
    start = host.stat().st_size if host.exists() else 0
    _record(device, f"fill-{kind.value}", f"{inside}\t{start}")
    written = 0
    with host.open("ab") as fh:
        try:
            while written < size:
                part = chunk[: min(len(chunk), size - written)]
                fh.write(part)
                written += len(part)
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno != 28:  # noqa: PLR2004 - ENOSPC: full is a legitimate end of a fill
                raise ExecutorError(f"lab: fill of {inside} on {device.name}: {exc}") from exc
    return inside


def _fill_dangling_image(device: Device, size: int) -> str:
    """Import an untagged one-file image: ``balena images -f dangling=true`` lists it."""
    proc = subprocess.Popen(
        device.nsenter_args(["balena", "import", "-"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None  # noqa: S101 - Popen with PIPE
    size = max(size - 1024 * 1024, 4096)  # the layer metadata needs some room too
    proc.stdin.write(_tar_header("lab-fill.bin", size))
    zero = b"\0" * _CHUNK
    left = size
    with contextlib.suppress(BrokenPipeError):
        while left:
            n = min(left, _CHUNK)
            proc.stdin.write(zero[:n])
            left -= n
        proc.stdin.write(b"\0" * ((-size) % 512) + b"\0" * 1024)
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise ExecutorError(f"lab: dangling image on {device.name}: {err.decode().strip()}")
    image = out.decode().strip()
    _record(device, "fill-dangling-image", image)
    return image


def clear_fill(device: Device) -> None:
    """Remove every fill: truncate logs back, delete fill files, remove fill images."""
    for kind in (FillKind.JSON_LOG, FillKind.VOLUME, FillKind.ENGINE_TMP):
        for entry in _recorded(device, f"fill-{kind.value}"):
            inside, start = entry.split("\t")
            host = device.path(inside)
            if kind is FillKind.JSON_LOG:
                with contextlib.suppress(FileNotFoundError):
                    os.truncate(host, int(start))
            else:
                host.unlink(missing_ok=True)
        _forget(device, f"fill-{kind.value}")
    for image in _recorded(device, "fill-dangling-image"):
        device.balena("rmi", "-f", image, check=False)
    _forget(device, "fill-dangling-image")


# ------------------------------------------------------------------------------------ orphan
def referenced_layers(device: Device) -> set[str]:
    """Layer dirs the engine's metadata names (cache-id, mount-id, init-id, tmp cache-id)."""
    root = device.path(f"{DOCKER}/image/overlay2/layerdb")
    refs: set[str] = set()
    for pattern in ("sha256/*/cache-id", "mounts/*/mount-id", "mounts/*/init-id", "tmp/*/cache-id"):
        for f in root.glob(pattern):
            refs.add(f.read_text().strip())
    return refs


def layer_dirs(device: Device) -> set[str]:
    """Entries of ``/var/lib/docker/overlay2`` except ``l``."""
    return {p.name for p in device.path(f"{DOCKER}/overlay2").iterdir() if p.name != "l"}


def make_orphan_layer(device: Device, size_mb: int = 8) -> str:
    """Kill -9 dockerd during a ``balena import``; return the ``overlay2/<id>`` left behind."""
    before = layer_dirs(device)
    proc = subprocess.Popen(
        device.nsenter_args(["balena", "import", "-", "lab/interrupted:1"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None  # noqa: S101 - Popen with PIPE
    try:
        proc.stdin.write(_tar_header("payload.bin", 1024 * _CHUNK))
        proc.stdin.write(os.urandom(size_mb * _CHUNK))
        proc.stdin.flush()

        def _written() -> bool:
            for new in layer_dirs(device) - before:
                payload = device.path(f"{DOCKER}/overlay2/{new}/diff/payload.bin")
                if payload.exists() and payload.stat().st_size > 0:
                    return True
            return False

        wait_for(_written, timeout=30, what=f"the import to write a layer on {device.name}")
        # Orphans made in quick succession must not trip StartLimitBurst (one real crash
        # each, not a crash loop): reset systemd's start-rate counter before this crash.
        device.run(["systemctl", "reset-failed", "balena.service"])
        device.run(["kill", "-KILL", str(engine_pid(device))])
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.wait(timeout=60)
    device.wait_engine(timeout=60)
    orphans = sorted((layer_dirs(device) - before) - referenced_layers(device))
    if len(orphans) != 1:
        raise ExecutorError(f"lab: expected one orphaned layer on {device.name}, got {orphans}")
    _record(device, "orphans", orphans[0])
    wait_supervisor_settled(device)
    return orphans[0]


def clear_orphan_layers(device: Device) -> None:
    """Delete the orphaned layers this lab made (and their ``overlay2/l`` links)."""
    for layer in _recorded(device, "orphans"):
        if layer in referenced_layers(device):
            continue
        link = device.path(f"{DOCKER}/overlay2/{layer}/link")
        if link.exists():
            device.path(f"{DOCKER}/overlay2/l/{link.read_text().strip()}").unlink(missing_ok=True)
        device.run(["rm", "-rf", "--one-file-system", f"{DOCKER}/overlay2/{layer}"])
    _forget(device, "orphans")


# ------------------------------------------------------------------------------------ engine
def hang_engine(device: Device) -> int:
    """SIGSTOP dockerd: the unit stays active, the API stops answering.  Returns its PID."""
    pid = engine_pid(device)
    if pid == 0:
        raise ExecutorError(f"lab: engine of {device.name} is not running; cannot hang it")
    device.run(["kill", "-STOP", str(pid)])
    _record(device, "hung", str(pid))
    return pid


def resume_engine(device: Device) -> None:
    """SIGCONT a dockerd that :func:`hang_engine` stopped."""
    for pid in _recorded(device, "hung"):
        device.run(["kill", "-CONT", pid], check=False)
    _forget(device, "hung")


def crash_engine(device: Device, times: int = 1) -> int:
    """SIGKILL dockerd ``times`` times, each after systemd brought it back; returns NRestarts."""
    for _ in range(times):
        device.wait_engine(timeout=60)
        before = int(device.unit_property("NRestarts") or "0")
        device.run(["kill", "-KILL", str(engine_pid(device))])

        def _restarted(before: int = before) -> bool:
            return int(device.unit_property("NRestarts") or "0") > before

        wait_for(
            _restarted,
            timeout=30,
            what=f"systemd to restart the engine of {device.name}",
        )
    device.wait_engine(timeout=60)
    wait_supervisor_settled(device)
    return int(device.unit_property("NRestarts"))


def break_engine(device: Device) -> None:
    """Crash-loop the engine (invalid daemon.json) until systemd gives up: ActiveState=failed."""
    device.path("/etc/docker").mkdir(exist_ok=True)
    device.path("/etc/docker/daemon.json").write_text("{ this is not json\n")
    _record(device, "broken", "daemon.json")
    device.run(["kill", "-KILL", str(engine_pid(device))], check=False)
    wait_for(
        lambda: device.unit_property("ActiveState") == "failed",
        timeout=60,
        what=f"the engine of {device.name} to crash-loop into 'failed'",
    )


def repair_engine(device: Device) -> None:
    """Undo :func:`break_engine`: valid daemon.json, ``reset-failed``, start, wait healthy."""
    if not _recorded(device, "broken"):
        return
    device.path("/etc/docker/daemon.json").unlink(missing_ok=True)
    device.run(["systemctl", "reset-failed", "balena.service"], check=False)
    device.run(["systemctl", "start", "balena.service"])
    device.wait_engine(timeout=60)
    _forget(device, "broken")


# ------------------------------------------------------------------------------------ locks
def update_lock_path(app: str = APP_ID, service: str = APP_SERVICE) -> str:
    """The supervisor's update-lock path of an app service inside a device."""
    return f"{LOCK_DIR}/{app}/{service}/updates.lock"


def _check_lock_names(app: str, service: str) -> None:
    for part in (app, service):
        if not part or not all(c.isalnum() or c in "-_" for c in part):
            raise ConfigError(f"lab: app/service names are [A-Za-z0-9_-]+, got {part!r}")


def _lock_unit(app: str, service: str) -> str:
    return f"lab-lock-{app}-{service}.service"


def hold_update_lock(device: Device, app: str = APP_ID, service: str = APP_SERVICE) -> str:
    """Have a process in the device hold ``flock -x`` on the service's ``updates.lock``."""
    _check_lock_names(app, service)
    lock = update_lock_path(app, service)
    device.run(["mkdir", "-p", str(Path(lock).parent)])
    device.run(
        [
            "systemd-run",
            f"--unit={_lock_unit(app, service)}",
            "--property=KillSignal=SIGKILL",
            "--collect",
            "--quiet",
            *("flock", "-x", lock, "sleep", "2147483647"),
        ]
    )

    def _held() -> bool:
        return device.run(["flock", "-nx", lock, "true"], check=False).returncode != 0

    wait_for(_held, timeout=10, what=f"the update lock {lock} on {device.name}")
    _record(device, "locks", f"{app}\t{service}")
    return lock


def release_update_lock(device: Device, app: str = APP_ID, service: str = APP_SERVICE) -> None:
    """Stop the process holding the service's update lock; the lock file stays.

    As in the field: to the Supervisor the lock is still held until the file is gone.
    """
    device.run(["systemctl", "stop", _lock_unit(app, service)], check=False)


def _release_all_locks(device: Device) -> None:
    """Undo :func:`hold_update_lock`: stop every holder and remove the lock files it made."""
    for entry in _recorded(device, "locks"):
        app, service = entry.split("\t")
        release_update_lock(device, app, service)
        device.path(update_lock_path(app, service)).unlink(missing_ok=True)
    _forget(device, "locks")


def place_update_lock_file(
    device: Device, app: str = APP_ID, service: str = APP_SERVICE, uid: int = SUPERVISOR_LOCK_UID
) -> str:
    """Create the service's ``updates.lock`` with no process holding ``flock`` on it.

    That is how the Supervisor itself takes a lock (the ``lockfile`` way, the file owned by uid
    65534) and how an app using ``lockfile`` holds one: held because the file exists.
    """
    _check_lock_names(app, service)
    lock = update_lock_path(app, service)
    device.run(["mkdir", "-p", str(Path(lock).parent)])
    device.run(["sh", "-c", 'umask 022; : > "$1" && chown "$2" "$1"', "sh", lock, str(uid)])
    _record(device, "lock-files", lock)
    return lock


def remove_update_lock_files(device: Device) -> None:
    """Remove the lock files :func:`place_update_lock_file` made (as the Supervisor unlocks)."""
    for lock in _recorded(device, "lock-files"):
        device.path(lock).unlink(missing_ok=True)
    _forget(device, "lock-files")


# ------------------------------------------------------------------------------------ OS update
_HOSTAPP_UNIT = "lab-hostapp-update.service"
_HOSTAPP_SCRIPT = (
    "#!/bin/sh\n"
    "# lab: stands for balenaOS's host OS updater while it writes the new OS (minutes)\n"
    "sleep 2147483647\n"
)


def start_os_update(device: Device, stage: OsUpdateStage = OsUpdateStage.ROLLBACK) -> str:
    """A host OS update in progress: its rollback breadcrumbs, or ``hostapp-update`` running.

    ``rollback``: the device rebooted into the new OS and ``rollback-health`` has not finished
    (``/mnt/state/rollback-{health,altboot}-breadcrumb`` exist; the Supervisor refuses reboots).
    ``running``: ``/usr/bin/hostapp-update`` is writing the new OS (a process of that name).
    """
    if stage is OsUpdateStage.ROLLBACK:
        state_dir = device.path("/mnt/state")
        if not state_dir.exists():  # a lab device has no state partition: made, and removed
            state_dir.mkdir()
            _record(device, "os-update-dir", "/mnt/state")
        for crumb in BREADCRUMBS:
            device.path(crumb).write_text("")
            _record(device, "os-update", crumb)
        return "rollback breadcrumbs " + " ".join(BREADCRUMBS)
    script = device.path(HOSTAPP_UPDATE)
    script.write_text(_HOSTAPP_SCRIPT)
    script.chmod(0o755)
    _record(device, "os-update", HOSTAPP_UPDATE)
    device.run(
        [
            "systemd-run",
            f"--unit={_HOSTAPP_UNIT}",
            "--property=KillSignal=SIGKILL",
            "--collect",
            "--quiet",
            HOSTAPP_UPDATE,
        ]
    )
    wait_for(
        lambda: device.run(["pgrep", "-f", "hostapp-update"], check=False).returncode == 0,
        timeout=10,
        what=f"hostapp-update to run on {device.name}",
    )
    return f"{HOSTAPP_UPDATE} running"


def finish_os_update(device: Device) -> None:
    """Undo :func:`start_os_update`: stop the updater, remove the breadcrumbs and the script."""
    device.run(["systemctl", "stop", _HOSTAPP_UNIT], check=False)
    for path in _recorded(device, "os-update"):
        device.path(path).unlink(missing_ok=True)
    for folder in _recorded(device, "os-update-dir"):
        with contextlib.suppress(OSError):
            device.path(folder).rmdir()
    _forget(device, "os-update")
    _forget(device, "os-update-dir")


# ------------------------------------------------------------------------------------ supervisor
def make_supervisor_unhealthy(device: Device) -> None:
    """The Supervisor keeps running but ``/v1/healthy`` answers 500 until it is restarted."""
    device.balena("exec", SUPERVISOR_CONTAINER, "touch", "/run/unhealthy")
    _record(device, "supervisor-unhealthy", "1")
    wait_for(
        lambda: device.supervisor_code() == 500,  # noqa: PLR2004 - HTTP 500
        timeout=10,
        what=f"the Supervisor of {device.name} to answer /v1/healthy with 500",
    )


def heal_supervisor(device: Device) -> None:
    """Undo :func:`make_supervisor_unhealthy` without a restart (when it still runs)."""
    if _container_running(device, SUPERVISOR_CONTAINER):
        device.balena("exec", SUPERVISOR_CONTAINER, "rm", "-f", "/run/unhealthy", check=False)
    _forget(device, "supervisor-unhealthy")


def stop_supervisor(device: Device) -> None:
    """``systemctl stop balena-supervisor``: the unit inactive, its container exited.

    (A container stopped under a running unit is started again by systemd within RestartSec,
    10 s; a Supervisor that stays down is one whose unit stopped or gave up.)
    """
    device.run(["systemctl", "stop", SUPERVISOR_UNIT])
    _record(device, "supervisor-down", "1")
    wait_for(
        lambda: not _container_running(device, SUPERVISOR_CONTAINER),
        timeout=30,
        what=f"the Supervisor container of {device.name} to stop",
    )


def start_supervisor(device: Device) -> None:
    """Undo :func:`stop_supervisor` and an unhealthy Supervisor; wait for ``/v1/healthy`` 200.

    Its restart counter (NRestarts) is zeroed, as after a manual restart.
    """
    heal_supervisor(device)
    device.run(["systemctl", "reset-failed", SUPERVISOR_UNIT], check=False)
    if device.unit_property("ActiveState", SUPERVISOR_UNIT) != "active":
        device.run(["systemctl", "start", SUPERVISOR_UNIT])
    device.wait_supervisor(timeout=60)
    _forget(device, "supervisor-down")


def wait_supervisor_settled(device: Device, timeout: float = 40) -> None:
    """Wait until the Supervisor's unit is attached to the engine that runs now.

    After an engine restart the engine starts the Supervisor's container again by itself
    (restart policy always), but its unit's ``balena start --attach`` ended with the old engine;
    systemd restarts the unit RestartSec (10 s) later, which stops and starts the container
    once more.  A fault injected in between would be undone by that restart: faults that
    restart the engine return only once it happened.  Rather than sit out RestartSec, a unit
    waiting to restart is restarted at once (what systemd is about to do; its NRestarts is
    zeroed, as by any manual restart).  No wait when the engine or the unit is not running.
    """

    def _settled() -> bool:
        engine = device.unit_property("ExecMainStartTimestampMonotonic")
        if device.unit_property("ActiveState") != "active":
            return True
        props = ("ActiveState", "SubState", "LoadState", "ExecMainStartTimestampMonotonic")
        show = device.run(
            ["systemctl", "show", *(f"--property={p}" for p in props), SUPERVISOR_UNIT]
        ).stdout
        unit = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
        if unit.get("LoadState") != "loaded" or unit.get("SubState") in {"dead", "failed"}:
            return True  # not installed, or stopped on purpose / given up: nothing will restart
        if unit.get("SubState") == "auto-restart":
            device.run(["systemctl", "restart", SUPERVISOR_UNIT], check=False)
            return False
        return unit.get("SubState") == "running" and int(
            unit.get("ExecMainStartTimestampMonotonic") or "0"
        ) >= int(engine or "0")

    wait_for(_settled, timeout=timeout, what=f"the Supervisor of {device.name} to settle")


def _container_running(device: Device, name: str) -> bool:
    res = device.balena("inspect", "-f", "{{.State.Running}}", name, check=False)
    return res.returncode == 0 and res.stdout.strip() == "true"


# ------------------------------------------------------------------------------------ pull
_PULL_UNIT = "lab-pull.service"
_PULL_SCRIPT = (
    "{ cat /run/lab/pull-header; while :; do head -c 65536 /dev/zero; sleep 1; done; }"
    " | balena import - lab/pulling:1"
)


def start_pull(device: Device) -> None:
    """Start a long ``balena import`` fed by a slow stream: a ``docker-untar`` stays running."""
    header = device.path(f"{STATE}/pull-header")
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_bytes(_tar_header("layer.bin", 64 * 1024 * _CHUNK))
    device.run(
        [
            "systemd-run",
            f"--unit={_PULL_UNIT}",
            "--property=KillSignal=SIGKILL",
            "--collect",
            "--quiet",
            *("sh", "-c", _PULL_SCRIPT),
        ]
    )
    wait_for(
        lambda: device.run(["pgrep", "-f", "docker-untar"], check=False).returncode == 0,
        timeout=30,
        what=f"the import to start on {device.name}",
    )


def stop_pull(device: Device) -> None:
    """Abort the import :func:`start_pull` started (the engine discards the partial layer)."""
    device.run(["systemctl", "stop", _PULL_UNIT], check=False)
    with contextlib.suppress(ExecutorError):
        wait_for(
            lambda: device.run(["pgrep", "-f", "docker-untar"], check=False).returncode != 0,
            timeout=30,
            what=f"the import to end on {device.name}",
        )


# ------------------------------------------------------------------------------------ ro data
def _data_mount(device: Device) -> tuple[str, str, str]:
    """(major:minor, source, options) of ``/mnt/data`` as the device's mountinfo shows it."""
    for line in Path(f"/proc/{device.state.leader_pid}/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        if fields[4] == "/mnt/data":
            _fstype, source, super_opts = post.split()[:3]
            return fields[2], source, f"{fields[5]},{super_opts}"
    raise ExecutorError(f"lab: /mnt/data is not mounted on {device.name}")


def data_block_device(device: Device) -> str:
    """Kernel name of the block device under ``/mnt/data`` (``loop3``): ``/sys/fs/ext4/<it>``."""
    majmin = _data_mount(device)[0]
    return Path(f"/sys/dev/block/{majmin}").readlink().name


def data_mount_options(device: Device) -> list[str]:
    """Mount and super-block options of ``/mnt/data`` (``ro``/``rw``, ``emergency_ro``, ...)."""
    return _data_mount(device)[2].split(",")


def make_data_readonly(device: Device, form: DataRoForm = DataRoForm.RO) -> None:
    """Make the data partition unwritable, in one of the two forms the field shows.

    ``ro``: the engine is stopped (``mount -o remount,ro`` refuses while it holds files open for
    writing), the file system remounted read-only (``/proc/mounts`` shows ``ro``), and the
    engine started again: it cannot start on a read-only data root and crash-loops.

    ``emergency-ro``: an ext4 error raised through ``/sys/fs/ext4/<dev>/trigger_fs_error``
    while the engine runs and holds files open; with ``errors=remount-ro`` kernels >= 6.x keep
    the mount ``rw`` and add ``emergency_ro`` (``errors_count`` becomes 1): every write fails,
    the engine and containers keep running.  Only an unmount, ``e2fsck`` and a new mount undo
    it (:func:`make_data_writable` does that, as the fsck of a reboot would).
    """
    if form is DataRoForm.RO:
        device.run(["systemctl", "stop", "balena.service"])
        device.run(["mount", "-o", "remount,ro", "/mnt/data"])
        _record(device, "data-ro", form.value)
        device.run(["systemctl", "start", "--no-block", "balena.service"])
        return
    device.wait_engine(timeout=60)
    trigger = Path(f"/sys/fs/ext4/{data_block_device(device)}/trigger_fs_error")
    _record(device, "data-ro", form.value)
    trigger.write_text("lab: data-ro fault (emergency_ro)\n")
    # Kernels before 6.x remount the file system read-only instead (``ro`` in /proc/mounts).
    wait_for(
        lambda: bool({"emergency_ro", "ro"} & set(data_mount_options(device))),
        timeout=10,
        what=f"/mnt/data of {device.name} to show emergency_ro",
    )


def _needs_fsck(device: Device) -> bool:
    opts = data_mount_options(device)
    errors = Path(f"/sys/fs/ext4/{data_block_device(device)}/errors_count")
    count = int(errors.read_text()) if errors.exists() else 0
    return "emergency_ro" in opts or "shutdown" in opts or count > 0


def make_data_writable(device: Device) -> None:
    """Undo :func:`make_data_readonly` (either form) and bring the engine back."""
    supervisor_was_up = False
    if _needs_fsck(device):
        supervisor_was_up = _repair_data_partition(device)
    elif data_mount_options(device)[0] == "ro":
        device.run(["mount", "-o", "remount,rw", "/mnt/data"])
    if _recorded(device, "data-ro"):
        device.run(["systemctl", "reset-failed", "balena.service"], check=False)
        device.run(["systemctl", "restart", "balena.service"])
        device.wait_engine(timeout=60)
    if supervisor_was_up:
        device.run(["systemctl", "start", SUPERVISOR_UNIT])
        device.wait_supervisor(timeout=60)
    _forget(device, "data-ro")


def _repair_data_partition(device: Device) -> bool:
    """Repair the data partition as a reboot's fsck would: unmount, ``e2fsck -fy``, mount.

    The Supervisor and the engine are stopped first (stopping ``lab-data.service``, which
    unmounts the file system, stops the engine that requires it); the new mount is a new super
    block, without the error state.  Returns whether the Supervisor was up (to start again).
    """
    img = Path(device.state.dir) / "data.img"
    block = data_block_device(device)
    was_up = device.unit_property("ActiveState", SUPERVISOR_UNIT) in {"active", "activating"}
    device.run(["systemctl", "stop", SUPERVISOR_UNIT], check=False)
    stop_pull(device)
    device.run(["systemctl", "stop", DATA_UNIT])
    wait_for(
        lambda: not Path(f"/sys/fs/ext4/{block}").exists(),
        timeout=20,
        what=f"the data partition of {device.name} to be unmounted everywhere",
    )
    fsck = run_command([host_tool("e2fsck"), "-fy", str(img)], check=False, timeout=300)
    if fsck.returncode not in (0, 1):  # 1: errors corrected
        raise ExecutorError(f"lab: e2fsck of {img} exited {fsck.returncode}: {fsck.stdout[-500:]}")
    device.run(["systemctl", "start", DATA_UNIT])
    return was_up


# ------------------------------------------------------------------------------------ the table
class FaultOptions(BaseModel):
    """Every fault's options (each fault reads its own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    percent: int = 95
    kind: FillKind = FillKind.VOLUME
    times: int = 1
    app: str = APP_ID
    service: str = APP_SERVICE
    form: DataRoForm = DataRoForm.RO
    stage: OsUpdateStage = OsUpdateStage.ROLLBACK


@dataclass(frozen=True)
class FaultActions:
    """How to inject one fault (returning a one-line description) and how to undo it."""

    inject: Callable[[Device, FaultOptions], str]
    clear: Callable[[Device], None]


def _inject_fill(device: Device, o: FaultOptions) -> str:
    res = fill_data(device, o.percent, o.kind)
    return f"filled /mnt/data to {res.use_percent}% with {o.kind.value} ({res.path})"


def _inject_engine_down(device: Device, _o: FaultOptions) -> str:
    break_engine(device)
    return "engine crash-looped into ActiveState=failed"


def _inject_pull(device: Device, _o: FaultOptions) -> str:
    start_pull(device)
    return "balena import in progress (docker-untar running)"


def _inject_data_ro(device: Device, o: FaultOptions) -> str:
    make_data_readonly(device, o.form)
    if o.form is DataRoForm.RO:
        return "/mnt/data remounted read-only; the engine cannot start on it"
    return "/mnt/data hit an ext4 error: rw,...,emergency_ro; every write fails"


def _inject_supervisor_unhealthy(device: Device, _o: FaultOptions) -> str:
    make_supervisor_unhealthy(device)
    return "the Supervisor answers /v1/healthy with 500 until it is restarted"


def _inject_supervisor_down(device: Device, _o: FaultOptions) -> str:
    stop_supervisor(device)
    return f"{SUPERVISOR_UNIT} stopped; container {SUPERVISOR_CONTAINER} exited"


def _wait_engine(device: Device) -> None:
    device.wait_engine(timeout=60)  # systemd already recovered it; NRestarts stays


#: Fault -> its inject and clear, in the order :func:`clear_all` undoes them (a hung engine
#: resumes and a pull stops before the data partition is repaired, which stops the engine;
#: from engine-crash on, the undo needs the engine running: see ``_AFTER_ENGINE``).
FAULTS: Mapping[Fault, FaultActions] = MappingProxyType(
    {
        Fault.ENGINE_HANG: FaultActions(
            lambda d, _o: f"dockerd (pid {hang_engine(d)} in the device) stopped with SIGSTOP",
            resume_engine,
        ),
        Fault.PULL: FaultActions(_inject_pull, stop_pull),
        Fault.DATA_RO: FaultActions(_inject_data_ro, make_data_writable),
        Fault.ENGINE_DOWN: FaultActions(_inject_engine_down, repair_engine),
        Fault.UPDATE_LOCK: FaultActions(
            lambda d, o: f"holding {hold_update_lock(d, o.app, o.service)}", _release_all_locks
        ),
        Fault.UPDATE_LOCK_FILE: FaultActions(
            lambda d, o: f"lock file {place_update_lock_file(d, o.app, o.service)} (no flock)",
            remove_update_lock_files,
        ),
        Fault.OS_UPDATE: FaultActions(
            lambda d, o: f"host OS update in progress: {start_os_update(d, o.stage)}",
            finish_os_update,
        ),
        Fault.ENGINE_CRASH: FaultActions(
            lambda d, o: f"engine killed {o.times}x; NRestarts={crash_engine(d, o.times)}",
            _wait_engine,
        ),
        Fault.FILL: FaultActions(_inject_fill, clear_fill),
        Fault.ORPHAN_LAYER: FaultActions(
            lambda d, _o: f"orphaned layer {DOCKER}/overlay2/{make_orphan_layer(d)}",
            clear_orphan_layers,
        ),
        Fault.SUPERVISOR_UNHEALTHY: FaultActions(_inject_supervisor_unhealthy, heal_supervisor),
        Fault.SUPERVISOR_DOWN: FaultActions(_inject_supervisor_down, start_supervisor),
    }
)


def inject(
    device: Device,
    fault: Fault,
    *,
    percent: int = 95,
    kind: FillKind = FillKind.VOLUME,
    times: int = 1,
    app: str = APP_ID,
    service: str = APP_SERVICE,
    form: DataRoForm = DataRoForm.RO,
    stage: OsUpdateStage = OsUpdateStage.ROLLBACK,
) -> str:
    """Inject ``fault`` with its options; return a one-line description of what was done."""
    options = FaultOptions(
        percent=percent, kind=kind, times=times, app=app, service=service, form=form, stage=stage
    )
    return FAULTS[fault].inject(device, options)


def clear(device: Device, fault: Fault) -> str:
    """Undo ``fault`` on ``device``; return a one-line description."""
    FAULTS[fault].clear(device)
    return f"cleared {fault.value} on {device.name}"


def clear_all(device: Device) -> None:
    """Undo every fault on ``device``; its engine, app container and Supervisor run again."""
    for fault, actions in FAULTS.items():
        if fault in _AFTER_ENGINE:
            continue
        actions.clear(device)
    # Crashes of an earlier test: reset-failed zeroes NRestarts and systemd's start-rate
    # counter (StartLimitBurst), so the next test starts from a device that has not been
    # crash-looping, and its own crashes are answered by a restart.
    device.run(["systemctl", "reset-failed", "balena.service"])
    if device.unit_property("ActiveState") != "active":
        device.run(["systemctl", "start", "balena.service"])
    device.wait_engine(timeout=60)
    for fault in _AFTER_ENGINE:
        FAULTS[fault].clear(device)
    running = device.balena("ps", "-q", "--filter", f"name=^{APP_CONTAINER}$").stdout.strip()
    if not running:
        device.balena("start", APP_CONTAINER)
    wait_supervisor_settled(device)


#: Faults whose undo needs a running engine: cleared by :func:`clear_all` once it runs.
_AFTER_ENGINE = (
    Fault.ENGINE_CRASH,
    Fault.FILL,
    Fault.ORPHAN_LAYER,
    Fault.SUPERVISOR_UNHEALTHY,
    Fault.SUPERVISOR_DOWN,
)


def describe(device: Device) -> dict[str, object]:
    """Engine, Supervisor and data-partition state of ``device`` (for ``lab status``)."""
    return {
        "name": device.name,
        "address": device.address,
        "engine": device.unit_property("ActiveState"),
        "n_restarts": device.unit_property("NRestarts"),
        "supervisor": device.unit_property("ActiveState", SUPERVISOR_UNIT),
        "supervisor_healthy": device.supervisor_code(),
        "data_use_percent": data_use_percent(device),
        "data_mount": ",".join(
            dict.fromkeys(
                o
                for o in data_mount_options(device)
                if o in {"ro", "rw", "emergency_ro", "shutdown"}
            )
        ),
        "faults": sorted(p.name for p in device.path(STATE).glob("*"))
        if device.path(STATE).exists()
        else [],
    }


__all__ = [
    "BREADCRUMBS",
    "FAULTS",
    "DataRoForm",
    "Fault",
    "FaultActions",
    "FaultOptions",
    "FillKind",
    "FillResult",
    "OsUpdateStage",
    "break_engine",
    "clear",
    "clear_all",
    "clear_fill",
    "clear_orphan_layers",
    "crash_engine",
    "data_block_device",
    "data_mount_options",
    "data_use_percent",
    "describe",
    "fill_data",
    "finish_os_update",
    "hang_engine",
    "heal_supervisor",
    "hold_update_lock",
    "inject",
    "layer_dirs",
    "make_data_readonly",
    "make_data_writable",
    "make_orphan_layer",
    "make_supervisor_unhealthy",
    "place_update_lock_file",
    "referenced_layers",
    "release_update_lock",
    "remove_update_lock_files",
    "repair_engine",
    "resume_engine",
    "start_os_update",
    "start_pull",
    "start_supervisor",
    "stop_pull",
    "stop_supervisor",
    "update_lock_path",
]
