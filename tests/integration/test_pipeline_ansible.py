"""The whole pipeline through the real CLI, real ansible-runner, local connection and real sshd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import REMEDIATE, remediate_env, run_remediate
from tests.support.processes import processes_mentioning
from tests.support.sshd import SshServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NO_PYTHON = "/nonexistent/python3"

MARKER_RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {name: marker, title: Create a marker file slowly}
targets: {hosts: all}
params:
  marker: {type: str, default: /nonexistent}
checks:
  - {id: exists, run: 'test -e "$param_marker" && echo true || echo false', parse: bool}
symptom: "not checks.exists"
steps:
  - id: create
    playbook: create-marker.yml
    plan: "create {{ params.marker }}"
    vars: {marker: "{{ params.marker }}"}
verify: "checks.exists"
policy: {serial: 1, max_fail_pct: 0, max_hosts_pct: 100, approval: never}
"""

MARKER_PLAYBOOK = """\
- name: Create the marker after a pause, logging every act
  hosts: all
  gather_facts: false
  tasks:
    - name: Pause, log and create
      ansible.builtin.raw: >-
        sleep 4; echo acted >> {{ (marker ~ '.log') | quote }}; touch {{ marker | quote }}
"""


def _cli(args: list[str], state_dir: Path, *, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return run_remediate(args, state_dir, cwd=cwd, timeout=300)


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "runbooks").mkdir(parents=True)
    (project / "playbooks").mkdir()
    (project / "runbooks" / "marker.yml").write_text(MARKER_RUNBOOK)
    (project / "playbooks" / "create-marker.yml").write_text(MARKER_PLAYBOOK)
    return project


def _apply_marker(inventory: Path, marker: Path) -> list[str]:
    """``run marker --apply -o json`` arguments for one inventory and marker path."""
    return [
        "run",
        "marker",
        "-i",
        str(inventory),
        "-e",
        f"marker={marker}",
        "--apply",
        "-o",
        "json",
    ]


def _local_inventory(path: Path, hosts: list[str]) -> Path:
    lines = ["[all]"]
    lines += [f"{h} ansible_connection=local ansible_python_interpreter={NO_PYTHON}" for h in hosts]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundled_runbook_plans_and_applies_on_localhost(tmp_path: Path) -> None:
    """stale-probe-scratch: plan lists the stale folder, apply removes it, verify holds."""
    stale = Path("/tmp/.remediate-probe.T3stAa")
    stale.mkdir(exist_ok=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    state = tmp_path / "state"
    inventory = str(ROOT / "inventories" / "localhost.yml")
    try:
        plan = _cli(["plan", "stale-probe-scratch", "-i", inventory, "-o", "json"], state)
        assert plan.returncode == 0, plan.stderr
        (host,) = json.loads(plan.stdout)["plan"]["hosts"]
        assert host["outcome"] == "planned"
        assert str(stale) in host["steps"][0]["items"]
        assert stale.exists()  # the dry run changed nothing

        run = _cli(["run", "stale-probe-scratch", "-i", inventory, "--apply", "-o", "json"], state)
        assert run.returncode == 0, run.stderr
        (result,) = json.loads(run.stdout)["hosts"]
        assert result["outcome"] == "fixed"
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()
    history = _cli(["history", "-o", "json"], state)
    assert [r["mode"] for r in json.loads(history.stdout)] == ["apply", "dry-run"]
    verify = _cli(["audit", "verify"], state)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_apply_over_real_sshd_with_raw_only(tmp_path: Path, sshd: SshServer) -> None:
    """A host reached over SSH on loopback is planned, acted on and verified with raw tasks."""
    project = _project(tmp_path)
    marker = tmp_path / "over-ssh"
    inventory = tmp_path / "ssh.ini"
    inventory.write_text(
        "[all]\n"
        f"dev1 ansible_host={sshd.host} ansible_port={sshd.port} ansible_user={sshd.user} "
        f"ansible_ssh_private_key_file={sshd.key} ansible_python_interpreter={NO_PYTHON} "
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n"
    )
    state = tmp_path / "state"
    args = _apply_marker(inventory, marker)
    run = _cli(args, state, cwd=project)
    assert run.returncode == 0, run.stdout + run.stderr
    (host,) = json.loads(run.stdout)["hosts"]
    assert host["outcome"] == "fixed"
    assert marker.exists()
    assert (tmp_path / "over-ssh.log").read_text() == "acted\n"


def test_two_concurrent_runs_on_one_device_act_once(tmp_path: Path) -> None:
    """Two apply runs started together on one device: one acts, the lock denies the other."""
    project = _project(tmp_path)
    marker = tmp_path / "concurrent"
    inventory = _local_inventory(tmp_path / "one.ini", ["dev1"])
    state = tmp_path / "state"
    args = _apply_marker(inventory, marker)
    procs = [
        subprocess.Popen(
            [*REMEDIATE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=project,
            env=remediate_env(state),
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    reports = [json.loads(out) for out, _ in outputs]
    outcomes = sorted(r["hosts"][0]["outcome"] for r in reports)
    assert outcomes == ["fixed", "skipped"], outputs
    skipped = next(r["hosts"][0] for r in reports if r["hosts"][0]["outcome"] == "skipped")
    assert "lock" in skipped["reason"]
    assert (tmp_path / "concurrent.log").read_text() == "acted\n"


@pytest.mark.parametrize(
    ("signum", "signals", "code", "word"),
    [
        (signal.SIGTERM, 1, 143, "terminated"),
        (signal.SIGTERM, 2, 143, "terminated"),
        (signal.SIGINT, 1, 130, "interrupted"),
    ],
    ids=["sigterm", "sigterm-twice", "sigint"],
)
def test_signal_mid_apply_records_the_run_interrupted(
    tmp_path: Path, signum: signal.Signals, signals: int, code: int, word: str
) -> None:
    """Signalled mid-step: run interrupted; the step ends in the grace, unless signalled twice."""
    project = _project(tmp_path)
    marker = tmp_path / "terminated"
    inventory = _local_inventory(tmp_path / "one.ini", ["dev1"])
    state = tmp_path / "state"
    with subprocess.Popen(
        [*REMEDIATE, *_apply_marker(inventory, marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=project,
        env=remediate_env(state),
    ) as proc:
        try:
            out, err = _signal_mid_step(proc, f"{marker}.log", signum, signals)
        finally:
            if proc.poll() is None:  # a failed assertion: nothing outlives the test
                proc.kill()
    assert proc.returncode == code, out + err
    assert err.rstrip().endswith(word)
    runs = json.loads(_cli(["history", "-o", "json"], state).stdout)
    assert [r["status"] for r in runs] == ["interrupted"]
    # Once: the command in flight was not cut short.  Twice: it was killed before its end.
    assert marker.exists() is (signals == 1)
    assert _cli(["audit", "verify"], state).returncode == 0
    assert processes_mentioning(str(tmp_path)) == []


def _signal_mid_step(
    proc: subprocess.Popen[str], in_flight: str, signum: signal.Signals, signals: int
) -> tuple[str, str]:
    """Once a process runs ``in_flight``, signal ``proc`` (again once it said it stops Ansible)."""
    deadline = time.monotonic() + 120
    while not processes_mentioning(in_flight):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.stderr is not None
    said = ""
    while "signal again" not in said:  # the first signal is handled: Ansible is stopped
        line = proc.stderr.readline()
        assert line, f"no word of stopping: {said}"
        said += line
    if signals == 2:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return out, said + err


def test_editing_one_byte_of_the_audit_log_is_detected(tmp_path: Path) -> None:
    """`remediate audit verify` fails at the line whose byte was changed."""
    project = _project(tmp_path)
    inventory = _local_inventory(tmp_path / "one.ini", ["dev1"])
    state = tmp_path / "state"
    plan = _cli(
        ["plan", "marker", "-i", str(inventory), "-e", f"marker={tmp_path / 'm'}"],
        state,
        cwd=project,
    )
    assert plan.returncode == 0, plan.stderr
    audit = state / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 5
    target = 3  # 1-based line to tamper with
    edited = lines[target - 1].replace(b'"info"', b'"infO"', 1)
    assert edited != lines[target - 1]
    audit.write_bytes(b"".join([*lines[: target - 1], edited, *lines[target:]]))
    verify = _cli(["audit", "verify", "-o", "json"], state)
    assert verify.returncode == 1
    report = json.loads(verify.stdout)
    assert report["ok"] is False
    assert report["first_bad_line"] == target


def test_unknown_inventory_and_empty_selection_exit_2(tmp_path: Path) -> None:
    """A missing inventory or a limit that selects nothing is an input error (exit 2)."""
    state = tmp_path / "state"
    missing = _cli(["plan", "stale-probe-scratch", "-i", str(tmp_path / "nope.ini")], state)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    inventory = _local_inventory(tmp_path / "one.ini", ["dev1"])
    empty = _cli(["plan", "stale-probe-scratch", "-i", str(inventory), "--limit", "other"], state)
    assert empty.returncode == 2
    assert "selects no host" in empty.stderr


def test_saved_plan_applies_as_reviewed_and_refuses_drift(tmp_path: Path) -> None:
    """A plan saved with --out applies as reviewed; a device changed after review is refused."""
    stale = Path("/tmp/.remediate-probe.RevW01")
    extra = Path("/tmp/.remediate-probe.RevW02")
    old = time.time() - 7200
    state = tmp_path / "state"
    inventory = str(ROOT / "inventories" / "localhost.yml")
    plan_file = tmp_path / "plan.json"
    try:
        stale.mkdir(exist_ok=True)
        os.utime(stale, (old, old))
        made = _cli(
            ["plan", "stale-probe-scratch", "-i", inventory, "--out", str(plan_file)], state
        )
        assert made.returncode == 0, made.stderr
        extra.mkdir(exist_ok=True)  # the device changes after the review
        os.utime(extra, (old, old))
        drifted = _cli(["apply", str(plan_file), "-o", "json"], state)
        assert drifted.returncode == 1
        (host,) = json.loads(drifted.stdout)["hosts"]
        assert host["outcome"] == "drifted"
        assert str(extra) in host["reason"]
        assert stale.exists()
        assert extra.exists()
        extra.rmdir()  # back to the reviewed state
        applied = _cli(["apply", str(plan_file), "-o", "json"], state)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        (host,) = json.loads(applied.stdout)["hosts"]
        assert host["outcome"] == "fixed"
        assert not stale.exists()
    finally:
        for path in (stale, extra):
            if path.exists():
                path.rmdir()
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    digest = json.loads(plan_file.read_text())["digest"]
    assert any(r["event"] == "run.started" and r.get("plan_digest") == digest for r in audit)
    edited = tmp_path / "edited.json"
    edited.write_text(plan_file.read_text().replace("RevW01", "RevW09"))
    refused = _cli(["apply", str(edited)], state)
    assert refused.returncode == 2
    assert "digest mismatch" in refused.stderr


def test_store_that_cannot_open_stops_the_probe_started_ahead(tmp_path: Path) -> None:
    """A probe started before the store opens is stopped when the store cannot open."""
    state = tmp_path / "state"
    (state / "state.db").mkdir(parents=True)  # sqlite cannot open a folder
    inventory = _local_inventory(tmp_path / "hosts.ini", ["dev1", "dev2"])
    failed = _cli(["plan", "stale-probe-scratch", "-i", str(inventory)], state)
    assert failed.returncode == 3, failed.stderr
    assert "state store" in failed.stderr
    assert list((state / "work").iterdir()) == []
    assert not (state / "audit.jsonl").exists() or (state / "audit.jsonl").stat().st_size == 0
    still_running = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(state) in (proc / "cmdline").read_text(errors="replace"):
                still_running.append(proc.name)
        except OSError:
            continue
    assert still_running == []
