"""``remediate demo`` as a real process: the whole job on a lab device, and nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import REMEDIATE, ROOT, remediate_env
from tests.support.lab import lab_skip_reason
from tests.support.processes import processes_mentioning

pytestmark = [pytest.mark.integration]

STAGES = [
    "Bring up a lab device",
    "Inject a fault",
    "Plan (a dry-run",
    "Apply the plan",
    "History",
    "Audit log",
    "Tear down the device",
]
SLOT_DIR = Path("/run/remediate-lab")
_UP = re.compile(r"dev1 up at 127\.77\.(\d+)\.1:22222")


def _demo(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """``remediate demo ARGS`` in a session of its own, its temporary files under ``tmp_path``.

    The user's state dir (``REMEDIATE_STATE_DIR``) is ``tmp_path/user-state``: the demo must
    not write there.
    """
    env = {
        **remediate_env(tmp_path / "user-state"),
        "TMPDIR": str(tmp_path / "tmp"),
        "COLUMNS": "250",  # tables unwrapped, so the test reads whole ids
    }
    (tmp_path / "tmp").mkdir()
    return subprocess.Popen(
        [*prefix, *REMEDIATE, "demo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def lab_ready() -> None:
    """Skip unless the device lab can run here (root, the Debian packages)."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)


def _stages(output: str) -> list[str]:
    """The stage titles the demo announced, in order."""
    return [m.group(1) for m in re.finditer(r"^\[\d+/\d+\] (.*)$", output, re.M)]


def _leftovers(root: Path, output: str) -> list[str]:
    """What of a demo that ran under ``root`` is still there, found without the lab's code.

    Processes (a device's init, engine, sshd, and Ansible's ssh masters name the lab's key),
    mounts and loop devices under ``root``, files, the lab's address slot, and the slot's
    cgroups and sshd listeners: those only while no other lab has claimed the slot since.
    """
    found = [f"process {pid}" for pid in processes_mentioning(str(root))]
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount {line.split()[4]}" for line in mounts if str(root) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    found += [f"loop device {line}" for line in loops.splitlines() if str(root) in line]
    found += [f"file {path}" for path in (root / "tmp").rglob("*")]
    match = _UP.search(output)
    if match is None:
        return found
    slot = int(match.group(1))
    claim = SLOT_DIR / f"slot-{slot}"

    def owner() -> str:
        try:
            return claim.read_text().strip()
        except FileNotFoundError:
            return ""

    before = owner()
    if before.startswith(str(root)):
        found.append(f"slot file {claim}")
    slot_found = [f"cgroup {path}" for path in _cgroups(f"lab{slot}-dev")]
    slot_found += [f"listener {ip}:22222" for ip in _sockets(f"127.77.{slot}.", local=True)]
    slot_found += [f"connection to {ip}:22222" for ip in _sockets(f"127.77.{slot}.", local=False)]
    if not before and not owner():  # no other lab took the slot meanwhile
        found += slot_found
    return found


def _cgroups(prefix: str) -> Iterator[Path]:
    base = Path("/sys/fs/cgroup")
    for top, dirs, _ in os.walk(base):
        if len(Path(top).relative_to(base).parts) >= 3:
            dirs.clear()
        for name in dirs:
            if name.startswith(prefix):
                yield Path(top) / name


def _sockets(prefix: str, *, local: bool) -> list[str]:
    """Addresses under ``prefix``, port 22222: listened on (``local``) or connected to.

    A connection left open to a device (Ansible's persistent SSH master) counts as left behind.
    """
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ip_hex, port_hex = fields[1 if local else 2].split(":")
        ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
        state = "0A" if local else "01"  # LISTEN, ESTABLISHED
        if fields[3] == state and int(port_hex, 16) == 22222 and ip.startswith(prefix):
            found.append(ip)
    return found


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo did not end within {timeout} s:\n{out}")
    return out


@pytest.mark.lab
@pytest.mark.usefixtures("lab_ready")
def test_demo_fixes_a_full_data_partition_and_leaves_nothing(tmp_path: Path) -> None:
    """The demo announces every stage, plans the exact image, fixes, verifies, audits, cleans up."""
    proc = _demo(tmp_path)
    output = _finish(proc)
    assert proc.returncode == 0, output
    titles = _stages(output)
    assert len(titles) == len(STAGES), output
    assert all(t.startswith(s) for t, s in zip(titles, STAGES, strict=True)), titles
    image = re.search(r"with dangling-image \((sha256:[0-9a-f]{64})\)", output)
    assert image is not None, output
    plan = output[output.index("$ remediate plan data-partition-full") :]
    plan = plan[: plan.index("$ remediate run data-partition-full")]
    assert "prune_dangling [destructive]: remove 1 dangling images" in plan, plan
    assert image.group(1) in plan  # the exact item, before anything changed
    applied = output[output.index("$ remediate run data-partition-full") :]
    assert re.search(r"dev1 +│ fixed +│ prune_dangling: ok \(changed\).*│ verify holds", applied)
    assert re.search(r"/mnt/data 9\d% used before, \d% now", applied), applied
    assert "chain intact" in output
    assert "nothing left behind" in output
    assert _leftovers(tmp_path, output) == []
    assert not (tmp_path / "user-state").exists()  # the user's state dir got no demo runs


@pytest.mark.lab
@pytest.mark.usefixtures("lab_ready")
@pytest.mark.parametrize(
    ("stage", "signum", "to_group", "code", "said"),
    [
        # Ctrl-C: the terminal signals the whole foreground process group, mid-apply; the
        # command stops as it would alone (its run recorded interrupted).
        ("$ remediate run data-partition-full", signal.SIGINT, True, 130, "interrupted"),
        # SIGTERM to the process alone while the device starts: held until it is up.
        (
            "[1/7] Bring up a lab device",
            signal.SIGTERM,
            False,
            143,
            "demo: SIGTERM: stopping once the device is up; then it is torn down",
        ),
    ],
    ids=["ctrl-c-while-applying", "sigterm-while-starting"],
)
def test_a_stopped_demo_tears_down_and_leaves_nothing(
    tmp_path: Path, stage: str, signum: signal.Signals, to_group: bool, code: int, said: str
) -> None:
    """Stopped by a signal at any stage, the demo tears the device down and exits 128+signal."""
    proc = _demo(tmp_path)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(stage):
            time.sleep(0.5)  # well into the stage (a device takes seconds to start)
            (os.killpg if to_group else os.kill)(proc.pid, signum)
            break
    output = "".join(seen) + _finish(proc)
    assert proc.returncode == code, output
    assert said in output
    assert "dev1 up at" in output
    assert _stages(output)[-1] == "Tear down the device", output
    assert f"demo stopped (exit {code}); the device is gone" in output
    assert "nothing left behind" in output
    assert "chain intact" not in output  # nothing after the stop ran
    assert _leftovers(tmp_path, output) == []
    assert not (tmp_path / "user-state").exists()


def test_demo_without_root_says_why_and_shows_the_localhost_dry_run(tmp_path: Path) -> None:
    """Without root the demo says why in one line, then runs the localhost dry-run (exit 0)."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # a user namespace: the same files, but not root
        probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot drop root with unshare --user: {probe.stderr!r}")
        prefix = ("unshare", "--user")
    proc = _demo(tmp_path, prefix=prefix)
    output = _finish(proc, timeout=120)
    assert proc.returncode == 0, output
    first, command = output.splitlines()[:2]
    assert first.startswith("demo: cannot bring up a lab device: the device lab needs root")
    assert first.endswith("; showing the localhost dry-run instead")
    assert command == "$ remediate plan stale-probe-scratch -i inventories/localhost.yml"
    assert re.search(r"localhost +│ healthy", output), output
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "user-state").exists()
