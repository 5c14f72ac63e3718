"""Every state backend, for tests that must hold on each: the ``backend`` fixture.

``backend`` is parametrised ``sqlite`` and ``postgresql`` (a fresh database of the session's
server).  ``Backend.advance`` moves time for leases and heartbeats: the injected clock for
SQLite, real time (a sleep) for PostgreSQL, whose clock is its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.state import AlertStore, StateDatabase, open_database, sqlite_url

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A settable clock."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        """Move the clock on by ``delta``."""
        self.now += delta


@dataclass
class Backend:
    """One opened backend, its URL and the clock its stores were given."""

    name: str
    url: str
    database: StateDatabase
    clock: Clock

    def store(self) -> AlertStore:
        """A new store of the database (closed by the caller)."""
        return self.database.store()

    def advance(self, delta: timedelta) -> None:
        """Let ``delta`` pass for whatever clock the backend's leases run on."""
        self.clock.advance(delta)
        if self.name == "postgresql":
            time.sleep(delta.total_seconds())


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn, freshly created."""
    clock = Clock()
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "state" / "state.db")
    else:
        url = request.getfixturevalue("postgres_url")
    database = open_database(url, clock=clock)
    try:
        yield Backend(request.param, url, database, clock)
    finally:
        database.close()


@pytest.fixture
def store(backend: Backend) -> Iterator[AlertStore]:
    """A store of each backend in turn."""
    opened = backend.store()
    try:
        yield opened
    finally:
        opened.close()
