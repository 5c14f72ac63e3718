"""remediate-tunnel as OpenSSH's ProxyCommand through a real TLS CONNECT tunnel.

The tunnel host is stunnel in front of squid (basic auth, ``<uuid>.balena`` from a private
hosts file) on loopback; the device is the test sshd.  Every ssh here is plain OpenSSH.
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.sshd import SshServer
from tests.support.tunnel import LabCa, TunnelHost, tunnel_host, tunnel_skip_reason

pytestmark = pytest.mark.integration

TOKEN = "t0k3n-f0r-the-tunnel-0123456789abcdef"  # noqa: S105 - a test credential
USER = "gh_fleetops"
WRONG = "wrong-token"
DEVICE = "0123456789abcdef0123456789abcdef"
NOWHERE = "fedcba9876543210fedcba9876543210"  # the proxy knows it; nothing listens there
HELPER = Path(sys.executable).with_name("remediate-tunnel")


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelHost]:
    """The tunnel host, routing DEVICE to 127.0.0.1 (the test sshd) and NOWHERE to 127.0.0.9."""
    reason = tunnel_skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tunnel")
    ca = LabCa.make(root / "ca")
    devices = {DEVICE: "127.0.0.1", NOWHERE: "127.0.0.9"}
    with tunnel_host(root, ca, user=USER, token=TOKEN, devices=devices) as host:
        yield host


@pytest.fixture
def control_dir() -> Iterator[Path]:
    """A short folder for ssh's ControlPath (a Unix socket path has at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def persisting(control_dir: Path) -> tuple[str, ...]:
    """The ssh options of a ControlPersist master kept in ``control_dir``."""
    return ("-o", "ControlMaster=auto", "-o", "ControlPersist=30s",
            "-o", f"ControlPath={control_dir}/%C")  # fmt: skip


def proxy_command(tunnel: TunnelHost, *extra: str, ca: bool = True) -> str:
    args = [
        str(HELPER),
        "--tunnel-host",
        f"localhost:{tunnel.port}",
        "--user",
        USER,
        *(["--ca-file", str(tunnel.ca.ca)] if ca else []),
        *extra,
    ]
    return shlex.join(args) + " %h %p"


def ssh(
    tunnel: TunnelHost,
    sshd: SshServer,
    command: str,
    *,
    uuid: str = DEVICE,
    proxy: str | None = None,
    options: tuple[str, ...] = (),
) -> list[str]:
    return [
        "ssh",
        "-i",
        str(sshd.key),
        "-p",
        str(sshd.port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"ProxyCommand={proxy or proxy_command(tunnel)}",
        *options,
        f"{sshd.user}@{uuid}.balena",
        command,
    ]


def run(argv: list[str], token: str = TOKEN, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BALENA_API_KEY": token}
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, env=env, capture_output=True, text=True, timeout=60, check=False, **kwargs
    )


def test_ssh_through_the_tunnel_keeps_output_and_exit_codes(
    tunnel: TunnelHost, sshd: SshServer
) -> None:
    """Plain OpenSSH over the helper runs the command and hands back its real exit code."""
    done = run(ssh(tunnel, sshd, "echo hello from the device; echo oops >&2; exit 3"))
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello from the device\n"
    assert "oops" in done.stderr


def test_token_is_in_no_process_argument_while_a_tunnel_is_open(
    tunnel: TunnelHost, sshd: SshServer
) -> None:
    """While a tunnel is open, no process's command line holds the token or its Basic form."""
    basic = base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    env = {**os.environ, "BALENA_API_KEY": TOKEN}
    with subprocess.Popen(
        ssh(tunnel, sshd, "echo open; sleep 3"), env=env, stdout=subprocess.PIPE, text=True
    ) as session:
        assert session.stdout is not None
        assert session.stdout.readline() == "open\n"  # the tunnel carries the session now
        lines = []
        for process in psutil.process_iter(["pid", "cmdline", "name"]):
            lines.append(" ".join(process.info["cmdline"] or ()))
            lines.append(process.info["name"] or "")
        helpers = [line for line in lines if "remediate-tunnel" in line]
        assert helpers, "the helper should be running while the session is open"
        assert all("--token-env" not in h or "BALENA_API_KEY" in h for h in helpers)
        assert not [line for line in lines if TOKEN in line or basic in line]
        assert session.wait(timeout=30) == 0


@pytest.mark.parametrize("persist", [False, True], ids=["plain", "control-persist"])
def test_failures_reach_ssh_as_one_line(
    tunnel: TunnelHost, sshd: SshServer, control_dir: Path, persist: bool
) -> None:
    """Each failure ends ssh with 255 and one line naming the device and the reason.

    With ControlPersist, OpenSSH sends the ProxyCommand's stderr to /dev/null; the reason
    still arrives (the helper tells ssh in the SSH protocol).
    """
    options = persisting(control_dir) if persist else ()
    cases = [
        (
            run(ssh(tunnel, sshd, "true", options=options), token=WRONG),
            DEVICE,
            f"refused CONNECT {DEVICE}.balena:{sshd.port}: 407 Proxy Authentication Required",
        ),
        (
            run(ssh(tunnel, sshd, "true", uuid=NOWHERE, options=options)),
            NOWHERE,
            f"refused CONNECT {NOWHERE}.balena:{sshd.port}: 503 Service Unavailable",
        ),
        (
            run(ssh(tunnel, sshd, "true", proxy=proxy_command(tunnel, ca=False), options=options)),
            DEVICE,
            "TLS certificate not trusted: unable to get local issuer certificate",
        ),
    ]
    for done, uuid, reason in cases:
        assert done.returncode == 255
        lines = [line for line in done.stderr.splitlines() if "remediate-tunnel" in line]
        assert len(lines) == 1, done.stderr
        assert f"remediate-tunnel: {uuid}.balena: tunnel host localhost:{tunnel.port}" in lines[0]
        assert reason in lines[0], lines[0]
        assert TOKEN not in done.stderr


def test_a_missing_token_and_a_closed_tunnel_host_are_named(
    tunnel: TunnelHost, sshd: SshServer
) -> None:
    """No token in the environment, or nothing listening at the tunnel host, is one clear line."""
    no_token = run(ssh(tunnel, sshd, "true"), token="")
    assert no_token.returncode == 255
    assert "$BALENA_API_KEY is not set" in no_token.stderr
    closed = proxy_command(tunnel).replace(f"localhost:{tunnel.port}", "localhost:9")
    refused = run(ssh(tunnel, sshd, "true", proxy=closed))
    assert refused.returncode == 255
    assert "tunnel host localhost:9: cannot connect: Connection refused" in refused.stderr


def test_a_silent_tunnel_host_or_device_ends_in_the_timeout(
    tunnel: TunnelHost, sshd: SshServer
) -> None:
    """A tunnel host that never answers TLS, or a device that never sends a banner, is named."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never speaks
        port = silent.getsockname()[1]
        quick = proxy_command(tunnel, "--timeout", "1")
        host = quick.replace(f"localhost:{tunnel.port}", f"localhost:{port}")
        no_tls = run(ssh(tunnel, sshd, "true", proxy=host))
        assert no_tls.returncode == 255
        assert f"tunnel host localhost:{port}: no TLS answer within 1 s" in no_tls.stderr
        argv = ssh(tunnel, sshd, "true", proxy=quick)
        argv[argv.index("-p") + 1] = str(port)  # the proxy reaches it; it never sends a banner
        no_banner = run(argv)
        assert no_banner.returncode == 255
        assert f"{DEVICE}.balena: no SSH answer from the device within 1 s" in no_banner.stderr


def test_control_persist_shares_one_tunnel(
    tunnel: TunnelHost, sshd: SshServer, control_dir: Path
) -> None:
    """With ControlPersist, later sessions go through the master's one tunnel."""
    control = persisting(control_dir)
    try:
        first = run(ssh(tunnel, sshd, "echo one", options=control))
        assert (first.returncode, first.stdout) == (0, "one\n"), first.stderr
        helpers = _helpers()
        assert len(helpers) == 1  # the master's tunnel stays open
        second = run(ssh(tunnel, sshd, "echo two; exit 4", options=control))
        assert (second.returncode, second.stdout) == (4, "two\n")
        assert _helpers() == helpers  # no second tunnel
    finally:
        run(ssh(tunnel, sshd, "", options=(*control, "-O", "exit")))


def _helpers() -> list[int]:
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any("remediate-tunnel" in part for part in p.info["cmdline"] or ())
        and p.info["pid"] != os.getpid()
    ]


def test_no_more_than_max_tunnels_are_open_at_once(
    tunnel: TunnelHost, sshd: SshServer, tmp_path: Path
) -> None:
    """Five sessions with max_tunnels 2: all succeed, never more than two at a time."""
    log = tmp_path / "sessions.log"
    proxy = proxy_command(tunnel, "--max-tunnels", "2", "--slots-dir", str(tmp_path / "slots"))
    command = f"echo start $(date +%s.%N) >> {log}; sleep 2; echo end $(date +%s.%N) >> {log}"
    env = {**os.environ, "BALENA_API_KEY": TOKEN}
    sessions = [
        subprocess.Popen(ssh(tunnel, sshd, command, proxy=proxy), env=env) for _ in range(5)
    ]
    assert [s.wait(timeout=60) for s in sessions] == [0] * 5
    events = sorted(
        (float(stamp), 1 if kind == "start" else -1)
        for kind, stamp in (line.split() for line in log.read_text().splitlines())
    )
    open_now, most = 0, 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    assert most == 2
    assert len(events) == 10


def test_helper_refuses_a_host_that_is_not_a_device(tmp_path: Path) -> None:
    """A host that is not <uuid>.balena never reaches the tunnel host (no CONNECT line is built)."""
    for host in ("evil.example.com", f"{DEVICE}.balena\r\nX-Injected: 1", DEVICE[:31]):
        done = subprocess.run(
            [str(HELPER), "--user", USER, "--slots-dir", str(tmp_path), host, "22222"],
            env={**os.environ, "BALENA_API_KEY": TOKEN},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 255
        assert b"not a balena device" in done.stdout  # told to ssh in the SSH protocol
        assert done.stdout.startswith(b"SSH-2.0-remediate_tunnel\r\n")
