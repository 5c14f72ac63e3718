"""The shared backend: PostgreSQL through psycopg 3 and its connection pool.

Replicas of ``remediate serve`` (and CLI runs) share one database: ``single_server`` is
false.  The schema is migrated on open (or by ``remediate state migrate``) in one
transaction under an advisory lock, so replicas starting together migrate once; a database
migrated by a newer engine is refused.  Sessions run in UTC, so every time read back is
UTC.  PostgreSQL's own ideas (advisory locks, ``SKIP LOCKED``, its clock) stay here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from engine.audit import (
    AuditHead,
    AuditVerification,
    DatabaseAuditSink,
    verify_lines,
    write_export,
)
from engine.errors import StateError
from engine.state.factory import redacted_url
from engine.state.migrations import Migration, check_migrations
from engine.state.postgres.board import PostgresRunBoard
from engine.state.postgres.jobs import apply_job_schema, job_schema_grants, job_schema_pending
from engine.state.postgres.migrations import MIGRATIONS
from engine.state.postgres.store import PostgresStore

__all__ = ["PostgresDatabase", "PostgresStore"]

#: Connections the pool keeps open, and at most holds (intake, workers, watchers, HTTP reads).
POOL_MIN, POOL_MAX = 2, 16
#: Seconds a store call waits for a free connection (or for the server to come back).  Short:
#: while the database is away the intake must answer 503 (Alertmanager retries) before the
#: sender's own timeout, and a worker tries again on its next loop anyway.
POOL_TIMEOUT = 5.0
#: Key of the advisory lock that serialises migrations.
MIGRATION_LOCK = 0x72656D6564  # "remed"

#: Tables whose rows the application writes and reads; the audit chain (when present) is
#: granted INSERT only.
APP_TABLES = (
    "runs",
    "host_results",
    "cooldowns",
    "device_locks",
    "admission_locks",
    "admissions",
    "controllers",
    "audit_head",
    "approvals",
    "alert_firings",
    "alert_queue",
    "queue_firings",
    "alert_breaker",
    "dist_runs",
    "dist_hosts",
    "dist_shards",
    "dist_workers",
)


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Every pooled session reads and writes times in UTC."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.commit()


class PostgresDatabase:
    """A PostgreSQL database behind one pool; its stores share the pool."""

    single_server = False

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime],
        migrate: bool = True,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        pool_max: int = POOL_MAX,
    ) -> None:
        del clock  # leases, admissions and heartbeats use the database's own clock
        check_migrations(migrations)
        self._conninfo = url
        self.url = redacted_url(url)
        self._migrations = migrations
        try:
            self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
                url,
                min_size=min(POOL_MIN, pool_max),
                max_size=pool_max,
                timeout=POOL_TIMEOUT,
                configure=_configure,
                check=ConnectionPool.check_connection,
                open=False,
                name="remediate-state",
            )
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StateError(f"{self.url}: cannot connect to the state database: {exc}") from exc
        try:
            self._check_schema(apply=migrate)
        except BaseException:
            self._pool.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresDatabase({self.url!r})"

    def store(self, *, intake: bool = False) -> PostgresStore:
        """A store on the shared pool (``intake`` makes no difference here)."""
        del intake
        return PostgresStore(self._pool, self.url)

    def run_board(self) -> PostgresRunBoard:
        """The board of distributed runs, on the shared pool."""
        return PostgresRunBoard(self._pool, self.url)

    def audit_log(self) -> DatabaseAuditSink:
        """The audit chain in this database (appended in the state changes' transactions)."""
        store = self.store()
        return DatabaseAuditSink(
            append=store.append_audit,
            read_head=store.audit_chain_head,
            export=self._export_audit,
            verify=self._verify_audit,
            where=self.url,
        )

    def _verify_audit(self, expected: AuditHead | None) -> AuditVerification:
        """Check the chain against ``expected``, else its head row (needs SELECT on it)."""
        store = self.store()
        head = expected or store.audit_chain_head()
        return verify_lines(store.audit_lines(), head)

    def _export_audit(self, target: Path) -> AuditHead | None:
        store = self.store()
        head = store.audit_chain_head()
        lines = store.audit_lines()
        write_export(target, lines)
        return head

    def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection."""
        try:
            with self._pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, PoolTimeout) as exc:
            raise StateError(f"{self.url}: the state database does not answer: {exc}") from exc

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- schema

    def schema_version(self) -> int:
        """The highest migration applied (0 for an empty database)."""
        with self._errors("read the schema version"), self._pool.connection() as conn:
            version = _applied(conn)
            conn.rollback()
            return version

    def migrate(self) -> int:
        """Apply missing migrations; return the schema version."""
        self._check_schema(apply=True)
        return self.schema_version()

    def grant(self, role: str) -> None:
        """Give ``role`` what ``remediate serve`` needs: rows of the state tables, no DDL."""
        with (
            self._errors(f"grant {role} the application's privileges"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            ident = sql.Identifier(role)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
            conn.execute(
                sql.SQL("GRANT SELECT ON schema_version TO {}").format(ident),
            )
            tables = sql.SQL(", ").join(sql.Identifier(t) for t in APP_TABLES)
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(tables, ident)
            )
            conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE lease_tokens TO {}").format(ident))
            for extra in self._extra_grants():
                conn.execute(extra.format(ident))
            job_schema_grants(conn, ident)

    def _extra_grants(self) -> list[sql.SQL]:
        # The chain: INSERT only (the head row is read and moved by every append).
        return [
            sql.SQL("GRANT INSERT ON audit_chain TO {}"),
            sql.SQL("GRANT SELECT, UPDATE ON audit_chain_head TO {}"),
        ]

    def _errors(self, doing: str) -> _Translate:
        return _Translate(self.url, doing)

    def _check_schema(self, *, apply: bool) -> list[Migration]:
        known = len(self._migrations)
        with self._errors("migrate the schema"), self._pool.connection() as conn:
            current = _applied(conn)
            jobs_pending = job_schema_pending(conn, self.url)
            conn.rollback()
            if current > known:
                raise StateError(
                    f"{self.url}: schema version {current} is newer than this engine knows "
                    f"({known}); upgrade remediate"
                )
            if current == known and not jobs_pending:
                return []
            if not apply:
                what = (
                    f"schema version {current}, this engine needs {known}"
                    if current != known
                    else "the task engine's schema (procrastinate) is missing or older"
                )
                raise StateError(f"{self.url}: {what}: run `remediate state migrate`")
            try:
                return self._apply(conn)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise StateError(
                    f"{self.url}: schema version {current}, this engine needs {known}, and "
                    f"this role may not change the schema ({exc}); run `remediate state "
                    "migrate` as the database's owner"
                ) from exc

    def _apply(self, conn: psycopg.Connection[tuple[Any, ...]]) -> list[Migration]:
        applied: list[Migration] = []
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = _applied(conn)  # again, under the lock: another process may have run
            if current > len(self._migrations):
                raise StateError(
                    f"{self.url}: schema version {current} is newer than this engine knows "
                    f"({len(self._migrations)}); upgrade remediate"
                )
            for migration in self._migrations[current:]:
                for statement in migration.statements:
                    conn.execute(statement.encode())
                conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
                applied.append(migration)
            apply_job_schema(conn, self.url)  # procrastinate's, for distributed runs
        return applied


def _applied(conn: psycopg.Connection[Any]) -> int:
    """The highest version in ``schema_version`` (0 when the table does not exist)."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(version[0]) if version else 0


class _Translate:
    """Context manager: psycopg errors become StateError naming the database and the task."""

    def __init__(self, url: str, doing: str) -> None:
        self.url, self.doing = url, doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, psycopg.Error | PoolTimeout) and not isinstance(exc, StateError):
            raise StateError(f"{self.url}: state store cannot {self.doing}: {exc}") from exc
