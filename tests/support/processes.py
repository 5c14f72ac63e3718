"""Processes: which run now, and the servers tests start (Prometheus, Alertmanager).

Which run now: of any parent or session (Ansible's workers have their own).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil
import pytest


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line mentions ``text``.

    psutil's iteration skips a process that ends while it is read; zombies count as ended.
    """
    return [
        process.info["pid"]
        for process in psutil.process_iter(["pid", "cmdline", "status"])
        if process.info["status"] != psutil.STATUS_ZOMBIE
        and text in " ".join(process.info["cmdline"] or ())
    ]


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_daemon(argv: Sequence[str], log: Path, ready_url: str) -> subprocess.Popen[bytes]:
    """Start a server (output to ``log``) and wait until ``ready_url`` answers 200.

    The test fails with the log if the server exits first.  Stop it with :func:`stop_daemon`.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT)
    name = Path(argv[0]).name

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(ready_url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    deadline = time.monotonic() + 30
    while not ready():
        if time.monotonic() > deadline:
            stop_daemon(proc)
            pytest.fail(f"{name} not ready after 30 s:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server :func:`start_daemon` started; SIGKILL it after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
