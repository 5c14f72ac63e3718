"""Real ``remediate worker`` processes on a test's PostgreSQL, over a simulated fleet.

A test can kill a worker as a machine dies: the worker and every process it started
(``ansible-playbook`` and its children), at once, with SIGKILL.
Every process started here is stopped at the end by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.support.cli import REMEDIATE, ROOT
from tests.support.fleet import SimFleet

#: Worker timings of the tests: stalled workers are found within seconds, not a minute.
FAST_WORKER = (
    "--heartbeat", "1", "--stalled-after", "4", "--check-every", "1", "--lease-ttl", "8s",
    "--grace", "5",
)  # fmt: skip


@dataclass
class Cluster:
    """A PostgreSQL state URL, a fleet, and the workers started on them."""

    url: str
    fleet: SimFleet
    base: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of every remediate process of the cluster."""
        return {
            **os.environ,
            **self.fleet.env,
            "REMEDIATE_STATE_DIR": str(self.base / "state"),
            "REMEDIATE_STATE_URL": self.url,
            "REMEDIATE_USER": "tester",
        }

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one ``remediate worker`` (fast timings), in its own session."""
        number = len(self.workers)
        with (self.base / f"worker{number}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*REMEDIATE, "worker", "--concurrency", "2", *FAST_WORKER, *extra],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        return proc

    def kill(self, pid: int) -> None:
        """SIGKILL a worker and every process it started (a machine lost).

        ansible-runner runs ``ansible-playbook`` on a pty, in a session of its own: the
        worker's descendants are found by parentage, not by process group.
        """
        worker = psutil.Process(pid)
        doomed = [worker, *worker.children(recursive=True)]
        for proc in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        next(w for w in self.workers if w.pid == pid).wait(timeout=30)
        psutil.wait_procs(doomed[1:], timeout=30)

    def remediate(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``remediate ARGS`` against the cluster's state (never raises on exit codes)."""
        return subprocess.run(
            [*REMEDIATE, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    @contextlib.contextmanager
    def following(self, *args: str) -> Iterator[subprocess.Popen[str]]:
        """``remediate ARGS`` in the background (a followed run); killed if left running."""
        proc = subprocess.Popen(
            [*REMEDIATE, *args],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query on the state database."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return list(conn.execute(statement.encode(), params).fetchall())

    def audit(self) -> list[dict[str, Any]]:
        """The audit chain's records, in order."""
        rows = self.query("SELECT record FROM audit_chain ORDER BY seq")
        return [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]

    def wait_for(self, what: str, test: Callable[[], Any], timeout: float = 120) -> Any:
        """Poll ``test`` until it returns something true; fail naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = test()
            if found:
                return found
            time.sleep(0.2)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.base.glob("worker*.log"))
        )
        pytest.fail(f"timed out waiting for {what}\n{logs}")

    def stop(self) -> None:
        """SIGTERM every worker still running; SIGKILL its group after 20 s."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def cluster_factory(tmp_path: Path, postgres_url: str) -> Iterator[Callable[[SimFleet], Cluster]]:
    """Make the test's cluster on its fleet; its workers are stopped after the test."""
    made: list[Cluster] = []

    def make(fleet: SimFleet) -> Cluster:
        cluster = Cluster(url=postgres_url, fleet=fleet, base=tmp_path)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()
