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
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from engine.errors import ConfigError, ExecutorError
from engine.lab.devices import Device, wait_for
from engine.lab.images import APP_CONTAINER, APP_ID, APP_SERVICE, APP_VOLUME

DOCKER = "/var/lib/docker"
STATE = "/run/lab"
_CHUNK = 1024 * 1024


class Fault(enum.StrEnum):
    """Faults the lab can inject (CLI verbs of ``lab inject``)."""

    FILL = "fill"
    ORPHAN_LAYER = "orphan-layer"
    ENGINE_HANG = "engine-hang"
    ENGINE_CRASH = "engine-crash"
    ENGINE_DOWN = "engine-down"
    UPDATE_LOCK = "update-lock"
    PULL = "pull"
    DATA_RO = "data-ro"


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
    return f"/tmp/balena-supervisor/services/{app}/{service}/updates.lock"  # noqa: S108 - device


def _lock_unit(app: str, service: str) -> str:
    return f"lab-lock-{app}-{service}.service"


def hold_update_lock(device: Device, app: str = APP_ID, service: str = APP_SERVICE) -> str:
    """Have a process in the device hold ``flock -x`` on the service's ``updates.lock``."""
    for part in (app, service):
        if not part or not all(c.isalnum() or c in "-_" for c in part):
            raise ConfigError(f"lab: app/service names are [A-Za-z0-9_-]+, got {part!r}")
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
    """Stop the process holding the service's update lock (the lock file stays, as in the field)."""
    device.run(["systemctl", "stop", _lock_unit(app, service)], check=False)


def _release_all_locks(device: Device) -> None:
    for entry in _recorded(device, "locks"):
        app, service = entry.split("\t")
        release_update_lock(device, app, service)
    _forget(device, "locks")


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
def _data_mount(device: Device) -> tuple[str, str]:
    """(source device, options) of ``/mnt/data`` as the device's /proc/mounts shows it."""
    for line in Path(f"/proc/{device.state.leader_pid}/mounts").read_text().splitlines():
        src, target, _fs, opts = line.split()[:4]
        if target == "/mnt/data":
            return src, opts
    raise ExecutorError(f"lab: /mnt/data is not mounted on {device.name}")


def make_data_readonly(device: Device) -> None:
    """Remount the data partition read-only, as a device that came up with it read-only.

    ``mount -o remount,ro`` refuses while the engine holds files open for writing, so the
    engine is stopped, the file system remounted read-only (``/proc/mounts`` shows ``ro`` for
    ``/mnt/data`` and ``/var/lib/docker``), and the engine started again: it cannot start on a
    read-only data root and crash-loops, as on a real device.  (ext4's own ``errors=remount-ro``
    is not used: on kernels >= 6.x it shows ``rw,...,emergency_ro`` and cannot be undone
    without unmounting.)
    """
    device.run(["systemctl", "stop", "balena.service"])
    device.run(["mount", "-o", "remount,ro", "/mnt/data"])
    _record(device, "data-ro", _data_mount(device)[0])
    device.run(["systemctl", "start", "--no-block", "balena.service"])


def make_data_writable(device: Device) -> None:
    """Remount the data partition read-write and bring the engine back."""
    if _data_mount(device)[1].split(",")[0] == "ro":
        device.run(["mount", "-o", "remount,rw", "/mnt/data"])
    if _recorded(device, "data-ro"):
        device.run(["systemctl", "reset-failed", "balena.service"], check=False)
        device.run(["systemctl", "restart", "balena.service"])
        device.wait_engine(timeout=60)
    _forget(device, "data-ro")


# ------------------------------------------------------------------------------------ all
def inject(
    device: Device,
    fault: Fault,
    *,
    percent: int = 95,
    kind: FillKind = FillKind.VOLUME,
    times: int = 1,
    app: str = APP_ID,
    service: str = APP_SERVICE,
) -> str:
    """Inject ``fault`` with its options; return a one-line description of what was done."""
    if fault is Fault.FILL:
        res = fill_data(device, percent, kind)
        return f"filled /mnt/data to {res.use_percent}% with {kind.value} ({res.path})"
    if fault is Fault.ORPHAN_LAYER:
        return f"orphaned layer /var/lib/docker/overlay2/{make_orphan_layer(device)}"
    if fault is Fault.ENGINE_HANG:
        return f"dockerd (pid {hang_engine(device)} in the device) stopped with SIGSTOP"
    if fault is Fault.ENGINE_CRASH:
        return f"engine killed {times}x; NRestarts={crash_engine(device, times)}"
    if fault is Fault.ENGINE_DOWN:
        break_engine(device)
        return "engine crash-looped into ActiveState=failed"
    if fault is Fault.UPDATE_LOCK:
        return f"holding {hold_update_lock(device, app, service)}"
    if fault is Fault.PULL:
        start_pull(device)
        return "balena import in progress (docker-untar running)"
    make_data_readonly(device)
    return "/mnt/data remounted read-only; the engine cannot start on it"


def clear(device: Device, fault: Fault) -> str:
    """Undo ``fault`` on ``device``; return a one-line description."""
    if fault is Fault.FILL:
        clear_fill(device)
    elif fault is Fault.ORPHAN_LAYER:
        clear_orphan_layers(device)
    elif fault is Fault.ENGINE_HANG:
        resume_engine(device)
    elif fault is Fault.ENGINE_CRASH:
        device.wait_engine(timeout=60)  # systemd already recovered it; NRestarts stays
    elif fault is Fault.ENGINE_DOWN:
        repair_engine(device)
    elif fault is Fault.UPDATE_LOCK:
        _release_all_locks(device)
    elif fault is Fault.PULL:
        stop_pull(device)
    else:
        make_data_writable(device)
    return f"cleared {fault.value} on {device.name}"


def clear_all(device: Device) -> None:
    """Undo every fault on ``device`` and make sure its engine and app container run."""
    make_data_writable(device)
    resume_engine(device)
    repair_engine(device)
    stop_pull(device)
    _release_all_locks(device)
    # Crashes of an earlier test: reset-failed zeroes NRestarts and systemd's start-rate
    # counter (StartLimitBurst), so the next test starts from a device that has not been
    # crash-looping, and its own crashes are answered by a restart.
    device.run(["systemctl", "reset-failed", "balena.service"])
    if device.unit_property("ActiveState") != "active":
        device.run(["systemctl", "start", "balena.service"])
    device.wait_engine(timeout=60)
    clear_fill(device)
    clear_orphan_layers(device)
    running = device.balena("ps", "-q", "--filter", f"name={APP_CONTAINER}").stdout.strip()
    if not running:
        device.balena("start", APP_CONTAINER)


def describe(device: Device) -> dict[str, object]:
    """Engine and data-partition state of ``device`` (for ``lab status``)."""
    return {
        "name": device.name,
        "address": device.address,
        "engine": device.unit_property("ActiveState"),
        "n_restarts": device.unit_property("NRestarts"),
        "data_use_percent": data_use_percent(device),
        "data_mount": _data_mount(device)[1].split(",")[0],
        "faults": sorted(p.name for p in device.path(STATE).glob("*"))
        if device.path(STATE).exists()
        else [],
    }


__all__ = [
    "Fault",
    "FillKind",
    "FillResult",
    "break_engine",
    "clear",
    "clear_all",
    "clear_fill",
    "clear_orphan_layers",
    "crash_engine",
    "data_use_percent",
    "describe",
    "fill_data",
    "hang_engine",
    "hold_update_lock",
    "inject",
    "layer_dirs",
    "make_data_readonly",
    "make_data_writable",
    "make_orphan_layer",
    "referenced_layers",
    "release_update_lock",
    "repair_engine",
    "resume_engine",
    "start_pull",
    "stop_pull",
    "update_lock_path",
]
