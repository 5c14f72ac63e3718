"""AnsibleExecutor against real ansible-runner: local-connection hosts and a real sshd.

Every inventory sets ``ansible_python_interpreter: /nonexistent/python3``, so any task
that is not ``raw`` fails: the engine must never need Python on a device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import ansible_runner.runner
import pexpect
import pytest
import yaml

from engine.errors import ExecutorError, InventoryError
from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.executors.base import HostStatus, PlaybookRequest, Selection
from engine.targets import select_hosts
from tests.support.ports import free_port
from tests.support.processes import gone, processes_mentioning
from tests.support.sshd import SshServer

pytestmark = pytest.mark.integration

NO_PYTHON = {"ansible_python_interpreter": "/nonexistent/python3"}


def write_inventory(path: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    return path


def ssh_vars(server: SshServer, port: int | None = None) -> dict[str, Any]:
    return {
        "ansible_host": server.host,
        "ansible_port": port or server.port,
        "ansible_user": server.user,
        "ansible_ssh_private_key_file": str(server.key),
        "ansible_host_key_checking": False,
        "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        **NO_PYTHON,
    }


@pytest.fixture
def executor(tmp_path: Path) -> AnsibleExecutor:
    """An executor whose SSH connections do not outlive the call (no ControlPersist master)."""
    return AnsibleExecutor(
        AnsibleSettings(
            work_dir=tmp_path / "work", ssh_timeout=5, ssh_args=("-o", "ControlMaster=no")
        )
    )


@pytest.fixture(params=["local", "ssh"])
def inventory(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Hosts dev1 and dev2, over the local connection or over SSH to the test sshd."""
    if request.param == "local":
        host_vars: dict[str, Any] = {"ansible_connection": "local", **NO_PYTHON}
    else:
        host_vars = ssh_vars(request.getfixturevalue("sshd"))
    return write_inventory(tmp_path / "hosts.yml", {"dev1": host_vars, "dev2": host_vars})


@pytest.fixture
def ssh_inventory(tmp_path: Path, sshd: SshServer) -> Path:
    """Two hosts on the test sshd and one whose port is closed."""
    return write_inventory(
        tmp_path / "ssh.yml",
        {
            "dev1": ssh_vars(sshd),
            "dev2": ssh_vars(sshd),
            "dead": ssh_vars(sshd, port=free_port()),
        },
    )


def write_playbook(tmp_path: Path, tasks: list[dict[str, Any]], hosts: str = "all") -> Path:
    path = tmp_path / "playbooks" / "step.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump([{"hosts": hosts, "gather_facts": False, "tasks": tasks}]))
    return path


# -- run_script ------------------------------------------------------------------------


def test_script_stdout_and_rc_per_host(executor: AnsibleExecutor, inventory: Path) -> None:
    """Each host returns rc 0 and the script's stdout (no carriage returns) apart from stderr."""
    script = "printf 'a\\nb\\n'; echo warn >&2"
    results = executor.run_script(inventory, ["dev1", "dev2"], script, timeout=30)
    assert set(results) == {"dev1", "dev2"}
    for result in results.values():
        assert result.status is HostStatus.OK
        assert result.rc == 0
        assert result.stdout == "a\nb\n"
        assert result.stderr.strip() == "warn"


def test_script_is_not_templated(executor: AnsibleExecutor, inventory: Path) -> None:
    """Jinja in the script reaches the shell verbatim, e.g. docker --format strings."""
    script = "printf '%s\\n' '{{ 7*6 }}' \"{{ lookup('pipe','id') }}\" '{% raw %}x'"
    results = executor.run_script(inventory, ["dev1"], script, timeout=30)
    assert results["dev1"].stdout == "{{ 7*6 }}\n{{ lookup('pipe','id') }}\n{% raw %}x\n"


def test_script_quoting_reaches_the_shell_unchanged(
    executor: AnsibleExecutor, inventory: Path
) -> None:
    """Quoting Ansible's argument splitter rejects in free-form args passes verbatim."""
    results = executor.run_script(inventory, ["dev1"], """printf '%s' '"\\'""", timeout=30)
    assert results["dev1"].stdout == '"\\'


def test_nonzero_exit_is_failed_with_stdout(executor: AnsibleExecutor, inventory: Path) -> None:
    """A non-zero exit is a FAILED result that keeps rc and stdout."""
    results = executor.run_script(inventory, ["dev1"], "echo partial; exit 7", timeout=30)
    result = results["dev1"]
    assert (result.status, result.rc, result.stdout) == (HostStatus.FAILED, 7, "partial\n")
    assert result.message


def test_hung_host_times_out(executor: AnsibleExecutor, inventory: Path) -> None:
    """A script that does not finish within the timeout is a FAILED result, not a hang."""
    results = executor.run_script(inventory, ["dev1"], "sleep 5", timeout=1)
    assert results["dev1"].status is HostStatus.FAILED
    assert "timed out" in results["dev1"].message.lower()


def test_unreachable_host_among_reachable_ones(
    executor: AnsibleExecutor, ssh_inventory: Path
) -> None:
    """A host whose SSH port is closed is UNREACHABLE while the others succeed in one call."""
    results = executor.run_script(ssh_inventory, ["dev1", "dead", "dev2"], "echo up", timeout=30)
    assert results["dead"].status is HostStatus.UNREACHABLE
    assert "Connection refused" in results["dead"].message
    assert results["dev1"].stdout == results["dev2"].stdout == "up\n"


def test_unknown_host_key_is_unreachable_when_checking(
    executor: AnsibleExecutor, tmp_path: Path, sshd: SshServer
) -> None:
    """With host key checking on (ansible-runner turns it off), an unknown key is UNREACHABLE."""
    checked = {**ssh_vars(sshd), "ansible_host_key_checking": True}
    inventory = write_inventory(tmp_path / "checked.yml", {"dev1": checked})
    results = executor.run_script(inventory, ["dev1"], "echo up", timeout=30)
    assert results["dev1"].status is HostStatus.UNREACHABLE
    assert "Host key verification failed" in results["dev1"].message


def test_host_missing_from_inventory_is_failed(executor: AnsibleExecutor, inventory: Path) -> None:
    """A requested host that is not in the inventory still gets a FAILED result."""
    results = executor.run_script(inventory, ["dev1", "ghost"], "echo up", timeout=30)
    assert results["dev1"].status is HostStatus.OK
    assert results["ghost"].status is HostStatus.FAILED
    assert "ghost" in results["ghost"].message


def test_no_requested_host_in_inventory(executor: AnsibleExecutor, inventory: Path) -> None:
    """When no requested host is in the inventory, each is FAILED; nothing raises."""
    results = executor.run_script(inventory, ["ghost", "spook"], "echo up", timeout=30)
    assert set(results) == {"ghost", "spook"}
    assert {r.status for r in results.values()} == {HostStatus.FAILED}


def test_missing_inventory_is_an_executor_error(executor: AnsibleExecutor, tmp_path: Path) -> None:
    """An inventory path that does not exist raises ExecutorError naming it."""
    with pytest.raises(ExecutorError, match=r"nope\.yml: no such file"):
        executor.run_script(tmp_path / "nope.yml", ["dev1"], "true", timeout=5)


def test_only_the_named_hosts_run(executor: AnsibleExecutor, tmp_path: Path) -> None:
    """Host names are matched literally: never as globs, regexes or implicit localhost."""
    marks = tmp_path / "marks"
    marks.mkdir()
    local = {"ansible_connection": "local", **NO_PYTHON}
    inventory = write_inventory(
        tmp_path / "hosts.yml", dict.fromkeys(["dev1", "dev10", "dev1x", "devA1"], local)
    )
    playbook = write_playbook(tmp_path, [{"raw": f"touch {marks}/{{{{ inventory_hostname }}}}"}])
    requested = ("dev1", "dev.*", "dev?", "localhost")
    request = PlaybookRequest(playbook=playbook, hosts=requested)
    results = executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "artifacts")
    assert sorted(p.name for p in marks.iterdir()) == ["dev1"]
    assert [results[h].status for h in requested] == [HostStatus.OK] + [HostStatus.FAILED] * 3


# -- select_and_run_script -------------------------------------------------------------

FLEET = """\
[canary]
dev-a1 note='{{ 7*6 }}'

[main]
dev-b1
dev-b2

[fleet:children]
canary
main

[all:vars]
ansible_connection=local
ansible_python_interpreter=/nonexistent/python3
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    """Three local hosts in groups, with a templated-looking var and group_vars files."""
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "main.yml").write_text("engine_cli: balena-engine\n")
    path = tmp_path / "fleet.ini"
    path.write_text(FLEET)
    return path


def _marking(marks: Path) -> str:
    """A script that leaves a mark named after the host it ran on (from the raw task's env)."""
    marks.mkdir(exist_ok=True)
    return f'touch "{marks}/$(hostname)-$$"; echo ran'


def test_selection_probes_exactly_what_ansible_selects(
    executor: AnsibleExecutor, fleet: Path
) -> None:
    """The pattern and limit pick the hosts, in inventory order, with untemplated vars."""
    selection = Selection(inventory=fleet, pattern="fleet", limit="!dev-b1")
    result = executor.select_and_run_script(selection, "echo up", timeout=30)
    assert [h.name for h in result.hosts] == ["dev-a1", "dev-b2"]
    by_name = {h.name: h.vars for h in result.hosts}
    assert by_name["dev-a1"]["note"] == "{{ 7*6 }}"
    assert by_name["dev-b2"]["engine_cli"] == "balena-engine"
    assert set(result.results) == {"dev-a1", "dev-b2"}
    assert {r.stdout for r in result.results.values()} == {"up\n"}


@pytest.mark.parametrize(
    ("pattern", "limit"),
    [("all", None), ("canary:main", None), ("fleet:!canary", "dev-b*"), ("~dev-[ab]1", None)],
)
def test_selection_agrees_with_the_resolver(
    executor: AnsibleExecutor, fleet: Path, pattern: str, limit: str | None
) -> None:
    """The probe run selects the same hosts and vars as resolve_targets' child process."""
    selection = Selection(inventory=fleet, pattern=pattern, limit=limit)
    result = executor.select_and_run_script(selection, "true", timeout=30)
    assert result.hosts == select_hosts(fleet, pattern, limit)
    assert set(result.results) == {h.name for h in result.hosts}


def test_selection_is_the_inventory_the_probe_ran_on(
    executor: AnsibleExecutor, tmp_path: Path
) -> None:
    """A dynamic inventory that changes between reads: the selection is the one probed."""
    calls = tmp_path / "calls"
    script = tmp_path / "inventory.py"
    local = {"ansible_connection": "local", **NO_PYTHON}
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "calls.open('a').write('x')\n"
        "n = len(calls.read_text())\n"
        "hosts = ['dev1', 'dev2' if n == 1 else 'dev3']\n"
        f"hostvars = {{h: {local!r} for h in hosts}}\n"
        "print(json.dumps({'fleet': {'hosts': hosts}, '_meta': {'hostvars': hostvars}}))\n"
    )
    script.chmod(0o755)
    result = executor.select_and_run_script(
        Selection(inventory=script, pattern="fleet"), "echo up", timeout=30
    )
    assert calls.read_text() == "x"  # read once, by the run that probed
    assert [h.name for h in result.hosts] == ["dev1", "dev2"]
    assert {n: r.stdout for n, r in result.results.items()} == {"dev1": "up\n", "dev2": "up\n"}


def test_selection_never_runs_on_implicit_localhost(
    executor: AnsibleExecutor, fleet: Path, tmp_path: Path
) -> None:
    """``localhost`` absent from the inventory selects nothing and runs nothing."""
    marks = tmp_path / "marks"
    selection = Selection(inventory=fleet, pattern="localhost")
    result = executor.select_and_run_script(selection, _marking(marks), timeout=30)
    assert (result.hosts, result.results) == ((), {})
    assert list(marks.iterdir()) == []


def test_selection_limit_file_relative_to_the_working_directory(
    executor: AnsibleExecutor, fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``@file`` limit is read from the engine's working directory."""
    (tmp_path / "retry.txt").write_text("dev-b2\ndev-a1\n")
    monkeypatch.chdir(tmp_path)
    selection = Selection(inventory=fleet, pattern="all", limit="@retry.txt")
    result = executor.select_and_run_script(selection, "true", timeout=30)
    assert [h.name for h in result.hosts] == ["dev-a1", "dev-b2"]


def test_selection_runs_only_on_the_named_hosts(executor: AnsibleExecutor, tmp_path: Path) -> None:
    """``only`` keeps exact names (no glob, regex or comma splits); every selected host is told."""
    local = {"ansible_connection": "local", **NO_PYTHON}
    names = ["dev1", "dev10", "dev1x", "a,b", "c:d", "d"]
    inventory = write_inventory(tmp_path / "hosts.yml", dict.fromkeys(names, local))
    only = ("dev1", "a,b", "c:d", "dev.*", "ghost")
    selection = Selection(inventory=inventory, pattern="all", only=only)
    result = executor.select_and_run_script(selection, "echo up", timeout=30)
    assert sorted(h.name for h in result.hosts) == sorted(names)
    assert sorted(result.results) == ["a,b", "c:d", "dev1"]
    assert {r.status for r in result.results.values()} == {HostStatus.OK}


def test_selection_of_nothing_is_an_empty_result(executor: AnsibleExecutor, fleet: Path) -> None:
    """A pattern or a limit that matches no host is no hosts, not an error."""
    for pattern, limit in (("nosuch", None), ("canary", "main"), ("all", "nosuch")):
        selection = Selection(inventory=fleet, pattern=pattern, limit=limit)
        result = executor.select_and_run_script(selection, "true", timeout=30)
        assert (result.hosts, result.results) == ((), {})


def test_selection_from_an_unreadable_inventory_fails(
    executor: AnsibleExecutor, tmp_path: Path
) -> None:
    """An inventory Ansible cannot parse, or a missing limit file, is never an empty fleet."""
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unclosed\n")
    with pytest.raises(ExecutorError, match="ansible-playbook did not finish"):
        executor.select_and_run_script(Selection(inventory=bad, pattern="all"), "true", timeout=30)
    good = write_inventory(tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local"}})
    missing = Selection(inventory=good, pattern="all", limit=f"@{tmp_path / 'none.txt'}")
    with pytest.raises(ExecutorError, match="Unable to find limit file"):
        executor.select_and_run_script(missing, "true", timeout=30)
    with pytest.raises(InventoryError, match=r"nope\.yml: no such file"):
        executor.select_and_run_script(
            Selection(inventory=tmp_path / "nope.yml", pattern="all"), "true", timeout=30
        )


def test_selection_started_in_the_background_is_the_same_call(
    executor: AnsibleExecutor, fleet: Path
) -> None:
    """A started selection returns once ansible-playbook runs; its result is the same call's."""
    selection = Selection(inventory=fleet, pattern="fleet", limit="!dev-b1")
    pending = executor.start_select_and_run_script(selection, "echo up", timeout=30)
    result = pending.result()
    assert result == executor.select_and_run_script(selection, "echo up", timeout=30)
    assert {r.stdout for r in result.results.values()} == {"up\n"}
    with pytest.raises(InventoryError, match=r"nope\.yml: no such file"):
        executor.start_select_and_run_script(
            Selection(inventory=fleet.parent / "nope.yml", pattern="all"), "true", timeout=30
        ).result()


@contextmanager
def _slow_task(tmp_path: Path) -> Iterator[tuple[str, Callable[[], int]]]:
    """A script that records its pid and sleeps; the task is killed afterwards.

    A cancel kills the task with the rest of ansible-playbook's tree; if a test fails
    before that, the task is killed here.
    """
    pid_file = tmp_path / "pid"
    script = f'echo $$ >"{pid_file}.new"; mv "{pid_file}.new" "{pid_file}"; exec sleep 120'

    def task_pid() -> int:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            if time.monotonic() > deadline:
                raise AssertionError("the task never started")
            time.sleep(0.05)
        return int(pid_file.read_text())

    try:
        yield script, task_pid
    finally:
        with suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_cancelled_background_selection_leaves_nothing_running(tmp_path: Path) -> None:
    """Cancelling a started selection stops ansible-playbook; its files are gone."""
    work = tmp_path / "work"
    executor = AnsibleExecutor(AnsibleSettings(work_dir=work))
    inventory = write_inventory(
        tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local", **NO_PYTHON}}
    )
    with _slow_task(tmp_path) as (script, task_pid):
        pending = executor.start_select_and_run_script(
            Selection(inventory=inventory, pattern="all"), script, timeout=300
        )
        assert processes_mentioning(str(work)) != []  # ansible-playbook runs
        task = task_pid()
        pending.cancel()
        assert processes_mentioning(str(work)) == []  # its workers too (own sessions)
        assert gone(task)
        assert list(work.iterdir()) == []


def test_signal_stops_a_background_selection_then_reaches_the_caller(tmp_path: Path) -> None:
    """SIGINT while a started selection runs stops it; the caller gets KeyboardInterrupt after."""
    work = tmp_path / "work"
    executor = AnsibleExecutor(AnsibleSettings(work_dir=work))
    inventory = write_inventory(
        tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local", **NO_PYTHON}}
    )
    handler = signal.getsignal(signal.SIGINT)
    with _slow_task(tmp_path) as (script, task_pid):
        pending = executor.start_select_and_run_script(
            Selection(inventory=inventory, pattern="all"), script, timeout=300
        )
        task = task_pid()
        signal.raise_signal(signal.SIGINT)  # recorded, not raised here: the call is stopped
        with pytest.raises(KeyboardInterrupt):
            pending.result()
        assert signal.getsignal(signal.SIGINT) is handler
        assert processes_mentioning(str(work)) == []
        assert gone(task)
        assert list(work.iterdir()) == []


def test_ignored_signal_stays_ignored_by_a_background_selection(
    executor: AnsibleExecutor, fleet: Path
) -> None:
    """SIGINT ignored by the process (a shell's background job) neither stops nor reaches it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pending = executor.start_select_and_run_script(
            Selection(inventory=fleet, pattern="fleet"), "echo up", timeout=30
        )
        signal.raise_signal(signal.SIGINT)
        result = pending.result()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert {r.stdout for r in result.results.values()} == {"up\n"}


# -- run_playbook ----------------------------------------------------------------------


def test_extra_vars_are_not_templated(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """Extra vars holding Jinja (e.g. from an alert label) reach the device as literal text."""
    playbook = write_playbook(
        tmp_path,
        [
            {"name": "x", "raw": "printf %s {{ x | quote }}"},
            {"name": "nested", "raw": "printf %s {{ y.z[0] | quote }}"},
            {"name": "typed", "raw": "printf %s {{ (n + 1) | string | quote }}{{ flag }}"},
        ],
    )
    request = PlaybookRequest(
        playbook=playbook,
        hosts=("dev1",),
        extravars={
            "x": "{{ 7*6 }}",
            "y": {"z": ["{{ lookup('pipe','id') }}"]},
            "n": 41,
            "flag": True,
        },
    )
    results = executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "artifacts")
    result = results["dev1"]
    assert result.status is HostStatus.OK
    assert [t.stdout for t in result.tasks] == ["{{ 7*6 }}", "{{ lookup('pipe','id') }}", "42True"]


def test_module_task_fails_without_python(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """A non-raw module fails for want of Python; the tasks around it are reported."""
    playbook = write_playbook(
        tmp_path,
        [
            {"name": "before", "raw": "echo before"},
            {"name": "skipped", "raw": "echo never", "when": False},
            {"name": "ping", "ansible.builtin.ping": {}},
            {"name": "after", "raw": "echo after"},
        ],
    )
    request = PlaybookRequest(playbook=playbook, hosts=("dev1", "dev2"), label="step one")
    results = executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "artifacts")
    assert set(results) == {"dev1", "dev2"}
    for result in results.values():
        assert result.status is HostStatus.FAILED
        assert [(t.name, t.status) for t in result.tasks] == [
            ("before", HostStatus.OK),
            ("skipped", None),
            ("ping", HostStatus.FAILED),
        ]
        assert result.tasks[0].stdout.strip() == "before"
        assert result.tasks[0].changed
        assert "/nonexistent/python3" in result.tasks[2].message
        assert result.message.startswith("ping: ")


def test_artifacts_are_kept_per_label(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """Runner stdout and events stay under artifacts_dir/<label>/; a reused label gets a suffix."""
    playbook = write_playbook(tmp_path, [{"name": "hello", "raw": "echo hello"}])
    artifacts = tmp_path / "artifacts"
    request = PlaybookRequest(playbook=playbook, hosts=("dev1",), label="disk/prune")
    executor.run_playbook(inventory, request, artifacts_dir=artifacts)
    executor.run_playbook(inventory, request, artifacts_dir=artifacts)
    assert sorted(p.name for p in artifacts.iterdir()) == ["disk_prune", "disk_prune-2"]
    run = artifacts / "disk_prune"
    assert "hello" in (run / "stdout").read_text()
    events = [json.loads(p.read_text()) for p in (run / "job_events").glob("*.json")]
    assert any(e["event"] == "runner_on_ok" for e in events)
    assert "env" not in json.loads((run / "command").read_text())
    assert list((tmp_path / "work").iterdir()) == []


def test_unreachable_host_in_playbook(
    executor: AnsibleExecutor, ssh_inventory: Path, tmp_path: Path
) -> None:
    """An unreachable host is an UNREACHABLE result while the others run the playbook."""
    playbook = write_playbook(tmp_path, [{"name": "hello", "raw": "echo hello"}])
    request = PlaybookRequest(playbook=playbook, hosts=("dev1", "dead"))
    results = executor.run_playbook(ssh_inventory, request, artifacts_dir=tmp_path / "a")
    assert results["dev1"].status is HostStatus.OK
    assert results["dead"].status is HostStatus.UNREACHABLE
    assert "Connection refused" in results["dead"].message


def test_host_not_matched_by_play_is_failed(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """A host outside the play's own hosts pattern comes back FAILED, never missing."""
    playbook = write_playbook(tmp_path, [{"raw": "echo hi"}], hosts="dev2")
    request = PlaybookRequest(playbook=playbook, hosts=("dev1", "dev2"))
    results = executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "a")
    assert results["dev2"].status is HostStatus.OK
    assert results["dev1"].status is HostStatus.FAILED
    assert "did not run" in results["dev1"].message


def test_broken_playbook_is_an_executor_error(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """A playbook Ansible cannot parse raises ExecutorError naming the playbook."""
    playbook = tmp_path / "broken.yml"
    playbook.write_text("- hosts: all\n  tasks:\n    - no_such_module_xyz: {}\n")
    request = PlaybookRequest(playbook=playbook, hosts=("dev1",))
    with pytest.raises(ExecutorError, match=r"broken\.yml.*no_such_module_xyz"):
        executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "a")


def test_missing_playbook_is_an_executor_error(
    executor: AnsibleExecutor, inventory: Path, tmp_path: Path
) -> None:
    """A playbook path that does not exist raises ExecutorError before running anything."""
    request = PlaybookRequest(playbook=tmp_path / "nope.yml", hosts=("dev1",))
    with pytest.raises(ExecutorError, match=r"nope\.yml"):
        executor.run_playbook(inventory, request, artifacts_dir=tmp_path / "a")


def test_missing_ansible_binary_is_an_executor_error(inventory: Path, tmp_path: Path) -> None:
    """Without ansible-playbook on the executor's path the call raises ExecutorError."""
    if shutil.which("ansible-playbook", path=os.environ.get("PATH", "")):
        pytest.skip("ansible-playbook is on PATH outside the venv")
    empty = tmp_path / "bin"
    empty.mkdir()
    executor = AnsibleExecutor(AnsibleSettings(work_dir=tmp_path / "w", ansible_bin_dir=empty))
    with pytest.raises(ExecutorError, match="ansible-playbook"):
        executor.run_script(inventory, ["dev1"], "true", timeout=5)


def test_cancel_stops_a_running_playbook_and_its_task_after_the_grace(tmp_path: Path) -> None:
    """A cancel stops ansible-playbook; a task still running after the grace is killed."""
    deadline = time.monotonic() + 2
    executor = AnsibleExecutor(
        AnsibleSettings(work_dir=tmp_path / "work", cancel_grace=1),
        cancel=lambda: time.monotonic() > deadline,
    )
    inventory = write_inventory(
        tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local", **NO_PYTHON}}
    )
    with _slow_task(tmp_path) as (script, task_pid):
        playbook = write_playbook(tmp_path, [{"name": "slow", "ansible.builtin.raw": script}])
        with pytest.raises(ExecutorError, match="cancelled"):
            executor.run_playbook(
                inventory,
                PlaybookRequest(playbook=playbook, hosts=("dev1",), label="slow"),
                artifacts_dir=tmp_path / "artifacts",
            )
        assert gone(task_pid())
    assert processes_mentioning(str(tmp_path)) == []


_DIES_OF_SIGTERM = """
import sys, time
from pathlib import Path
from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.executors.base import PlaybookRequest
tmp = Path(sys.argv[1])
executor = AnsibleExecutor(AnsibleSettings(work_dir=tmp / "work", cancel_grace=1))
executor.run_playbook(
    tmp / "hosts.yml",
    PlaybookRequest(playbook=Path(sys.argv[2]), hosts=("dev1",), label="slow"),
    artifacts_dir=tmp / "artifacts",
)
"""


def test_a_process_ended_by_sigterm_leaves_no_stopped_tree(tmp_path: Path) -> None:
    """SIGTERM with its default action still ends the process, after the tree is gone."""
    write_inventory(tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local", **NO_PYTHON}})
    with _slow_task(tmp_path) as (script, task_pid):
        playbook = write_playbook(tmp_path, [{"name": "slow", "ansible.builtin.raw": script}])
        with subprocess.Popen(
            [sys.executable, "-c", _DIES_OF_SIGTERM, str(tmp_path), str(playbook)],
            cwd=Path(__file__).resolve().parents[2],
        ) as proc:
            task = task_pid()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == -signal.SIGTERM
        assert gone(task)
    assert processes_mentioning(str(tmp_path)) == []


def test_cancel_lets_the_task_in_flight_finish_and_starts_no_other(tmp_path: Path) -> None:
    """A step's command is not cut short when it ends within the grace; the next never starts."""
    started = tmp_path / "started"
    executor = AnsibleExecutor(
        AnsibleSettings(work_dir=tmp_path / "work", cancel_grace=30), cancel=started.exists
    )
    inventory = write_inventory(
        tmp_path / "hosts.yml", {"dev1": {"ansible_connection": "local", **NO_PYTHON}}
    )
    first, second = tmp_path / "first", tmp_path / "second"
    playbook = write_playbook(
        tmp_path,
        [
            {"name": "one", "ansible.builtin.raw": f"touch {started}; sleep 2; touch {first}"},
            {"name": "two", "ansible.builtin.raw": f"touch {second}"},
        ],
    )
    with pytest.raises(ExecutorError, match="cancelled"):
        executor.run_playbook(
            inventory,
            PlaybookRequest(playbook=playbook, hosts=("dev1",), label="two-steps"),
            artifacts_dir=tmp_path / "artifacts",
        )
    assert first.exists()
    assert not second.exists()
    assert processes_mentioning(str(tmp_path)) == []


# -- the ansible-runner adjustment -------------------------------------------------------


def test_runner_closes_its_pty_without_sleeping_and_still_stops_live_children() -> None:
    """ansible-runner's spawn skips ptyprocess' 0.1 s close delay but keeps exit codes and kills."""
    spawn = ansible_runner.runner.pexpect.spawn  # what ansible-runner spawns ansible-playbook with
    finished = spawn("sh", ["-c", "echo done; exit 3"], encoding="utf-8")
    finished.expect(pexpect.EOF)
    while finished.isalive():  # as ansible-runner's loop: close only after the child exited
        time.sleep(0.01)
    assert finished.ptyproc.delayafterclose == 0
    finished.close()
    assert finished.exitstatus == 3
    alive = spawn("sleep", ["30"])
    alive.close()
    assert not alive.isalive()
    assert alive.signalstatus is not None


#: The display callback probes use (ansible-runner loads it from ``AWX_LIB_DIRECTORY``).
PROBE_DISPLAY = Path(__file__).parents[2] / "engine" / "executors" / "ansible_display"


@pytest.mark.parametrize("probe_display", [False, True], ids=["ansible-runner's", "probes'"])
def test_the_probes_display_callback_sends_one_event_per_host(
    tmp_path: Path, probe_display: bool
) -> None:
    """Probes' callback sends each host's result (with its duration) but no task-start event."""
    inventory = write_inventory(
        tmp_path / "hosts.yml",
        {name: {"ansible_connection": "local", **NO_PYTHON} for name in ("dev1", "dev2")},
    )
    playbook = tmp_path / "probe.yml"
    playbook.write_text(
        yaml.safe_dump(
            [{"hosts": "all", "gather_facts": False, "tasks": [{"ansible.builtin.raw": "echo hi"}]}]
        )
    )
    events: list[dict[str, Any]] = []

    def keep(event: dict[str, Any]) -> bool:
        events.append(event)
        return False

    (tmp_path / "private").mkdir()
    runner = ansible_runner.run(
        private_data_dir=str(tmp_path / "private"),
        playbook=str(playbook),
        inventory=str(inventory),
        envvars={
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            **({"AWX_LIB_DIRECTORY": str(PROBE_DISPLAY)} if probe_display else {}),
        },
        quiet=True,
        event_handler=keep,
    )
    assert runner.status == "successful"
    per_host = [e for e in events if e.get("event_data", {}).get("host")]
    ok = {
        e["event_data"]["host"]: e["event_data"] for e in per_host if e["event"] == "runner_on_ok"
    }
    assert sorted(ok) == ["dev1", "dev2"]
    assert all(
        data["res"]["stdout"].strip() == "hi" and data["duration"] >= 0 for data in ok.values()
    )
    started = [e for e in per_host if e["event"] == "runner_on_start"]
    assert len(started) == (0 if probe_display else 2)
