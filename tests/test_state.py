"""State store: migrations, run and host records, cool-downs, device locks, errors."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from engine.errors import StateError
from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.state import (
    MIGRATIONS,
    HostRecord,
    Migration,
    RunRecord,
    SqliteStateStore,
    StateStore,
    open_state,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class _Clock:
    """A settable clock."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "remediate.db"


@pytest.fixture
def store(db_path: Path, clock: _Clock) -> Iterator[SqliteStateStore]:
    with SqliteStateStore(db_path, clock=clock) as opened:
        yield opened


def _run(run_id: str = "run-1", runbook: str = "fix-wifi", **changes: object) -> RunRecord:
    base = RunRecord(
        run_id=run_id,
        runbook=runbook,
        runbook_digest="sha256:abc",
        mode=Mode.APPLY,
        trigger="user:alice",
        started_at=T0,
    )
    return base.model_copy(update=changes)


def test_sqlite_store_satisfies_the_interface(db_path: Path, clock: _Clock) -> None:
    """open_state returns something usable as the StateStore protocol."""
    store: StateStore = open_state(db_path, clock=clock)
    try:
        assert store.list_runs() == []
    finally:
        store.close()


def test_migrations_idempotent_on_reopen(db_path: Path, clock: _Clock) -> None:
    """Reopening applies nothing twice and keeps the data."""
    with SqliteStateStore(db_path, clock=clock) as first:
        assert first.schema_version() == len(MIGRATIONS)
        first.start_run(_run())
    with SqliteStateStore(db_path, clock=clock) as second:
        assert second.schema_version() == len(MIGRATIONS)
        assert second.get_run("run-1") == _run()
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT version FROM schema_version").fetchall()
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
    finally:
        db.close()
    assert rows == [(m.version,) for m in MIGRATIONS]
    assert mode == "wal"


def test_appended_migration_applied_on_open(db_path: Path, clock: _Clock) -> None:
    """A migration appended later is applied to an existing database, once."""
    extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "alerts", ("CREATE TABLE alerts (x)",)))
    with SqliteStateStore(db_path, clock=clock) as store:
        store.start_run(_run())
    for _ in range(2):
        with SqliteStateStore(db_path, clock=clock, migrations=extra) as store:
            assert store.schema_version() == len(extra)
            assert store.get_run("run-1") is not None


def test_newer_schema_refused(db_path: Path, clock: _Clock) -> None:
    """A database migrated by a newer engine is refused with the path and versions."""
    extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "future", ("CREATE TABLE f (x)",)))
    SqliteStateStore(db_path, clock=clock, migrations=extra).close()
    with pytest.raises(StateError, match="newer than this engine") as info:
        SqliteStateStore(db_path, clock=clock)
    assert str(db_path) in str(info.value)


def test_migrations_must_be_numbered_in_order(db_path: Path, clock: _Clock) -> None:
    """Gaps or reordering in the migration list are a programming error."""
    broken = (*MIGRATIONS, Migration(len(MIGRATIONS) + 2, "gap", ("SELECT 1",)))
    with pytest.raises(ValueError, match="in order"):
        SqliteStateStore(db_path, clock=clock, migrations=broken)


def test_run_and_host_round_trip(store: SqliteStateStore, clock: _Clock) -> None:
    """A run and its host records come back as they were stored, and finish_run updates it."""
    run = _run(trigger="alert:f00d")
    store.start_run(run)
    assert store.get_run("run-1") == run
    fixed = HostRecord(
        run_id="run-1",
        host="dev-2",
        outcome=HostOutcome.FIXED,
        reason="",
        steps=["restart-wifi", "check"],
        finished_at=T0 + timedelta(seconds=30),
    )
    skipped = HostRecord(
        run_id="run-1",
        host="dev-1",
        outcome=HostOutcome.SKIPPED,
        reason="cooldown: acted 5 minutes ago",
        steps=[],
        finished_at=T0 + timedelta(seconds=5),
    )
    store.record_host(fixed)
    store.record_host(skipped)
    assert store.host_records("run-1") == [skipped, fixed]
    clock.advance(timedelta(minutes=1))
    finished = store.finish_run("run-1", RunStatus.SUCCEEDED, {"fixed": 1, "skipped": 1})
    assert finished == run.model_copy(
        update={
            "status": RunStatus.SUCCEEDED,
            "summary": {"fixed": 1, "skipped": 1},
            "finished_at": T0 + timedelta(minutes=1),
        }
    )
    assert store.get_run("run-1") == finished
    assert store.get_run("nope") is None


def test_record_host_replaces_earlier_outcome(store: SqliteStateStore) -> None:
    """Recording a host twice in a run keeps the latest outcome."""
    store.start_run(_run())
    first = HostRecord(
        run_id="run-1",
        host="dev-1",
        outcome=HostOutcome.PLANNED,
        reason="",
        steps=[],
        finished_at=T0,
    )
    second = first.model_copy(update={"outcome": HostOutcome.FAILED, "reason": "rc=2"})
    store.record_host(first)
    store.record_host(second)
    assert store.host_records("run-1") == [second]


def test_record_hosts_commits_all_or_none(store: SqliteStateStore) -> None:
    """A run's hosts are recorded in one commit; if one cannot be, none of them is."""
    store.start_run(_run())
    hosts = [
        HostRecord(
            run_id="run-1",
            host=f"dev-{i}",
            outcome=HostOutcome.HEALTHY,
            reason="",
            steps=[],
            finished_at=T0,
        )
        for i in range(3)
    ]
    store.record_hosts(hosts)
    assert store.host_records("run-1") == hosts
    orphan = hosts[0].model_copy(update={"run_id": "ghost", "host": "dev-9"})
    replaced = hosts[1].model_copy(update={"outcome": HostOutcome.FAILED})
    never = "cannot record host dev-1 and 1 more: run ghost was never started"
    with pytest.raises(StateError, match=never):
        store.record_hosts([replaced, orphan])
    assert store.host_records("run-1") == hosts  # the replacement was rolled back too
    assert store.host_records("ghost") == []


def test_list_runs_newest_first_and_by_runbook(store: SqliteStateStore) -> None:
    """list_runs returns the newest runs first, limited, optionally of one runbook."""
    for n in range(5):
        runbook = "fix-wifi" if n % 2 == 0 else "fix-disk"
        store.start_run(_run(f"run-{n}", runbook, started_at=T0 + timedelta(minutes=n)))
    assert [r.run_id for r in store.list_runs()] == ["run-4", "run-3", "run-2", "run-1", "run-0"]
    assert [r.run_id for r in store.list_runs(limit=2)] == ["run-4", "run-3"]
    assert [r.run_id for r in store.list_runs(runbook="fix-disk")] == ["run-3", "run-1"]


def test_record_errors_name_the_db(store: SqliteStateStore, db_path: Path) -> None:
    """A duplicate run, a host of an unknown run or finishing an unknown run is a StateError."""
    store.start_run(_run())
    with pytest.raises(StateError, match="run-1 already exists") as info:
        store.start_run(_run())
    assert str(db_path) in str(info.value)
    orphan = HostRecord(
        run_id="ghost",
        host="dev-1",
        outcome=HostOutcome.FIXED,
        reason="",
        steps=[],
        finished_at=T0,
    )
    with pytest.raises(StateError, match="run ghost was never started"):
        store.record_host(orphan)
    with pytest.raises(StateError, match="no such run"):
        store.finish_run("ghost", RunStatus.SUCCEEDED, {})


def test_mark_interrupted(store: SqliteStateStore) -> None:
    """Runs left running become interrupted at the given time; finished runs are untouched."""
    store.start_run(_run("run-a"))
    store.start_run(_run("run-b"))
    store.start_run(_run("run-c"))
    store.finish_run("run-b", RunStatus.SUCCEEDED, {"fixed": 1})
    later = T0 + timedelta(hours=1)
    assert store.mark_interrupted(later) == ["run-a", "run-c"]
    run_a = store.get_run("run-a")
    assert run_a is not None
    assert (run_a.status, run_a.finished_at) == (RunStatus.INTERRUPTED, later)
    run_b = store.get_run("run-b")
    assert run_b is not None
    assert run_b.status is RunStatus.SUCCEEDED
    assert store.mark_interrupted(later) == []


def test_cooldown_timestamps(store: SqliteStateStore) -> None:
    """last_acted returns the latest mark_acted per (runbook, host); an older mark never wins."""
    assert store.last_acted("fix-wifi", "dev-1") is None
    store.mark_acted("fix-wifi", "dev-1", T0)
    store.mark_acted("fix-wifi", "dev-1", T0 + timedelta(minutes=10))
    store.mark_acted("fix-wifi", "dev-1", T0 + timedelta(minutes=5))
    store.mark_acted("fix-disk", "dev-1", T0)
    assert store.last_acted("fix-wifi", "dev-1") == T0 + timedelta(minutes=10)
    assert store.last_acted("fix-disk", "dev-1") == T0
    assert store.last_acted("fix-wifi", "dev-2") is None


def test_naive_timestamps_refused(store: SqliteStateStore) -> None:
    """A naive datetime is a programming error, not silently local time."""
    with pytest.raises(ValueError, match="timezone-aware"):
        store.mark_acted("fix-wifi", "dev-1", datetime(2025, 1, 1))


def test_audit_head_keeps_the_highest_seq(store: SqliteStateStore) -> None:
    """The saved audit head only moves forward, whatever order processes save it in."""
    assert store.audit_head() is None
    store.save_audit_head(5, "e" * 64)
    store.save_audit_head(3, "c" * 64)
    assert store.audit_head() == (5, "e" * 64)
    store.save_audit_head(6, "f" * 64)
    assert store.audit_head() == (6, "f" * 64)


def test_lock_reentrant_and_exclusive(store: SqliteStateStore) -> None:
    """The holder may re-take its lock; another run may not until it is released."""
    ttl = timedelta(minutes=10)
    assert store.try_lock("dev-1", "run-1", ttl)
    assert store.try_lock("dev-1", "run-1", ttl)
    assert not store.try_lock("dev-1", "run-2", ttl)
    assert store.try_lock("dev-2", "run-2", ttl)
    holder = store.lock_holder("dev-1")
    assert holder is not None
    assert holder.run_id == "run-1"
    assert not store.release_lock("dev-1", "run-2")
    assert store.release_lock("dev-1", "run-1")
    assert store.lock_holder("dev-1") is None
    assert store.try_lock("dev-1", "run-2", ttl)


def test_expired_lock_taken_over(store: SqliteStateStore, clock: _Clock) -> None:
    """Once the ttl has passed on the injected clock, another run takes the lock over."""
    assert store.try_lock("dev-1", "run-1", timedelta(minutes=10))
    clock.advance(timedelta(minutes=9, seconds=59))
    assert not store.try_lock("dev-1", "run-2", timedelta(minutes=10))
    clock.advance(timedelta(seconds=1))
    assert store.lock_holder("dev-1") is None
    assert store.try_lock("dev-1", "run-2", timedelta(minutes=10))
    holder = store.lock_holder("dev-1")
    assert holder is not None
    assert (holder.run_id, holder.acquired_at) == ("run-2", T0 + timedelta(minutes=10))
    assert not store.release_lock("dev-1", "run-1")


def test_retaking_own_lock_extends_it(store: SqliteStateStore, clock: _Clock) -> None:
    """Re-taking one's own lock extends its expiry and keeps when it was first acquired."""
    assert store.try_lock("dev-1", "run-1", timedelta(minutes=10))
    clock.advance(timedelta(minutes=8))
    assert store.try_lock("dev-1", "run-1", timedelta(minutes=10))
    holder = store.lock_holder("dev-1")
    assert holder is not None
    assert holder.acquired_at == T0
    assert holder.expires_at == T0 + timedelta(minutes=18)


def test_lock_ttl_must_be_positive(store: SqliteStateStore) -> None:
    """A zero or negative ttl is refused."""
    with pytest.raises(ValueError, match="positive"):
        store.try_lock("dev-1", "run-1", timedelta(0))


def _race_for_lock(
    path: str, run_id: str, barrier: Barrier, results: multiprocessing.Queue[str]
) -> None:
    """Child process body: open the store, wait for the others, try the lock, report."""
    with SqliteStateStore(Path(path), clock=lambda: T0) as store:
        barrier.wait()
        won = store.try_lock("dev-1", run_id, timedelta(minutes=10))
    results.put(f"{run_id}:{'won' if won else 'lost'}")


@pytest.mark.parametrize("create_first", [True, False], ids=["existing-db", "fresh-db"])
def test_lock_exclusive_across_processes(db_path: Path, create_first: bool) -> None:
    """Four processes racing for one device's lock: exactly one wins, and it holds the lock."""
    if create_first:
        SqliteStateStore(db_path, clock=lambda: T0).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results: multiprocessing.Queue[str] = ctx.Queue()
    workers = [
        ctx.Process(target=_race_for_lock, args=(str(db_path), f"run-{n}", barrier, results))
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
        worker.close()
    results.close()
    results.join_thread()
    winners = [o.split(":")[0] for o in outcomes if o.endswith(":won")]
    assert len(winners) == 1, outcomes
    with SqliteStateStore(db_path, clock=lambda: T0) as store:
        holder = store.lock_holder("dev-1")
    assert holder is not None
    assert holder.run_id == winners[0]


def test_lock_exclusive_across_threads(db_path: Path, clock: _Clock) -> None:
    """Eight threads with their own store instances race for one lock: exactly one wins."""
    barrier = threading.Barrier(8)
    won: list[str] = []

    def race(n: int) -> None:
        with SqliteStateStore(db_path, clock=clock) as store:
            barrier.wait()
            if store.try_lock("dev-1", f"run-{n}", timedelta(minutes=1)):
                won.append(f"run-{n}")

    SqliteStateStore(db_path, clock=clock).close()
    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


def test_corrupt_db_is_a_state_error(db_path: Path, clock: _Clock) -> None:
    """A file that is not a SQLite database yields StateError naming the path."""
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StateError) as info:
        SqliteStateStore(db_path, clock=clock)
    assert str(db_path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_write_ahead_log_is_cut_back_once_it_starts_over(db_path: Path, clock: _Clock) -> None:
    """A log grown past ``wal_size_limit`` is cut back to it when it starts over."""
    limit = 64 * 1024
    wal = db_path.with_name(db_path.name + "-wal")
    with SqliteStateStore(db_path, clock=clock, wal_size_limit=limit) as store:
        for i in range(100):  # each commit appends pages; nothing copies them back yet
            store.start_run(_run(f"run-{i}"))
        grown = wal.stat().st_size
        other = sqlite3.connect(db_path)
        try:  # copy the whole log back into the database, as an autocheckpoint would
            (busy, _, _) = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            other.close()
        store.start_run(_run("run-after"))  # this commit starts the log over
        assert busy == 0
        assert grown > limit
        assert wal.stat().st_size <= limit
        assert store.get_run("run-99") == _run("run-99")
