"""A real OpenSSH server on 127.0.0.1 for integration tests (fixture ``sshd``).

It runs ``/usr/sbin/sshd -D`` with a generated host key and a generated client key,
key authentication only, for the current user.  The process is stopped by its PID.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

SSHD = Path("/usr/sbin/sshd")
_PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start as root without it
_START_DEADLINE_S = 15.0


@dataclass(frozen=True)
class SshServer:
    """Where the test sshd listens and how to log in to it."""

    host: str
    port: int
    user: str
    key: Path  # private key file of the client


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _config(root: Path, port: int, user: str) -> str:
    return "\n".join(
        [
            f"ListenAddress 127.0.0.1:{port}",
            f"HostKey {root / 'host_key'}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"AllowUsers {user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "LogLevel ERROR",
            "",
        ]
    )


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + _START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A running sshd on 127.0.0.1 accepting the generated key for the current user."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server (/usr/sbin/sshd) and ssh-keygen are needed")
    root = tmp_path_factory.mktemp("sshd")
    user = getpass.getuser()
    _keygen(root / "host_key")
    _keygen(root / "client_key")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    if os.geteuid() == 0:
        _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(_config(root, port, user))
    log = (root / "sshd.log").open("wb")
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_listening(proc, port)
        yield SshServer(host="127.0.0.1", port=port, user=user, key=root / "client_key")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
