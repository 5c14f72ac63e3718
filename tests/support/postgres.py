"""A real PostgreSQL (Debian's ``postgresql-15``) started by the tests, in a temp dir.

One server per test session: ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/*/bin``,
run as the ``postgres`` system user when the tests run as root (initdb refuses root), with
its own data directory, unix socket directory and a free loopback port; stopped after.
Each test gets its own database, copied from a template that is migrated once
(``CREATE DATABASE ... TEMPLATE``, fast).  Tests skip, saying why, only when the binaries
are missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psycopg
import pytest

from engine.audit import utc_now
from engine.state import open_database
from tests.support.ports import free_port

SUPERUSER = "postgres"
TEMPLATE = "remediate_template"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else None


@dataclass
class PostgresServer:
    """A running PostgreSQL: its binaries, data directory, socket directory and port."""

    bin_dir: Path
    base: Path
    port: int
    durable: bool = False
    _names: Iterator[int] = field(default_factory=count)

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.base / "data"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.base / "postgres.log"

    def url(self, dbname: str, user: str = SUPERUSER) -> str:
        """A libpq URL for ``dbname`` over loopback TCP."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _as_owner(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SUPERUSER, "--", *argv]
        return list(argv)

    def _pg_ctl(self, *args: str) -> None:
        command = self._as_owner(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)}: {result.stderr}{result.stdout}\n{log}")

    def init(self) -> None:
        """Create the cluster (trust authentication, loopback and its own socket only)."""
        command = self._as_owner(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        subprocess.run(command, capture_output=True, text=True, check=True)
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.base}'",
            "max_connections = 200",
            "shared_buffers = 64MB",
        ]
        if not self.durable:  # tests: crash safety of the test database is not needed
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, clean shutdown)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def execute(self, statement: str, dbname: str = "postgres", user: str = SUPERUSER) -> None:
        """Run one statement outside a transaction (CREATE DATABASE, roles, grants)."""
        with psycopg.connect(self.url(dbname, user), autocommit=True) as conn:
            conn.execute(statement.encode())

    def new_database(self, prefix: str = "t") -> str:
        """A fresh database migrated to the current schema; returns its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
        return self.url(name)


class PostgresMissingError(RuntimeError):
    """PostgreSQL cannot be started here (no binaries, or no user to run them as)."""


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """Start a throw-away PostgreSQL (``durable``: fsync and synchronous commits on)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise PostgresMissingError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin)")
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError as exc:
            raise PostgresMissingError(
                f"no {SUPERUSER!r} system user to run PostgreSQL as (initdb refuses root)"
            ) from exc
    base = Path(tempfile.mkdtemp(prefix="remediate-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bin_dir=bin_dir, base=base, port=free_port(), durable=durable)
    server.init()
    server.start()
    return server


def started_or_skip(*, durable: bool = False) -> PostgresServer:
    """:func:`start_postgres`, or skip the test saying why it cannot."""
    try:
        return start_postgres(durable=durable)
    except PostgresMissingError as exc:
        pytest.skip(str(exc))


def remove_postgres(server: PostgresServer) -> None:
    """Stop the server (if it runs) and remove its directory."""
    with contextlib.suppress(RuntimeError):
        server.stop("immediate")
    shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session, with a migrated template database."""
    server = started_or_skip()
    try:
        server.execute(f"CREATE DATABASE {TEMPLATE}")
        open_database(server.url(TEMPLATE), clock=utc_now).close()
        yield server
    finally:
        remove_postgres(server)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own (a test that restarts it), durable like a real one."""
    server = started_or_skip(durable=True)
    try:
        server.execute("CREATE DATABASE remediate")
        open_database(server.url("remediate"), clock=utc_now).close()
        yield server
    finally:
        remove_postgres(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, migrated database of the session's server, for one test."""
    return postgres_server.new_database()
