"""The simulated fleet the benchmarks probe: local-connection hosts that look like balenaOS.

* :func:`write_inventory`: hosts with ``ansible_connection: local`` and a Python that does
  not exist, so only ``raw`` works, as on a device.
* :func:`device_tmp`: the devices' ``TMPDIR``.  The probe script keeps each check's output
  in files under ``$TMPDIR`` (else ``/tmp``), which on balenaOS is a tmpfs; on this machine
  ``/tmp`` may be a disk, where creating and removing those files costs about as much as
  cheap checks themselves.  So the devices get a fresh folder on a tmpfs (``/dev/shm`` by
  default), set as ``TMPDIR`` in this process's environment, which ansible-runner and
  ``ansible-playbook`` pass on to the ``raw`` tasks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml


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
