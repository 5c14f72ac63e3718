"""balena's tunnel, built from real parts for tests, and a network namespace to hide devices.

* :class:`LabCa`: a CA made with ``openssl`` for the test, and a server certificate for
  ``localhost`` (SNI and name checks are real: the helper is given the CA file).
* :class:`TunnelHost`: ``stunnel`` (TLS, the tunnel host's certificate) in front of ``squid``
  (an HTTP CONNECT proxy with basic auth: ``<user>:<token>``), which resolves
  ``<uuid>.balena`` from a private hosts file (squid's ``hosts_file``) to the devices'
  addresses: what ``tunnel.balena-cloud.com`` is to a device, on loopback.
* :class:`NetNs`: a network namespace of the test's own with only a loopback device, so that a
  controller run inside it cannot reach the lab devices (they listen on 127.77.x.y of the
  root namespace); :meth:`NetNs.listen` opens a listening socket inside it (the thread that
  creates it enters the namespace with ``setns``).
* :class:`Relay`: copies TCP connections from a socket in one namespace to an address in the
  root namespace (the controller's path to the tunnel host; it only ever sees TLS bytes).

Every process is started by the test and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
SQUID = shutil.which("squid") or "/usr/sbin/squid"
SQUID_NCSA = Path("/usr/lib/squid/basic_ncsa_auth")
_CLONE_NEWNET = 0x40000000


def tunnel_skip_reason() -> str | None:
    """Why the tunnel's parts cannot run here, or None."""
    missing = [
        name
        for name, found in (
            ("stunnel4", STUNNEL),
            ("squid", Path(SQUID).exists() and SQUID_NCSA.exists()),
            ("openssl", shutil.which("openssl")),
            ("ssh", shutil.which("ssh")),
        )
        if not found
    ]
    return f"balena tunnel tests need: {', '.join(missing)}" if missing else None


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail with ``log`` if ``proc`` ends."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a child we started (SIGTERM, then SIGKILL), by its PID."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class LabCa:
    """A test CA and a certificate it signed for ``localhost``."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, root: Path) -> LabCa:
        """Create the CA and the server certificate under ``root``."""
        root.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=root)

        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl(
            "req",
            "-x509",
            *curve,
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=remediate test CA",
        )
        openssl(
            "req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"
        )
        (root / "server.ext").write_text(
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        )
        openssl(
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        )
        return cls(ca=root / "ca.pem", cert=root / "server.pem", key=root / "server.key")

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the ``localhost`` certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


class TunnelHost:
    """stunnel (TLS) → squid (CONNECT, basic auth ``user:token``) → the devices' sshd."""

    def __init__(
        self, root: Path, ca: LabCa, *, user: str, token: str, devices: Mapping[str, str]
    ) -> None:
        self.root, self.ca, self.user, self.token = root, ca, user, token
        self.devices = dict(devices)  # uuid -> address
        self.port = 0
        self.proxy_port = 0
        self._squid: subprocess.Popen[bytes] | None = None
        self._stunnel: subprocess.Popen[bytes] | None = None
        # squid drops to the `proxy` user (when started as root): its files must be readable
        # for it, which the test's private tmp_path is not.
        self._squid_dir = Path(tempfile.mkdtemp(prefix="remediate-squid-"))
        self._squid_dir.chmod(0o755)

    def start(self) -> TunnelHost:
        """Start squid, then stunnel in front of it."""
        sq = self._squid_dir
        password = (
            subprocess.run(
                ["openssl", "passwd", "-apr1", "-stdin"],
                input=self.token.encode(),
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        (sq / "passwd").write_text(f"{self.user}:{password}\n")
        (sq / "hosts").write_text(
            "".join(f"{address} {uuid}.balena\n" for uuid, address in self.devices.items())
        )
        (sq / "logs").mkdir()
        if os.geteuid() == 0:
            shutil.chown(sq / "logs", "proxy", "proxy")
        for name in ("passwd", "hosts"):
            (sq / name).chmod(0o644)
        self.proxy_port = free_port()
        (sq / "squid.conf").write_text(
            "\n".join(
                [
                    f"http_port 127.0.0.1:{self.proxy_port}",
                    f"pid_filename {sq / 'logs' / 'squid.pid'}",
                    f"cache_log {sq / 'logs' / 'cache.log'}",
                    "access_log none",
                    "cache_store_log none",
                    "cache deny all",
                    "cache_mem 8 MB",
                    f"coredump_dir {sq / 'logs'}",
                    f"hosts_file {sq / 'hosts'}",
                    "dns_nameservers 127.0.0.1",
                    "dns_timeout 2 seconds",
                    "connect_timeout 5 seconds",
                    f"auth_param basic program {SQUID_NCSA} {sq / 'passwd'}",
                    "auth_param basic realm balena",
                    "acl authenticated proxy_auth REQUIRED",
                    "acl CONNECT method CONNECT",
                    "http_access deny !CONNECT",
                    "http_access allow authenticated",
                    "http_access deny all",
                    "shutdown_lifetime 0 seconds",
                    "",
                ]
            )
        )
        log = self.root / "squid.out"
        with log.open("wb") as out:
            self._squid = subprocess.Popen(
                [SQUID, "-N", "-f", str(sq / "squid.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_listening(self.proxy_port, self._squid, "squid", log)
        self.port = free_port()
        conf = self.root / "stunnel.conf"
        conf.write_text(
            "\n".join(
                [
                    "foreground = yes",
                    "pid =",
                    "debug = 4",
                    "[tunnel]",
                    f"accept = 127.0.0.1:{self.port}",
                    f"connect = 127.0.0.1:{self.proxy_port}",
                    f"cert = {self.ca.cert}",
                    f"key = {self.ca.key}",
                    "",
                ]
            )
        )
        log = self.root / "stunnel.out"
        assert STUNNEL is not None
        with log.open("wb") as out:
            self._stunnel = subprocess.Popen(
                [STUNNEL, str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_listening(self.port, self._stunnel, "stunnel", log)
        return self

    def stop(self) -> None:
        """Stop stunnel and squid; remove squid's folder."""
        stop(self._stunnel)
        stop(self._squid)
        shutil.rmtree(self._squid_dir, ignore_errors=True)


@contextlib.contextmanager
def tunnel_host(
    root: Path, ca: LabCa, *, user: str, token: str, devices: Mapping[str, str]
) -> Iterator[TunnelHost]:
    """A started :class:`TunnelHost`, stopped afterwards."""
    host = TunnelHost(root, ca, user=user, token=token, devices=devices)
    try:
        yield host.start()
    finally:
        host.stop()


# -- network namespace -----------------------------------------------------------------------


def _enter_netns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path`` (setns(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    with Path(path).open("rb") as ns:
        if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")


def _in_netns(path: str, call: Callable[[], socket.socket]) -> socket.socket:
    """Run ``call`` in a thread that entered the network namespace at ``path``."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            _enter_netns(path)
            result.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class NetNs:
    """A network namespace with only loopback, held by a ``sleep`` we started."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec sleep 86400",
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != b"up":
            stop(self._holder)
            self._holder.stdout.close()
            pytest.fail("could not create a network namespace (unshare --net)")
        self.path = f"/proc/{self._holder.pid}/ns/net"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (nsenter execs it: its PID is the command's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def listen(self, port: int = 0) -> socket.socket:
        """A listening TCP socket on 127.0.0.1 inside the namespace."""
        return _in_netns(self.path, lambda: socket.create_server(("127.0.0.1", port)))

    def connect(self, port: int) -> socket.socket:
        """A TCP connection to 127.0.0.1:``port`` inside the namespace."""
        return _in_netns(self.path, lambda: socket.create_connection(("127.0.0.1", port), 10))

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one (the holder excluded)."""
        own = Path(self.path).stat().st_ino
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self._holder.pid:
                with contextlib.suppress(OSError):
                    if (entry / "ns" / "net").stat().st_ino == own:
                        found.append(int(entry.name))
        return found

    def close(self) -> None:
        """Kill what still runs in the namespace (all started by the test), then the holder."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop(self._holder)
        if self._holder.stdout is not None:
            self._holder.stdout.close()


class Relay:
    """Copies each connection accepted on ``listener`` to another socket.

    That is one to ``to`` (in the root namespace) or what ``connect`` opens (e.g.
    :meth:`NetNs.connect`).
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        to: tuple[str, int] | None = None,
        connect: Callable[[], socket.socket] | None = None,
    ) -> None:
        if (to is None) == (connect is None):
            raise ValueError("a relay needs exactly one of `to` and `connect`")
        self._listener = listener
        self._connect = connect or (lambda: socket.create_connection(to or ("", 0), 10))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        """The listening port."""
        port: int = self._listener.getsockname()[1]
        return port

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                upstream = self._connect()
            except OSError:
                return
            with upstream:
                back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
                back.start()
                _copy(client, upstream)
                back.join()

    def close(self) -> None:
        """Stop accepting (connections in flight end with their peers)."""
        self._closed = True
        self._listener.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
