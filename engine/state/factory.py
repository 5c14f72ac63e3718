"""The one place that knows the backends: a state URL in, a :class:`StateDatabase` out.

``sqlite:///relative/path`` and ``sqlite:////absolute/path`` (as SQLAlchemy spells them)
open the embedded store; ``postgresql://user@host:port/dbname?...`` (or ``postgres://``,
any libpq connection URI: the password may come from ``PGPASSWORD`` or ``~/.pgpass``)
opens PostgreSQL.  Entry points take the URL from ``--state-url``, ``REMEDIATE_STATE_URL``
or the server configuration's ``state:``, else the state directory's SQLite file.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from engine.errors import ConfigError
from engine.state.protocols import StateDatabase

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


def sqlite_url(path: Path) -> str:
    """The URL of the SQLite file at ``path``."""
    return f"{SQLITE_PREFIX}{path}"


def redacted_url(url: str) -> str:
    """``url`` without its password (and query, which may carry one), for logs and /healthz."""
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = "&".join(
        pair if not pair.lower().startswith("password=") else "password=***"
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def open_database(
    url: str,
    *,
    clock: Callable[[], datetime],
    migrate: bool = True,
    connections: int = 16,
) -> StateDatabase:
    """Open the database ``url`` names; its schema is migrated first unless ``migrate=False``.

    (SQLite migrates each connection as it opens; ``migrate=False`` asks PostgreSQL only to
    check that the schema is current, for roles that may not change it.)  ``connections``:
    how many the process may hold at once (PostgreSQL's pool; SQLite opens one per store).

    Raises :class:`~engine.errors.ConfigError` for a URL no backend takes, and
    :class:`~engine.errors.StateError` when the database cannot be opened or is newer than
    this engine.
    """
    if url.startswith(SQLITE_PREFIX):
        path = Path(url.removeprefix(SQLITE_PREFIX))
        if not str(path) or str(path) == ".":
            raise ConfigError(f"state URL {url!r}: no file path after {SQLITE_PREFIX!r}")
        from engine.state.sqlite import SqliteDatabase  # noqa: PLC0415 - loaded when used

        return SqliteDatabase(path, clock=clock)  # each connection migrates the file as it opens
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        from engine.state.postgres import PostgresDatabase  # noqa: PLC0415 - needs psycopg

        return PostgresDatabase(url, clock=clock, migrate=migrate, pool_max=connections)
    raise ConfigError(
        f"state URL {redacted_url(url)!r}: expected sqlite:///PATH or postgresql://..."
    )
