"""``remediate-tunnel``: an SSH ``ProxyCommand`` reaching a balena device through balena's tunnel.

What ``balena device tunnel`` does (balena-cli ``src/utils/tunnel.ts``), as a ProxyCommand, so
that plain OpenSSH (its exit codes, ``ControlMaster``/``ControlPersist``, ``scp``) runs on top::

    ssh -o ProxyCommand='remediate-tunnel --user NAME %h %p' -p 22222 root@<uuid>.balena

1. TLS to the tunnel host (balenaCloud: ``tunnel.balena-cloud.com:443``; openBalena:
   ``tunnel.<domain>:443``), with SNI and certificate checks (``--ca-file`` for a private CA);
2. ``CONNECT <uuid>.balena:<port> HTTP/1.0`` with ``Proxy-Authorization: Basic
   base64(<user>:<token>)``;
3. on ``200`` the TLS stream is a byte pipe to the device's sshd: stdin and stdout are copied
   to and from it until either side ends.

The token is read from an environment variable (``--token-env``, default ``BALENA_API_KEY``),
never from the command line, and is written nowhere but into the TLS stream.

**Bounded tunnels.**  At most ``--max-tunnels`` helpers for one tunnel host and user hold a
tunnel open at once, across every ``ssh`` of every run of this user on this machine: a helper
takes one of N slot files (``flock``) before it connects and holds it until its tunnel closes;
the others wait for a free slot (up to ``--wait`` seconds).  A ``ControlPersist`` master keeps
its tunnel, and so its slot, until it exits.

**Failures** (no slot, the tunnel host unreachable, a TLS error, an answer other than ``200``,
no SSH banner from the device in time) end the helper with exit code 255 and one line naming
the device and the reason.  OpenSSH hands a ProxyCommand's stderr to ``/dev/null`` once
``ControlPersist`` is on, so the line is not written to stderr but told to ``ssh`` itself in
the SSH protocol: the helper answers as an SSH server that disconnects at once (an SSH
version line, then ``SSH_MSG_DISCONNECT`` carrying the line).  ``ssh`` prints it on its own
stderr (``Received disconnect from UNKNOWN port 65535:7: remediate-tunnel: ...``) and exits
255, so Ansible reports the host ``unreachable`` with the reason.  Run by hand (stdout a
terminal), the helper writes the line to stderr instead.

The helper runs once per SSH connection, so it imports only the standard library modules it
needs; nothing of the engine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import random
import re
import select
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TUNNEL_HOST = "tunnel.balena-cloud.com"
DEFAULT_TUNNEL_PORT = 443
DEFAULT_TOKEN_ENV = "BALENA_API_KEY"  # noqa: S105 - the variable's name, not a token
DEFAULT_MAX_TUNNELS = 10
DEFAULT_WAIT = 300.0
DEFAULT_TIMEOUT = 20.0
#: Exit status of a failed tunnel (what ssh itself uses for a failed connection).
EXIT_FAILED = 255
EXIT_USAGE = 2

_DEVICE = re.compile(r"(?P<uuid>[0-9a-f]{32}|[0-9a-f]{62})(?:\.balena)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")
_MAX_HEADER = 16 * 1024
_CHUNK = 64 * 1024
#: SSH_MSG_DISCONNECT and SSH2_DISCONNECT_SERVICE_NOT_AVAILABLE (RFC 4253 11.1).
_SSH_MSG_DISCONNECT = 1
_SSH_DISCONNECT_SERVICE_NOT_AVAILABLE = 7


class TunnelError(Exception):
    """The tunnel could not be opened; the message is the one line the user sees."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remediate-tunnel",
        description="SSH ProxyCommand: reach a balena device's sshd through balena's TLS tunnel "
        "(CONNECT <uuid>.balena:<port>). Use as -o ProxyCommand='remediate-tunnel --user NAME "
        "%%h %%p'. The token is read from the environment only.",
    )
    parser.add_argument("host", help="the device: <uuid>.balena or <uuid> (ssh's %%h)")
    parser.add_argument("port", type=int, help="the device port, 22222 for the host OS (%%p)")
    parser.add_argument(
        "--tunnel-host",
        default=f"{DEFAULT_TUNNEL_HOST}:{DEFAULT_TUNNEL_PORT}",
        help="tunnel host[:port] [%(default)s]; openBalena: tunnel.<your domain>",
    )
    parser.add_argument(
        "--user",
        required=True,
        help="the balena username the tunnel authenticates as (the API's whoami)",
    )
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        help="environment variable holding the API key or session token [%(default)s]",
    )
    parser.add_argument("--ca-file", help="CA bundle the tunnel host's certificate must chain to")
    parser.add_argument(
        "--max-tunnels",
        type=int,
        default=DEFAULT_MAX_TUNNELS,
        help="tunnels open at once for this tunnel host and user [%(default)s]",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        help="seconds to wait for a free tunnel slot [%(default)g]",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds for the tunnel host to answer, and for the device's SSH banner [%(default)g]",
    )
    parser.add_argument(
        "--slots-dir",
        help="folder of the slot lock files [$XDG_RUNTIME_DIR or the temp folder]/"
        "remediate-tunnels-<uid>/<tunnel host and user>",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    device = _DEVICE.fullmatch(args.host.lower())
    name = f"{device['uuid']}.balena" if device else args.host
    try:
        tunnel, slots = _configured(args, name if device else None)
        slot = _acquire_slot(slots, args.max_tunnels, args.wait)
        try:
            stream, early = tunnel.open()
            with contextlib.closing(stream):
                _pipe(stream, early)
        finally:
            os.close(slot)
    except TunnelError as exc:
        _report(f"remediate-tunnel: {name}: {exc}")
        return EXIT_FAILED
    return 0


def _configured(args: argparse.Namespace, device: str | None) -> tuple[_Tunnel, Path]:
    """The tunnel the arguments describe and the folder of its slots; TunnelError if invalid."""
    if device is None:
        raise TunnelError("not a balena device (expected <uuid>.balena, 32 or 62 hex digits)")
    host, port = _host_port(args.tunnel_host)
    if args.max_tunnels < 1:
        raise TunnelError(f"--max-tunnels must be at least 1, not {args.max_tunnels}")
    _positive(args.wait, "--wait", zero=True)
    tunnel = _Tunnel(
        device=device,
        device_port=_port(args.port, "device port"),
        tunnel_host=host,
        tunnel_port=port,
        user=_checked_user(args.user),
        token=_token(args.token_env),
        ca_file=args.ca_file,
        timeout=_positive(args.timeout, "--timeout"),
    )
    slots = Path(args.slots_dir) if args.slots_dir else _default_slots_dir(host, port, args.user)
    return tunnel, slots


# -- arguments ---------------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), DEFAULT_TUNNEL_PORT
    if not port.isdigit():
        raise TunnelError(f"--tunnel-host {text!r}: the port is not a number")
    return host.strip("[]"), _port(int(port), "tunnel port")


def _port(value: int, what: str) -> int:
    if not 0 < value < 65536:  # noqa: PLR2004 - the TCP port range
        raise TunnelError(f"{what} {value} is not a TCP port")
    return value


def _positive(value: float, what: str, *, zero: bool = False) -> float:
    if value < 0 or (value == 0 and not zero):
        raise TunnelError(f"{what} must be {'at least 0' if zero else 'positive'}, not {value:g}")
    return value


def _checked_user(user: str) -> str:
    if not _USER.fullmatch(user):
        raise TunnelError(f"--user {user!r} is not a plain balena username")
    return user


def _token(env_name: str) -> str:
    if not _ENV_NAME.fullmatch(env_name):
        raise TunnelError(f"--token-env {env_name!r} is not an environment variable name")
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise TunnelError(f"${env_name} is not set: export the balena API key or session token")
    if any(c in token for c in "\r\n\0"):
        raise TunnelError(f"${env_name} holds a line break or a NUL byte: not a token")
    return token


# -- tunnel slots ----------------------------------------------------------------------------------


def _default_slots_dir(host: str, port: int, user: str) -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    key = hashlib.sha256(f"{host}:{port}:{user}".encode()).hexdigest()[:16]
    return base / f"remediate-tunnels-{os.getuid()}" / key


def _private_dir(path: Path) -> None:
    """Create ``path`` (and its parent) for this user only; refuse one someone else owns."""
    for folder in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()
        if info.st_uid != os.getuid() or not folder.is_dir() or folder.is_symlink():
            raise TunnelError(f"slot folder {folder} is not a folder of this user")


def _acquire_slot(folder: Path, slots: int, wait: float) -> int:
    """Take one of ``slots`` lock files in ``folder``; its descriptor (closing it frees it)."""
    try:
        _private_dir(folder)
        files = [
            os.open(folder / f"slot-{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            for i in range(slots)
        ]
    except OSError as exc:
        raise TunnelError(f"cannot use the slot folder {folder}: {exc.strerror}") from exc
    deadline = time.monotonic() + wait
    delay = 0.005
    try:
        while True:
            for fd in random.sample(files, len(files)):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                files.remove(fd)
                return fd
            left = deadline - time.monotonic()
            if left <= 0:
                raise TunnelError(
                    f"no free tunnel slot within {wait:g} s ({slots} tunnels already open)"
                )
            time.sleep(min(left, delay * (1 + random.random())))  # noqa: S311 - jitter only
            delay = min(delay * 2, 0.2)
    finally:
        for fd in files:
            os.close(fd)


# -- the tunnel ----------------------------------------------------------------------------------


class _Tunnel:
    def __init__(
        self,
        *,
        device: str,
        device_port: int,
        tunnel_host: str,
        tunnel_port: int,
        user: str,
        token: str,
        ca_file: str | None,
        timeout: float,
    ) -> None:
        self.device, self.device_port = device, device_port
        self.host, self.port = tunnel_host, tunnel_port
        self._auth = base64.b64encode(f"{user}:{token}".encode()).decode("ascii")
        self._ca_file = ca_file
        self._timeout = timeout

    @property
    def _where(self) -> str:
        return f"tunnel host {self.host}:{self.port}"

    def open(self) -> tuple[ssl.SSLSocket, bytes]:
        """The TLS stream piped to the device, and device bytes already read (its banner)."""
        try:
            context = ssl.create_default_context(cafile=self._ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TunnelError(f"cannot read the CA file {self._ca_file}: {exc}") from exc
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self._timeout)
        except TimeoutError as exc:
            raise TunnelError(f"{self._where}: no connection within {self._timeout:g} s") from exc
        except OSError as exc:
            raise TunnelError(f"{self._where}: cannot connect: {_reason(exc)}") from exc
        try:
            stream = context.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise TunnelError(
                f"{self._where}: TLS certificate not trusted: {exc.verify_message}"
            ) from exc
        except TimeoutError as exc:
            raw.close()
            raise TunnelError(f"{self._where}: no TLS answer within {self._timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise TunnelError(f"{self._where}: TLS failed: {_reason(exc)}") from exc
        try:
            early = self._connect(stream)
        except BaseException:
            stream.close()
            raise
        return stream, early

    def _connect(self, stream: ssl.SSLSocket) -> bytes:
        target = f"{self.device}:{self.device_port}"
        request = (
            f"CONNECT {target} HTTP/1.0\r\nProxy-Authorization: Basic {self._auth}\r\n\r\n"
        ).encode("ascii")
        try:
            stream.sendall(request)
            answer = bytearray()
            while b"\r\n\r\n" not in answer:
                chunk = stream.recv(_CHUNK)
                if not chunk:
                    raise TunnelError(f"{self._where} closed the connection before answering")
                answer += chunk
                if len(answer) > _MAX_HEADER and b"\r\n\r\n" not in answer:
                    raise TunnelError(f"{self._where} answered with an endless header")
        except TimeoutError as exc:
            raise TunnelError(f"{self._where}: no answer within {self._timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise TunnelError(f"{self._where}: {_reason(exc)}") from exc
        header, _, early = bytes(answer).partition(b"\r\n\r\n")
        status = _STATUS.match(header)
        if status is None:
            raise TunnelError(f"{self._where} did not answer in HTTP: {_printable(header[:80])!r}")
        if status[1] != b"200":
            reason = _printable(status[2] or b"")
            raise TunnelError(
                f"{self._where} refused CONNECT {target}: {status[1].decode()} {reason}"
            )
        if not early and not _readable(stream, self._timeout):
            raise TunnelError(
                f"no SSH answer from the device within {self._timeout:g} s "
                "(offline, or its sshd does not run)"
            )
        return early


def _readable(stream: ssl.SSLSocket, timeout: float) -> bool:
    if stream.pending():
        return True
    ready, _, _ = select.select([stream], [], [], timeout)
    return bool(ready)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def _pipe(stream: ssl.SSLSocket, early: bytes) -> None:
    """Copy stdin to ``stream`` and ``stream`` to stdout until either side ends."""
    stream.setblocking(False)
    os.set_blocking(0, False)
    os.set_blocking(1, False)
    pipe = _Pipe(stream, early)
    while pipe.running:
        pipe.step()


#: What select() waits on here: stdin (0), stdout (1) or the TLS socket.
_Waitable = int | ssl.SSLSocket


class _Pipe:
    """The two directions of the byte pipe, each with its buffer (non-blocking, one thread)."""

    def __init__(self, stream: ssl.SSLSocket, early: bytes) -> None:
        self.stream = stream
        self.up = bytearray()  # ssh -> device
        self.down = bytearray(early)  # device -> ssh
        self.ssh_open = self.device_open = True
        self.broken = False

    @property
    def running(self) -> bool:
        """Whether there is still something to copy (an open side, or bytes for the other)."""
        return (
            not self.broken
            and (self.ssh_open or bool(self.up))
            and (self.device_open or bool(self.down))
        )

    def step(self) -> None:
        """Wait until a side is ready, then move what can be moved without blocking."""
        stream = self.stream
        if self.device_open and not self.down and stream.pending():
            readable: list[_Waitable] = [stream]  # TLS has decrypted bytes select cannot see
            writable: list[_Waitable] = []
        else:
            wait_read, wait_write = self._interest()
            readable, writable, _ = select.select(wait_read, wait_write, [])
        if 0 in readable:
            self._from_ssh()
        if stream in readable:
            self.device_open = _read_tls(stream, self.down)
        if 1 in writable and self.down:
            self._to_ssh()
        if stream in writable and self.up:
            self._to_device()

    def _interest(self) -> tuple[list[_Waitable], list[_Waitable]]:
        read: list[_Waitable] = []
        if self.ssh_open and len(self.up) < _CHUNK:
            read.append(0)
        if self.device_open and len(self.down) < _CHUNK:
            read.append(self.stream)
        write: list[_Waitable] = [1] if self.down else []
        if self.up:
            write.append(self.stream)
        return read, write

    def _from_ssh(self) -> None:
        try:
            data = os.read(0, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.up += data
        self.ssh_open = bool(data)

    def _to_ssh(self) -> None:
        try:
            del self.down[: os.write(1, self.down)]
        except BlockingIOError:
            pass
        except OSError:
            self.broken = True  # ssh went away

    def _to_device(self) -> None:
        try:
            del self.up[: self.stream.send(self.up)]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError:
            self.broken = True  # the device or the tunnel went away


def _read_tls(stream: ssl.SSLSocket, into: bytearray) -> bool:
    """Read what the TLS stream has into ``into``; whether it is still open."""
    while True:
        try:
            data = stream.recv(_CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except OSError:
            return False
        if not data:
            return False
        into += data
        if not stream.pending() or len(into) >= _CHUNK:
            return True


# -- failures ----------------------------------------------------------------------------------


def _report(line: str) -> None:
    """Tell the failure: on stderr when run by hand, else to ssh in the SSH protocol."""
    if os.isatty(1):
        sys.stderr.write(line + "\n")
        return
    _ssh_disconnect(line)


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def disconnect_packet(description: str) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 6) carrying ``SSH_MSG_DISCONNECT``."""
    payload = (
        bytes([_SSH_MSG_DISCONNECT])
        + struct.pack(">I", _SSH_DISCONNECT_SERVICE_NOT_AVAILABLE)
        + _ssh_string(description.encode("utf-8", "replace")[:1000])
        + _ssh_string(b"")
    )
    padding = 8 - (5 + len(payload)) % 8
    if padding < 4:  # noqa: PLR2004 - RFC 4253: at least four bytes of padding
        padding += 8
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


def _ssh_disconnect(line: str) -> None:
    """Answer ssh as a server that disconnects with ``line``; wait for ssh to hang up."""
    with contextlib.suppress(OSError):
        os.set_blocking(1, True)
        os.write(1, b"SSH-2.0-remediate_tunnel\r\n" + disconnect_packet(line))
        deadline = time.monotonic() + 10
        while (left := deadline - time.monotonic()) > 0:  # ssh reads it, then closes its end
            ready, _, _ = select.select([0], [], [], left)
            if ready and not os.read(0, _CHUNK):
                break


if __name__ == "__main__":
    sys.exit(main())
