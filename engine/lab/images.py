"""The lab's tiny image set, built locally with no registry, and what each device runs.

``lab/base:1`` is a busybox-static root file system brought in with ``balena import``; the other
images are ``balena build --network none`` layers on top, so they share base layers the way a
fleet's releases do.  The set is built once (in the first device), saved with ``balena save`` to
a tar in a cache dir keyed by the recipe, the busybox binary and the engine version, and loaded
into every other device with ``balena load``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

from engine.errors import ExecutorError
from engine.lab.device import Device

BUSYBOX = Path("/bin/busybox")
APP_ID = "1234567"
APP_SERVICE = "main"
APP_CONTAINER = "main_1_1"
APP_VOLUME = f"{APP_ID}_data"
_LOOP_CMD = '["sh", "-c", "trap \'exit 0\' TERM; while :; do sleep 1; done"]'
RECIPES: tuple[tuple[str, str], ...] = (
    (
        "lab/app:1",
        (
            "FROM lab/base:1\n"
            "RUN dd if=/dev/urandom of=/app.bin bs=1024 count=2048 2>/dev/null\n"
            "RUN echo 1 > /version\n"
            f"CMD {_LOOP_CMD}\n"
        ),
    ),
    ("lab/app:2", "FROM lab/app:1\nRUN echo 2 > /version\n"),
    (
        "lab/sidecar:1",
        (
            "FROM lab/base:1\n"
            "RUN mkdir /sidecar && dd if=/dev/urandom of=/sidecar/blob bs=512 count=1024\n"
            f"CMD {_LOOP_CMD}\n"
        ),
    ),
)
#: Images built from a folder under ``engine/lab/files`` (its Dockerfile and files as the context).
CONTEXT_RECIPES: tuple[tuple[str, str], ...] = (("lab/supervisor:1", "supervisor"),)
IMAGES: tuple[str, ...] = (
    "lab/base:1",
    *(name for name, _ in RECIPES),
    *(name for name, _ in CONTEXT_RECIPES),
)
SUPERVISOR_CONTAINER = "balena_supervisor"
SUPERVISOR_UNIT = "balena-supervisor.service"


def default_cache_dir() -> Path:
    """Image cache dir: ``$REMEDIATE_LAB_CACHE``, else ``~/.cache/remediate-lab``."""
    env = os.environ.get("REMEDIATE_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "remediate-lab"


def busybox_rootfs_tar() -> bytes:
    """A tar of a minimal busybox-static root file system (one binary, applet symlinks)."""
    if not BUSYBOX.exists():
        raise ExecutorError(f"lab: {BUSYBOX} missing (Debian package busybox-static)")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("data", 0o755)):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


def _context_tar(folder: str) -> bytes:
    """A build context: the files of ``engine/lab/files/<folder>`` in a tar (mode 0644)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in sorted(
            (resources.files("engine.lab") / "files" / folder).iterdir(), key=lambda e: e.name
        ):
            data = entry.read_bytes()
            info = tarfile.TarInfo(entry.name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cache_key() -> str:
    digest = hashlib.sha256()
    digest.update(BUSYBOX.read_bytes())
    digest.update(repr(RECIPES).encode())
    for _name, folder in CONTEXT_RECIPES:
        digest.update(_context_tar(folder))
    digest.update(subprocess.run(["dockerd", "--version"], capture_output=True, check=False).stdout)
    return digest.hexdigest()[:16]


def ensure_image_tar(builder: Device, cache_dir: Path) -> Path:
    """Return the cached image-set tar, building it in ``builder`` first when missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tar = cache_dir / f"lab-images-{_cache_key()}.tar"
    if tar.exists():
        return tar
    base = ["balena", "import", "--change", 'CMD ["sh"]', "-", "lab/base:1"]
    _pipe_in(builder, base, busybox_rootfs_tar())
    for name, dockerfile in RECIPES:
        build = ["balena", "build", "--network", "none", "-q", "-t", name, "-"]
        _pipe_in(builder, build, dockerfile.encode())
    for name, folder in CONTEXT_RECIPES:
        build = ["balena", "build", "--network", "none", "-q", "-t", name, "-"]
        _pipe_in(builder, build, _context_tar(folder))
    tmp = tar.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as out:
        proc = subprocess.run(
            builder.nsenter_args(["balena", "save", *IMAGES]),
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
            timeout=300,
        )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ExecutorError(f"lab: balena save failed in {builder.name}: {proc.stderr.decode()}")
    tmp.replace(tar)
    return tar


def _pipe_in(device: Device, args: list[str], data: bytes) -> None:
    proc = subprocess.run(
        device.nsenter_args(args), input=data, capture_output=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        raise ExecutorError(
            f"lab: {' '.join(args)} failed in {device.name}: {proc.stderr.decode().strip()}"
        )


def provision(device: Device, image_tar: Path) -> None:
    """Load the image set (unless present), start the app container and the Supervisor.

    The Supervisor stand-in's unit is enabled and started; it creates its container.
    """
    have = device.balena("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    if not set(IMAGES) <= set(have):
        _pipe_in(device, ["balena", "load", "-q"], image_tar.read_bytes())
    device.balena("volume", "create", APP_VOLUME)
    device.balena(
        "run",
        "-d",
        "--name",
        APP_CONTAINER,
        "--network",
        "none",
        "--label",
        f"io.balena.app-id={APP_ID}",
        "--label",
        f"io.balena.service-name={APP_SERVICE}",
        "-v",
        f"{APP_VOLUME}:/data",
        "lab/app:1",
    )
    device.run(["systemctl", "enable", "--now", "--quiet", SUPERVISOR_UNIT])
    device.wait_supervisor(timeout=60)
