"""A project for the webhook server: runbooks with triggers, playbooks, an inventory, bodies.

Also :class:`ServerProcess`: the server as a real child process (uvicorn on loopback), for
the restart and Alertmanager tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import psutil
import pytest
from starlette.types import ASGIApp

from engine.errors import InventoryError
from engine.executors.fake import FakeExecutor, PlaybookAnswer, ScriptAnswer
from engine.server.fleet import ResolveTargets
from engine.settings import Settings
from engine.targets import Host, TargetSet

ROOT = Path(__file__).resolve().parents[2]
NO_PYTHON = "/nonexistent/python3"
TOKEN = "test-token-0123456789abcdef"  # noqa: S105 - a test credential
FIXTURES = Path("/work/shared/fixtures/alertmanager")
FIXTURE_UUID = "a1b2c3d4e5f60718293a4b5c6d7e8f90"

#: Three devices; dev-a is the one the shared fixture bodies name (balena_uuid, instance).
FLEET: dict[str, dict[str, str]] = {
    "dev-a": {"balena_uuid": FIXTURE_UUID, "edge_id": "a1b2c3d.balena"},
    "dev-b": {"balena_uuid": "b" * 32, "edge_id": "b1b2c3d.balena"},
    "dev-c": {"balena_uuid": "c" * 32, "edge_id": "c1b2c3d.balena"},
}

DISK_RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {name: disk-full, title: Data partition full}
targets: {hosts: fleet}
triggers:
  - alertname: [NodeFilesystemAlmostOutOfSpace, NodeFilesystemSpaceFillingUp]
    match: {mountpoint: /mnt/data}
    device_label: balena_uuid
    device_var: balena_uuid
    mode: plan
checks:
  - {id: free, run: "echo 5", parse: int}
symptom: "checks.free < 10"
steps:
  - {id: clean, playbook: noop.yml, plan: "clean up"}
verify: "checks.free >= 10"
policy: {approval: never, max_hosts_pct: 100}
"""

ENGINE_RUNBOOK = """\
apiVersion: remediate/v1
kind: Runbook
metadata: {name: engine-down, title: Engine down}
targets: {hosts: fleet}
triggers:
  - alertname: BalenaEngineDown
    match_re: {job: "node|balena"}
    device_label: instance
    device_var: edge_id
    strip_port: true
    mode: apply
checks:
  - {id: up, run: "echo false", parse: bool}
symptom: "not checks.up"
steps:
  - {id: restart, playbook: noop.yml, plan: "restart the engine"}
verify: "checks.up"
policy: {approval: never, max_hosts_pct: 100}
"""

NOOP_PLAYBOOK = """\
- name: Do nothing
  hosts: all
  gather_facts: false
  tasks:
    - name: Nothing
      ansible.builtin.raw: "true"
"""

#: Appends one line per run to a file, so runs are countable; sleeps on hosts listed in
#: ``slow_hosts`` (to be caught mid-run).
MARK_PLAYBOOK = """\
- name: Mark one run
  hosts: all
  gather_facts: false
  tasks:
    - name: Log start, maybe wait, log the act
      ansible.builtin.raw: >-
        echo "start {{ inventory_hostname }}" >> {{ log | quote }};
        case " {{ slow_hosts }} " in *" {{ inventory_hostname }} "*) sleep {{ pause }};; esac;
        echo "acted {{ inventory_hostname }}" >> {{ log | quote }}
"""


def mark_runbook(log: Path, *, slow_hosts: str = "", pause: int = 0) -> str:
    """A runbook whose every run on a host appends ``acted <host>`` to ``log`` (mode apply)."""
    return f"""\
apiVersion: remediate/v1
kind: Runbook
metadata: {{name: mark, title: Mark a run}}
targets: {{hosts: fleet}}
triggers:
  - alertname: MarkMe
    device_label: edge
    mode: apply
checks:
  - {{id: always, run: "echo true", parse: bool}}
symptom: "checks.always"
steps:
  - id: mark
    playbook: mark.yml
    plan: "append a line"
    vars: {{log: "{log}", slow_hosts: "{slow_hosts}", pause: {pause}}}
verify: "checks.always"
policy: {{approval: never, max_hosts_pct: 100, serial: 1}}
"""


@dataclass(frozen=True)
class Project:
    """Directories and files of one test project."""

    root: Path
    runbooks: Path
    playbooks: Path
    inventory: Path
    state: Path

    def settings(self) -> Settings:
        """Settings pointing at the project."""
        return Settings(
            runbooks_dir=self.runbooks,
            playbooks_dir=self.playbooks,
            state_dir=self.state,
            user="tester",
        )

    def write_config(self, text: str) -> Path:
        """Write a server configuration file (the inventory and dirs are prepended)."""
        path = self.root / "server.yml"
        head = (
            f"inventory: {self.inventory}\n"
            f"runbooks_dir: {self.runbooks}\n"
            f"playbooks_dir: {self.playbooks}\n"
        )
        path.write_text(head + text)
        path.chmod(0o600)  # it may hold the token: the server refuses it readable by others
        return path


def write_project(
    root: Path,
    *,
    runbooks: Mapping[str, str],
    playbooks: Mapping[str, str] | None = None,
    hosts: Mapping[str, Mapping[str, str]] = FLEET,
) -> Project:
    """A project with these runbooks and playbooks and a local-connection inventory."""
    project = Project(
        root=root,
        runbooks=root / "runbooks",
        playbooks=root / "playbooks",
        inventory=root / "hosts.ini",
        state=root / "state",
    )
    project.runbooks.mkdir(parents=True)
    project.playbooks.mkdir()
    for name, text in runbooks.items():
        (project.runbooks / name).write_text(text)
    for name, text in {"noop.yml": NOOP_PLAYBOOK, **(playbooks or {})}.items():
        (project.playbooks / name).write_text(text)
    lines = ["[fleet]"]
    for name, host_vars in hosts.items():
        pairs = " ".join(f"{k}={v}" for k, v in host_vars.items())
        lines.append(
            f"{name} ansible_connection=local ansible_python_interpreter={NO_PYTHON} {pairs}"
        )
    project.inventory.write_text("\n".join(lines) + "\n")
    return project


def fake_resolver(hosts: Mapping[str, Mapping[str, str]]) -> ResolveTargets:
    """Resolve ``fleet``/``all`` to ``hosts`` without Ansible (fast unit tests)."""

    def resolve(inventory: Path, pattern: str) -> TargetSet:
        if pattern not in {"fleet", "all"}:
            raise InventoryError(f"inventory {inventory}: host pattern {pattern!r} selects no host")
        return TargetSet(
            inventory=inventory,
            pattern=pattern,
            hosts=tuple(Host(name=n, vars=dict(v)) for n, v in hosts.items()),
        )

    return resolve


def fleet_executor(
    scripts: Mapping[str, ScriptAnswer] | None = None,
    playbooks: Mapping[str, PlaybookAnswer] | None = None,
) -> FakeExecutor:
    """A FakeExecutor whose host table is the project's ``hosts.ini``: FLEET in ``fleet``."""
    return FakeExecutor(scripts, playbooks, hosts=FLEET, groups={"fleet": list(FLEET)})


def fixture_body(name: str) -> dict[str, Any]:
    """One of the real Alertmanager bodies in the shared fixtures."""
    body: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return body


def alert(
    labels: Mapping[str, str],
    *,
    fingerprint: str,
    starts_at: str = "2026-11-26T11:03:48Z",
    status: str = "firing",
) -> dict[str, Any]:
    """One alert of a webhook body."""
    return {
        "status": status,
        "labels": dict(labels),
        "annotations": {"summary": "test"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-26T12:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph",
        "fingerprint": fingerprint,
    }


def body(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """A version-4 webhook body around ``alerts``."""
    return {
        "receiver": "remediate",
        "status": status,
        "alerts": list(alerts),
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example:9093",
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
    }


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class ServerProcess:
    """``python -m engine.server`` as a child process in its own process group.

    With ``tls`` (a client context trusting the server, presenting a client certificate if
    the server wants one) it is spoken to over HTTPS.  ``umask``: the one it starts with;
    ``env``: variables added to its environment; ``args``: more command-line arguments.
    """

    def __init__(
        self,
        project: Project,
        config: Path,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        umask: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.project = project
        self._args = list(args)
        self.config = config
        self.port = port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log = project.root / "server.log"
        self._verify: ssl.SSLContext | bool = tls or True
        self._umask = -1 if umask is None else umask
        self._env = dict(env or {})

    def start(self) -> None:
        """Start it and wait until /healthz answers."""
        env = {**os.environ, "REMEDIATE_STATE_DIR": str(self.project.state), **self._env}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.server", "--config", str(self.config), *self._args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
                umask=self._umask,
            )
        wait_for("the server to answer /healthz", self._healthy)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            response = httpx.get(f"{self.url}/healthz", timeout=1, verify=self._verify)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def post(self, payload: dict[str, Any]) -> httpx.Response:
        """POST a webhook body with the test token."""
        return httpx.post(
            f"{self.url}/webhook",
            json=payload,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
            verify=self._verify,
        )

    def get(self, path: str) -> httpx.Response:
        """GET an endpoint with the test token."""
        return httpx.get(
            f"{self.url}{path}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
            verify=self._verify,
        )

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the server process only."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the server and everything it started, as systemd kills a unit's cgroup.

        ansible-runner starts ``ansible-playbook`` on a pty in a session of its own, outside
        the server's process group: those are found as descendants first, then all killed.
        """
        assert self.proc is not None
        descendants = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def server_processes() -> Iterator[list[ServerProcess]]:
    """Server processes a test starts; any still running are killed (with their group)."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.kill_group()


def now_text() -> str:
    """The current UTC time as RFC 3339 text."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class AppClient:
    """A blocking client for an ASGI app in process (httpx ``ASGITransport`` in an anyio portal)."""

    def __init__(self, app: ASGIApp) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request and return the response."""
        return self._portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """GET ``url``."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """POST to ``url``."""
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        """Close the client and the portal."""
        self._portal.call(self._client.aclose)
        self._portal_cm.__exit__(None, None, None)
