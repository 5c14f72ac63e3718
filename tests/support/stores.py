"""Every state backend, for tests that must hold on each: the ``backend`` fixture.

``backend`` is parametrised ``sqlite`` and ``postgresql`` (a fresh database of the session's
server).  ``Backend.advance`` moves time for leases and heartbeats: the injected clock for
SQLite, real time (a sleep) for PostgreSQL, whose clock is its own.  :class:`FaultyStore` and
:class:`FaultyDatabase` wrap a real one and raise where a test asks (faults are injected
through the store, never by patching the engine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.state import AlertStore, StateDatabase, StateStore, open_database, sqlite_url

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


class FaultyStore:
    """A store that raises on demand, wrapping a real one.

    Each call of a method named in ``faults`` raises the next exception listed for it (then,
    once they are used up, calls go through).  Every other call goes to the real store: it is
    a store in every other respect, so a test injects a fault where it wants one without
    patching the engine's code.
    """

    def __init__(self, inner: StateStore, faults: Mapping[str, Sequence[BaseException]]) -> None:
        self._inner = inner
        self._faults = {name: list(errors) for name, errors in faults.items()}
        self.raised: list[str] = []  # the methods that raised, in order

    def _fault(self, name: str) -> BaseException | None:
        pending = self._faults.get(name)
        return pending.pop(0) if pending else None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in self._faults or not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            fault = self._fault(name)
            if fault is not None:
                self.raised.append(name)
                raise fault
            return method(*args, **kwargs)

        return call

    def __enter__(self) -> FaultyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class FaultyDatabase:
    """A database whose stores are faulty ones (:class:`FaultyStore`; the intake's if asked).

    ``open_faults``: exceptions that the next calls of :meth:`store` from a thread whose name
    starts with ``open_faults_in`` raise instead of opening one (a database that cannot be
    reached when a server's worker starts; its other threads open theirs).
    """

    def __init__(
        self,
        inner: StateDatabase,
        faults: Mapping[str, Sequence[BaseException]],
        *,
        open_faults: Sequence[BaseException] = (),
        open_faults_in: str = "remediate-worker",
        intake: bool = False,
    ) -> None:
        self._inner = inner
        self.faults = faults
        self._open_faults = list(open_faults)
        self._open_faults_in = open_faults_in
        self._intake = intake
        self.url = inner.url
        self.single_server = inner.single_server
        self.stores: list[FaultyStore] = []

    def store(self, *, intake: bool = False) -> AlertStore:
        """A faulty store (a plain one for the intake unless asked)."""
        if intake and not self._intake:
            return self._inner.store(intake=True)
        if self._open_faults and threading.current_thread().name.startswith(self._open_faults_in):
            raise self._open_faults.pop(0)
        store = FaultyStore(self._inner.store(intake=intake), self.faults)
        self.stores.append(store)
        return store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> FaultyDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()
