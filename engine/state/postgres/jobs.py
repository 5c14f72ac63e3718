"""The task engine's schema (procrastinate's), kept in the state's database and migrated with it.

Distributed runs (:mod:`engine.distributed`) are procrastinate jobs: rows in this database,
so a run's record and its jobs commit in one transaction.  Their schema is procrastinate's
own SQL, applied by ``remediate state migrate`` (and wherever the state migrates), in the
same transaction as the engine's migrations and under the same advisory lock:

* a database without it gets procrastinate's ``schema.sql`` (the installed version's);
* one migrated by an older procrastinate gets the library's migration files that came
  after it, in order (stop the workers first: they are procrastinate's own upgrade steps);
* ``job_schema`` remembers the version applied; a database newer than the installed
  procrastinate is refused.

Without procrastinate installed (the ``distributed`` extra) nothing is applied: the state
works as before, and ``remediate worker`` says what to install.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from engine.errors import StateError

#: procrastinate's tables and sequences, granted to the application role.
JOB_TABLES = (
    "procrastinate_jobs",
    "procrastinate_workers",
    "procrastinate_periodic_defers",
    "procrastinate_events",
)
_MIGRATION_FILE = re.compile(r"^(\d+)\.(\d+)\.(\d+)_\d+_.*\.sql$")


def installed_version() -> tuple[int, int, int] | None:
    """The installed procrastinate's version, or None when it is not installed."""
    try:
        text = importlib.metadata.version("procrastinate")
    except importlib.metadata.PackageNotFoundError:
        return None
    return _version(text)


def _version(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


def _text(version: tuple[int, int, int]) -> str:
    return ".".join(str(p) for p in version)


def recorded_version(conn: psycopg.Connection[Any]) -> tuple[int, int, int] | None:
    """The job schema version this database has (None: none applied)."""
    row = conn.execute("SELECT to_regclass('job_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = conn.execute("SELECT version FROM job_schema WHERE id = 1").fetchone()
    return None if found is None else _version(str(found[0]))


def job_schema_pending(conn: psycopg.Connection[Any], where: str) -> bool:
    """Whether the installed procrastinate's schema is missing or older in this database."""
    installed = installed_version()
    if installed is None:
        return False
    recorded = recorded_version(conn)
    if recorded is not None and recorded > installed:
        raise StateError(
            f"{where}: the task engine's schema is procrastinate {_text(recorded)}, newer "
            f"than the installed {_text(installed)}; upgrade remediate's distributed extra"
        )
    return recorded != installed


def apply_job_schema(conn: psycopg.Connection[Any], where: str) -> str | None:
    """Apply procrastinate's schema or its newer migrations (in the caller's transaction).

    Returns the version now applied, or None when procrastinate is not installed.
    """
    installed = installed_version()
    if installed is None:
        return None
    from procrastinate.schema import SchemaManager  # noqa: PLC0415 - the optional extra

    conn.execute(
        "CREATE TABLE IF NOT EXISTS job_schema (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " version TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    recorded = recorded_version(conn)
    if recorded == installed:
        return _text(installed)
    if recorded is None:
        present = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
        if present is not None and present[0]:
            raise StateError(
                f"{where}: procrastinate's tables exist but remediate did not create them "
                "(no job_schema row): is another application using this database?"
            )
        conn.execute(SchemaManager.get_schema().encode())
    else:
        if recorded > installed:
            raise StateError(
                f"{where}: the task engine's schema is procrastinate {_text(recorded)}, "
                f"newer than the installed {_text(installed)}"
            )
        for path in _migrations_after(Path(SchemaManager.get_migrations_path()), recorded):
            if _file_version(path) <= installed:
                conn.execute(path.read_text(encoding="utf-8").encode())
    conn.execute(
        "INSERT INTO job_schema (id, version) VALUES (1, %s) ON CONFLICT (id)"
        " DO UPDATE SET version = excluded.version, applied_at = now()",
        (_text(installed),),
    )
    return _text(installed)


def _file_version(path: Path) -> tuple[int, int, int]:
    match = _MIGRATION_FILE.match(path.name)
    if match is None:  # pragma: no cover - procrastinate names every migration this way
        raise StateError(f"{path}: not a procrastinate migration file name")
    return int(match[1]), int(match[2]), int(match[3])


def _migrations_after(folder: Path, version: tuple[int, int, int]) -> list[Path]:
    """Procrastinate's migration files newer than ``version``, in the order it applies them."""
    files = [p for p in folder.glob("*.sql") if _MIGRATION_FILE.match(p.name)]
    return sorted((p for p in files if _file_version(p) > version), key=lambda p: p.name)


def job_schema_grants(conn: psycopg.Connection[Any], role: sql.Identifier) -> None:
    """Give ``role`` the rows of procrastinate's tables (its functions are PUBLIC already)."""
    present = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()
    if present is None or not present[0]:
        return
    tables = sql.SQL(", ").join(sql.Identifier(t) for t in JOB_TABLES)
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(tables, role))
    conn.execute(sql.SQL("GRANT SELECT ON job_schema TO {}").format(role))
    conn.execute(
        sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(role)
    )
