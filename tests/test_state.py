"""State store: one contract, run against every backend (SQLite and PostgreSQL).

Runs and host results, cool-downs, device leases with fencing, fleet-wide admission, alert
dedup, the queue, approvals with expiry and four eyes, the breaker, heartbeats, schema
versions.  A behaviour only one backend passes is a bug.  SQLite's own ideas (its file, its
write-ahead log) are tested at the end.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from engine.approvals import ApprovalError, decide, expire_approvals
from engine.errors import ConfigError, StateError
from engine.outcomes import HostOutcome, Mode, RunStatus
from engine.server.queue import (
    AlertBatch,
    BreakerRecord,
    FiringInput,
    FiringOutcome,
    QueueItem,
    QueueRoute,
    QueueState,
    RecordedAlerts,
    ResolvedInput,
)
from engine.state import (
    AlertStore,
    ApprovalRecord,
    ApprovalStatus,
    HostRecord,
    Lease,
    RunRecord,
    StateStore,
    open_database,
    sqlite_url,
)
from engine.state.migrations import Migration
from engine.state.postgres import PostgresDatabase
from engine.state.postgres.migrations import MIGRATIONS as PG
from engine.state.sqlite import SqliteStateStore
from engine.state.sqlite.migrations import MIGRATIONS
from tests.support.stores import T0, Backend, Clock

TTL = timedelta(minutes=10)
SHORT = timedelta(seconds=1)  # a lease that the test lets expire (real time on PostgreSQL)


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


def _host(run_id: str, host: str, outcome: HostOutcome = HostOutcome.FIXED) -> HostRecord:
    return HostRecord(
        run_id=run_id, host=host, outcome=outcome, reason="", steps=["s"], finished_at=T0
    )


def _lease(store: StateStore, host: str, run_id: str, ttl: timedelta = TTL) -> Lease:
    lease = store.acquire_lease(host, run_id, holder="ctl-1", ttl=ttl).lease
    assert lease is not None
    return lease


# --------------------------------------------------------------------------- runs


def test_run_and_host_round_trip(store: AlertStore) -> None:
    """A run and its host records come back as stored; finish_run sets status and counts."""
    run = _run(trigger="alert:f00d")
    store.start_run(run)
    assert store.get_run("run-1") == run
    fixed = _host("run-1", "dev-2").model_copy(
        update={"steps": ["restart-wifi", "check"], "finished_at": T0 + timedelta(seconds=30)}
    )
    skipped = HostRecord(
        run_id="run-1",
        host="dev-1",
        outcome=HostOutcome.SKIPPED,
        reason="cooldown: acted 5 minutes ago",
        steps=[],
        finished_at=T0 + timedelta(seconds=5),
    )
    assert store.record_host(fixed)
    assert store.record_host(skipped)
    assert store.host_records("run-1") == [skipped, fixed]
    finished = store.finish_run("run-1", RunStatus.SUCCEEDED, {"fixed": 1, "skipped": 1})
    assert (finished.status, finished.summary) == (
        RunStatus.SUCCEEDED,
        {"fixed": 1, "skipped": 1},
    )
    assert finished.finished_at is not None
    assert store.get_run("run-1") == finished
    assert store.get_run("nope") is None


def test_record_host_replaces_earlier_outcome(store: AlertStore) -> None:
    """Recording a host twice in a run keeps the latest outcome."""
    store.start_run(_run())
    first = _host("run-1", "dev-1", HostOutcome.PLANNED)
    second = first.model_copy(update={"outcome": HostOutcome.FAILED, "reason": "rc=2"})
    store.record_host(first)
    store.record_host(second)
    assert store.host_records("run-1") == [second]


def test_record_hosts_commits_all_or_none(store: AlertStore) -> None:
    """A run's hosts are recorded in one commit; if one cannot be, none of them is."""
    store.start_run(_run())
    hosts = [_host("run-1", f"dev-{i}", HostOutcome.HEALTHY) for i in range(3)]
    store.record_hosts(hosts)
    assert store.host_records("run-1") == hosts
    orphan = _host("ghost", "dev-9")
    replaced = hosts[1].model_copy(update={"outcome": HostOutcome.FAILED})
    never = "cannot record host dev-1 and 1 more: run ghost was never started"
    with pytest.raises(StateError, match=never):
        store.record_hosts([replaced, orphan])
    assert store.host_records("run-1") == hosts  # the replacement was rolled back too
    assert store.host_records("ghost") == []


def test_list_runs_newest_first_and_by_runbook(store: AlertStore) -> None:
    """list_runs returns the newest runs first, limited, optionally of one runbook."""
    for n in range(5):
        runbook = "fix-wifi" if n % 2 == 0 else "fix-disk"
        store.start_run(_run(f"run-{n}", runbook, started_at=T0 + timedelta(minutes=n)))
    assert [r.run_id for r in store.list_runs()] == ["run-4", "run-3", "run-2", "run-1", "run-0"]
    assert [r.run_id for r in store.list_runs(limit=2)] == ["run-4", "run-3"]
    assert [r.run_id for r in store.list_runs(runbook="fix-disk")] == ["run-3", "run-1"]


def test_list_runs_filters_by_host_status_time_and_short_id(store: AlertStore) -> None:
    """Filters combine: runs that reached a host, ended so, started since, or end in an id."""
    for n in range(4):
        store.start_run(_run(f"run-{n}-abc{n}", started_at=T0 + timedelta(minutes=n)))
        store.record_host(_host(f"run-{n}-abc{n}", f"dev-{n % 2}", HostOutcome.PLANNED))
        store.finish_run(f"run-{n}-abc{n}", RunStatus.SUCCEEDED if n else RunStatus.ERROR, {})

    def ids(runs: list[RunRecord]) -> list[str]:
        return [r.run_id[:5] for r in runs]

    assert ids(store.list_runs(host="dev-1")) == ["run-3", "run-1"]
    assert ids(store.list_runs(status=RunStatus.ERROR)) == ["run-0"]
    assert ids(store.list_runs(since=T0 + timedelta(minutes=2))) == ["run-3", "run-2"]
    assert ids(store.list_runs(host="dev-0", since=T0 + timedelta(minutes=1))) == ["run-2"]
    assert ids(store.list_runs(id_suffix="abc2")) == ["run-2"]
    assert store.list_runs(id_suffix="zzz") == []


def test_record_errors_name_the_db(store: AlertStore, backend: Backend) -> None:
    """A duplicate run, a host of an unknown run or finishing an unknown run is a StateError."""
    store.start_run(_run())
    with pytest.raises(StateError, match="run-1 already exists") as info:
        store.start_run(_run())
    assert backend.database.url.split("://")[1].split("/")[-1] in str(info.value)
    with pytest.raises(StateError, match="run ghost was never started"):
        store.record_host(_host("ghost", "dev-1"))
    with pytest.raises(StateError, match="no such run"):
        store.finish_run("ghost", RunStatus.SUCCEEDED, {})


def test_a_finished_run_keeps_its_first_final_status(store: AlertStore) -> None:
    """finish_run on a run already interrupted returns it unchanged: the first end wins."""
    store.start_run(_run())
    assert store.mark_interrupted(T0) == ["run-1"]
    again = store.finish_run("run-1", RunStatus.SUCCEEDED, {"fixed": 1})
    assert (again.status, again.summary) == (RunStatus.INTERRUPTED, {})


def test_mark_interrupted(store: AlertStore) -> None:
    """Runs left running become interrupted at the given time; finished runs are untouched."""
    for run_id in ("run-a", "run-b", "run-c"):
        store.start_run(_run(run_id))
    store.finish_run("run-b", RunStatus.SUCCEEDED, {"fixed": 1})
    later = T0 + timedelta(hours=1)
    assert store.mark_interrupted(later) == ["run-a", "run-c"]
    run_a = store.get_run("run-a")
    assert run_a is not None
    assert (run_a.status, run_a.finished_at) == (RunStatus.INTERRUPTED, later)
    assert store.mark_interrupted(later) == []


def test_cooldown_timestamps(store: AlertStore) -> None:
    """last_acted returns the latest mark_acted per (runbook, host); an older mark never wins."""
    assert store.last_acted("fix-wifi", "dev-1") is None
    store.mark_acted("fix-wifi", "dev-1", T0)
    store.mark_acted("fix-wifi", "dev-1", T0 + timedelta(minutes=10))
    store.mark_acted("fix-wifi", "dev-1", T0 + timedelta(minutes=5))
    store.mark_acted("fix-disk", "dev-1", T0)
    assert store.last_acted("fix-wifi", "dev-1") == T0 + timedelta(minutes=10)
    assert store.last_acted("fix-disk", "dev-1") == T0
    assert store.last_acted("fix-wifi", "dev-2") is None


def test_naive_timestamps_refused(store: AlertStore) -> None:
    """A naive datetime is a programming error, not silently local time."""
    with pytest.raises(ValueError, match="timezone-aware"):
        store.mark_acted("fix-wifi", "dev-1", datetime(2025, 1, 1))


def test_audit_head_keeps_the_highest_seq(store: AlertStore) -> None:
    """The saved audit head only moves forward, whatever order processes save it in."""
    assert store.audit_head() is None
    store.save_audit_head(5, "e" * 64)
    store.save_audit_head(3, "c" * 64)
    assert store.audit_head() == (5, "e" * 64)
    store.save_audit_head(6, "f" * 64)
    assert store.audit_head() == (6, "f" * 64)


# --------------------------------------------------------------------------- leases


def test_lease_reentrant_and_exclusive(store: AlertStore) -> None:
    """The holder may re-take its lease (same token); another run may not until it is released."""
    first = _lease(store, "dev-1", "run-1")
    again = _lease(store, "dev-1", "run-1")
    assert again.token == first.token
    assert again.expires_at >= first.expires_at
    refused = store.acquire_lease("dev-1", "run-2", holder="ctl-2", ttl=TTL)
    assert refused.lease is None
    assert refused.held_by is not None
    assert refused.held_by.run_id == "run-1"
    other = _lease(store, "dev-2", "run-2")
    assert other.token > first.token
    holder = store.lock_holder("dev-1")
    assert holder is not None
    assert (holder.run_id, holder.holder) == ("run-1", "ctl-1")
    assert not store.release_lease(other.model_copy(update={"host": "dev-1"}))
    assert store.release_lease(again)
    assert store.lock_holder("dev-1") is None
    taken = _lease(store, "dev-1", "run-2")
    assert taken.token > other.token
    assert not store.release_lease(first)  # an old token releases nothing


def test_lease_ttl_must_be_positive(store: AlertStore) -> None:
    """A zero or negative ttl is refused."""
    with pytest.raises(ValueError, match="positive"):
        store.acquire_lease("dev-1", "run-1", holder="ctl", ttl=timedelta(0))


def test_an_expired_lease_of_a_running_run_is_reported_not_silently_taken(
    store: AlertStore, backend: Backend
) -> None:
    """Once a lease expires, the next run gets the device and the old run is interrupted."""
    store.start_run(_run("run-1"))
    old = _lease(store, "dev-1", "run-1", SHORT)
    backend.advance(SHORT + timedelta(milliseconds=200))
    assert store.lock_holder("dev-1") is None
    grant = store.acquire_lease("dev-1", "run-2", holder="ctl-2", ttl=TTL)
    assert grant.lease is not None
    assert grant.lease.token > old.token
    (interrupted,) = grant.interrupted
    assert (interrupted.run_id, interrupted.host, interrupted.token) == (
        "run-1",
        "dev-1",
        old.token,
    )
    assert "expired" in interrupted.reason
    run = store.get_run("run-1")
    assert run is not None
    assert run.status is RunStatus.INTERRUPTED
    # The old holder's late writes are refused: its lease is no longer the device's.
    assert not store.record_host(_host("run-1", "dev-1"), lease=old)
    assert not store.mark_acted("fix-wifi", "dev-1", T0, lease=old)
    assert store.host_records("run-1") == []
    assert store.last_acted("fix-wifi", "dev-1") is None


def test_renewal_keeps_a_lease_and_reaping_finds_the_ones_that_stopped(
    store: AlertStore, backend: Backend
) -> None:
    """Renewed leases live on; leases nobody renewed are reaped and their runs interrupted."""
    store.start_run(_run("run-1"))
    store.start_run(_run("run-2"))
    kept = _lease(store, "dev-1", "run-1", SHORT)
    dropped = _lease(store, "dev-2", "run-2", SHORT)
    backend.advance(SHORT / 2)
    (renewed,) = store.renew_leases([kept], SHORT * 2)
    assert renewed.token == kept.token
    backend.advance(SHORT / 2 + timedelta(milliseconds=200))
    (reaped,) = store.reap_expired()
    assert (reaped.run_id, reaped.host) == ("run-2", "dev-2")
    assert store.reap_expired() == []
    assert store.renew_leases([kept, dropped], TTL) == [
        store.lock_holder("dev-1"),
    ]
    assert store.record_host(_host("run-1", "dev-1"), lease=kept)
    assert store.mark_acted("fix-wifi", "dev-1", T0, lease=kept)
    assert not store.record_host(_host("run-2", "dev-2"), lease=dropped)


def _race_for_lease(
    url: str, run_id: str, barrier: Barrier, results: multiprocessing.Queue[str]
) -> None:
    """Child process body: open the database, wait for the others, try the lease, report."""
    with open_database(url, clock=lambda: T0) as database:
        store = database.store()
        barrier.wait()
        won = store.acquire_lease("dev-1", run_id, holder=run_id, ttl=TTL).lease is not None
        store.close()
    results.put(f"{run_id}:{'won' if won else 'lost'}")


def test_lease_exclusive_across_processes(backend: Backend) -> None:
    """Four processes racing for one device's lease: exactly one wins, and it holds the lease."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results: multiprocessing.Queue[str] = ctx.Queue()
    workers = [
        ctx.Process(target=_race_for_lease, args=(backend.url, f"run-{n}", barrier, results))
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
    with backend.store() as store:
        holder = store.lock_holder("dev-1")
    assert holder is not None
    assert holder.run_id == winners[0]


def _race(count: int, body: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait()
            body(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_lease_exclusive_across_threads(backend: Backend) -> None:
    """Eight threads with their own stores race for one lease: exactly one wins."""
    won: list[str] = []
    stores = [backend.store() for _ in range(8)]

    def race(n: int) -> None:
        if stores[n].acquire_lease("dev-1", f"run-{n}", holder="c", ttl=TTL).lease is not None:
            won.append(f"run-{n}")

    _race(8, race)
    for store in stores:
        store.close()
    assert len(won) == 1


# --------------------------------------------------------------------------- admission


def test_two_runs_cannot_together_exceed_the_blast_radius(store: AlertStore) -> None:
    """Admissions count the hosts other running runs hold; one run's end frees its hosts."""
    store.start_run(_run("run-1"))
    store.start_run(_run("run-2"))
    store.start_run(_run("run-3", runbook="fix-disk"))
    first = store.admit_hosts("fix-wifi", "run-1", ["a", "b"], allowed=3, ttl=TTL)
    assert (first.admitted, first.in_flight) == (True, ())
    second = store.admit_hosts("fix-wifi", "run-2", ["c", "d"], allowed=3, ttl=TTL)
    assert (second.admitted, second.in_flight) == (False, ("a", "b"))
    assert store.admit_hosts("fix-wifi", "run-2", ["c"], allowed=3, ttl=TTL).admitted
    assert store.admit_hosts("fix-disk", "run-3", ["a", "b", "c"], allowed=3, ttl=TTL).admitted
    store.finish_run("run-1", RunStatus.SUCCEEDED, {})
    assert store.admit_hosts("fix-wifi", "run-2", ["c", "d", "e"], allowed=3, ttl=TTL).admitted


def test_admissions_expire_unless_renewed(store: AlertStore, backend: Backend) -> None:
    """An admission nobody renews stops counting; a renewed one keeps counting."""
    store.start_run(_run("run-1"))
    store.start_run(_run("run-2"))
    store.start_run(_run("run-3"))
    assert store.admit_hosts("fix-wifi", "run-1", ["a"], allowed=2, ttl=SHORT).admitted
    assert store.admit_hosts("fix-wifi", "run-2", ["b"], allowed=2, ttl=SHORT).admitted
    backend.advance(SHORT / 2)
    assert store.renew_admission("run-1", SHORT * 3)
    backend.advance(SHORT / 2 + timedelta(milliseconds=200))
    third = store.admit_hosts("fix-wifi", "run-3", ["c"], allowed=2, ttl=TTL)
    assert (third.admitted, third.in_flight) == (True, ("a",))
    assert not store.renew_admission("run-9", TTL)


def test_concurrent_admissions_never_exceed_the_cap(backend: Backend) -> None:
    """Eight runs admitting two hosts each at once against a cap of five: at most two get in."""
    stores = [backend.store() for _ in range(8)]
    for n in range(8):
        stores[0].start_run(_run(f"run-{n}"))
    admitted: list[int] = []

    def admit(n: int) -> None:
        hosts = [f"h{n}a", f"h{n}b"]
        if stores[n].admit_hosts("fix-wifi", f"run-{n}", hosts, allowed=5, ttl=TTL).admitted:
            admitted.append(n)

    _race(8, admit)
    for store in stores:
        store.close()
    assert len(admitted) == 2


# --------------------------------------------------------------------------- alerts and queue


def _firing(fingerprint: str, host: str, runbook: str = "engine-down") -> FiringInput:
    return FiringInput(
        fingerprint=fingerprint,
        starts_at=T0,
        alertname="BalenaEngineDown",
        labels={"instance": host, "note": 'it\'s "quoted"; DROP TABLE runs'},
        outcome=FiringOutcome.QUEUED,
        reason="",
        routes=(QueueRoute(runbook=runbook, host=host, trigger_mode="apply", mode=Mode.APPLY),),
    )


def _resolved(fingerprint: str) -> ResolvedInput:
    return ResolvedInput(
        fingerprint=fingerprint, starts_at=T0, alertname="BalenaEngineDown", labels={}
    )


def _claim(store: AlertStore, owner: str = "me", run_id: str = "r") -> QueueItem | None:
    return store.claim_queue_item(
        owner, now=T0, max_age=timedelta(hours=1), hold_reason=None, new_run_id=lambda: run_id
    ).item


def test_a_firing_is_queued_once_and_its_copies_are_duplicates(store: AlertStore) -> None:
    """The same firing again (or twice in one notification) is only counted as seen again."""
    recorded = store.record_alerts(
        [_firing("a1", "dev-a"), _firing("a1", "dev-a")], [], now=T0, hold_reason=None
    )
    assert (len(recorded.new), len(recorded.deduplicated), len(recorded.queued)) == (1, 1, 1)
    again = store.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
    assert (len(again.deduplicated), again.queued) == (1, ())
    (firing,) = store.list_firings()
    assert firing.times_seen == 3
    assert firing.labels["note"] == 'it\'s "quoted"; DROP TABLE runs'
    assert list(recorded.queued) == store.list_queue()
    assert store.firing_counts()[FiringOutcome.QUEUED] == 1


def test_one_firing_posted_to_many_stores_at_once_queues_once(backend: Backend) -> None:
    """Eight stores record the same firing at the same instant: exactly one queues it."""
    stores = [backend.store() for _ in range(8)]
    queued: list[int] = []

    def record(n: int) -> None:
        result = stores[n].record_alerts([_firing("f1", "dev-a")], [], now=T0, hold_reason=None)
        queued.extend(i.item_id for i in result.queued)

    _race(8, record)
    assert len(queued) == 1
    assert len(stores[0].list_queue()) == 1
    (firing,) = stores[0].list_firings()
    assert firing.times_seen == 8
    for store in stores:
        store.close()


def test_a_resolved_alert_cancels_its_queued_runs(store: AlertStore) -> None:
    """Resolving a firing cancels its runs not started; a late firing copy is a duplicate."""
    store.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
    done = store.record_alerts([], [_resolved("a1"), _resolved("zz")], now=T0, hold_reason=None)
    assert [k.fingerprint for k in done.resolved] == ["a1", "zz"]
    assert [i.state for i in done.cancelled] == [QueueState.CANCELLED]
    late = store.record_alerts([_firing("zz", "dev-b")], [], now=T0, hold_reason=None)
    assert (len(late.deduplicated), late.queued) == (1, ())
    again = store.record_alerts([], [_resolved("a1")], now=T0, hold_reason=None)
    assert len(again.deduplicated) == 1


def test_warning_and_critical_in_one_notification_queue_one_run(store: AlertStore) -> None:
    """Two firings of one symptom in one notification: one run, the second firing joins it."""
    recorded = store.record_alerts(
        [
            _firing("warn", "dev-a", "disk-full"),
            _firing("crit", "dev-a", "disk-full"),
            _firing("other", "dev-a", "engine-down"),  # another runbook: a run of its own
            _firing("elsewhere", "dev-b", "disk-full"),  # another device: a run of its own
        ],
        [],
        now=T0,
        hold_reason=None,
    )
    assert [(i.fingerprint, i.runbook, i.host) for i in recorded.queued] == [
        ("warn", "disk-full", "dev-a"),
        ("other", "engine-down", "dev-a"),
        ("elsewhere", "disk-full", "dev-b"),
    ]
    item = recorded.queued[0]
    (joined,) = recorded.coalesced
    assert (joined.fingerprint, joined.item_id, joined.state) == (
        "crit",
        item.item_id,
        QueueState.QUEUED,
    )
    outcomes = {f.fingerprint: (f.outcome, f.reason) for f in store.list_firings()}
    assert outcomes["warn"] == (FiringOutcome.QUEUED, "")
    assert outcomes["crit"] == (
        FiringOutcome.COALESCED,
        f"joined queue item {item.item_id} (queued)",
    )
    assert store.firing_counts()[FiringOutcome.COALESCED] == 1
    assert len(store.list_queue()) == 3
    firings = store.item_firings([item.item_id, recorded.queued[1].item_id])
    assert [(f.item_id, f.fingerprint, f.status) for f in firings] == [
        (item.item_id, "warn", "firing"),
        (item.item_id, "crit", "firing"),
        (recorded.queued[1].item_id, "other", "firing"),
    ]
    assert store.item_firings([]) == []


def test_a_queued_run_is_cancelled_only_when_its_last_firing_resolves(store: AlertStore) -> None:
    """A resolved firing cancels its queued run only once no firing it runs for still fires."""
    queued = store.record_alerts(
        [_firing("warn", "dev-a"), _firing("crit", "dev-a")], [], now=T0, hold_reason=None
    ).queued
    first = store.record_alerts([], [_resolved("warn")], now=T0, hold_reason=None)
    assert (len(first.resolved), first.cancelled) == (1, ())
    assert [i.state for i in store.list_queue()] == [QueueState.QUEUED]
    assert store.count_alerting_devices(T0, stop_at=10) == 1  # crit still fires on dev-a
    last = store.record_alerts([], [_resolved("crit")], now=T0, hold_reason=None)
    assert [(i.item_id, i.state) for i in last.cancelled] == [
        (queued[0].item_id, QueueState.CANCELLED)
    ]
    assert "resolved before the run started" in last.cancelled[0].reason
    assert store.count_alerting_devices(T0, stop_at=10) == 0


def test_a_firing_joins_a_running_run_which_resolving_never_cuts_short(
    store: AlertStore,
) -> None:
    """A firing while the run is running joins it; resolving every firing leaves it running."""
    store.record_alerts([_firing("warn", "dev-a")], [], now=T0, hold_reason=None)
    running = _claim(store, run_id="r1")
    assert running is not None
    recorded = store.record_alerts([_firing("crit", "dev-a")], [], now=T0, hold_reason=None)
    assert recorded.queued == ()
    assert [(j.item_id, j.state) for j in recorded.coalesced] == [
        (running.item_id, QueueState.RUNNING)
    ]
    (crit,) = store.list_firings(FiringOutcome.COALESCED)
    assert crit.reason == f"joined queue item {running.item_id} (running)"
    done = store.record_alerts([], [_resolved("warn"), _resolved("crit")], now=T0, hold_reason=None)
    assert done.cancelled == ()
    assert [i.state for i in store.list_queue()] == [QueueState.RUNNING]
    assert _claim(store, run_id="r2") is None  # nothing else was queued


def test_a_firing_after_the_run_finished_queues_a_new_run(store: AlertStore) -> None:
    """Once the run is done, the next firing of the symptom queues a run again."""
    store.record_alerts([_firing("warn", "dev-a")], [], now=T0, hold_reason=None)
    first = _claim(store, run_id="r1")
    assert first is not None
    assert store.finish_queue_item(first.item_id, "me", QueueState.DONE, now=T0)
    again = store.record_alerts([_firing("crit", "dev-a")], [], now=T0, hold_reason=None)
    assert [i.fingerprint for i in again.queued] == ["crit"]
    assert again.coalesced == ()
    assert again.queued[0].item_id != first.item_id


def test_one_group_commit_sees_each_notification_as_the_one_before_left_it(
    store: AlertStore,
) -> None:
    """In one group commit a run queued, then cancelled, is joined, then queued anew."""
    first, joined, cancelled, fresh = store.record_notifications(
        [
            AlertBatch(firing=(_firing("warn", "dev-a"),)),
            AlertBatch(firing=(_firing("crit", "dev-a"),)),
            AlertBatch(resolved=(_resolved("warn"), _resolved("crit"))),
            AlertBatch(firing=(_firing("again", "dev-a"), _firing("again", "dev-a"))),
        ],
        now=T0,
        hold_reason=None,
    )
    (item,) = first.queued
    assert [(j.fingerprint, j.item_id) for j in joined.coalesced] == [("crit", item.item_id)]
    assert [i.item_id for i in cancelled.cancelled] == [item.item_id]
    assert [i.fingerprint for i in fresh.queued] == ["again"]
    assert (fresh.coalesced, len(fresh.deduplicated)) == ((), 1)
    assert fresh.queued[0].item_id != item.item_id
    outcomes = {f.fingerprint: f.outcome for f in store.list_firings()}
    assert outcomes == {
        "warn": FiringOutcome.QUEUED,
        "crit": FiringOutcome.COALESCED,
        "again": FiringOutcome.QUEUED,
    }


def test_held_runs_are_never_joined(store: AlertStore) -> None:
    """While the breaker holds runs each firing is held on its own; later ones are not joined."""
    held = store.record_alerts(
        [_firing("warn", "dev-a"), _firing("crit", "dev-a")], [], now=T0, hold_reason="storm"
    )
    assert (len(held.held), held.coalesced) == (2, ())
    after = store.record_alerts([_firing("again", "dev-a")], [], now=T0, hold_reason=None)
    assert [i.fingerprint for i in after.queued] == ["again"]
    assert after.coalesced == ()


def test_two_stores_receiving_two_firings_of_one_symptom_at_once_queue_one_run(
    backend: Backend,
) -> None:
    """Two replicas each record one firing of a symptom at the same instant: one run, joined."""
    stores = [backend.store() for _ in range(2)]
    results: list[RecordedAlerts] = []
    for round_ in range(5):  # several rounds: the race must come out right every time

        def record(n: int, round_: int = round_) -> None:
            firing = _firing(f"f{round_}-{n}", f"dev-{round_}")
            results.append(stores[n].record_alerts([firing], [], now=T0, hold_reason=None))

        _race(2, record)
    for store in stores:
        store.close()
    with backend.store() as store:
        items = store.list_queue()
        firings = store.item_firings([i.item_id for i in items])
    assert sorted(i.host for i in items) == [f"dev-{n}" for n in range(5)]
    assert sum(len(r.queued) for r in results) == 5
    assert sum(len(r.coalesced) for r in results) == 5
    assert len(firings) == 10
    for item in items:
        assert {f.fingerprint for f in firings if f.item_id == item.item_id} == {
            f"f{item.host[-1]}-0",
            f"f{item.host[-1]}-1",
        }


def test_claims_oldest_first_one_run_per_device_at_a_time(store: AlertStore) -> None:
    """Workers get the oldest item whose device has no run in progress."""
    store.record_alerts(
        [_firing("a1", "dev-a"), _firing("a2", "dev-a", "other"), _firing("b1", "dev-b")],
        [],
        now=T0,
        hold_reason=None,
    )
    ids = iter(["r1", "r2", "r3"])

    def claim() -> QueueItem | None:
        return store.claim_queue_item(
            "me", now=T0, max_age=timedelta(hours=1), hold_reason=None, new_run_id=lambda: next(ids)
        ).item

    first, second, third = claim(), claim(), claim()
    assert first is not None
    assert second is not None
    assert (first.fingerprint, first.run_id) == ("a1", "r1")
    assert second.fingerprint == "b1"
    assert third is None  # a2 waits: dev-a is busy
    assert store.finish_queue_item(first.item_id, "me", QueueState.DONE, now=T0)
    assert not store.finish_queue_item(first.item_id, "me", QueueState.DONE, now=T0)
    nxt = claim()
    assert nxt is not None
    assert nxt.fingerprint == "a2"


def test_concurrent_claims_never_share_an_item_or_a_device(backend: Backend) -> None:
    """Eight stores claim at once from six items on four devices: four distinct claims."""
    with backend.store() as store:
        store.record_alerts(
            [_firing(f"f{n}", f"dev-{n % 4}") for n in range(6)], [], now=T0, hold_reason=None
        )
    stores = [backend.store() for _ in range(8)]
    claimed: list[tuple[int, str]] = []

    def claim(n: int) -> None:
        item = (
            stores[n]
            .claim_queue_item(
                f"owner-{n}",
                now=T0,
                max_age=timedelta(hours=1),
                hold_reason=None,
                new_run_id=lambda: f"run-{n}",
            )
            .item
        )
        if item is not None:
            claimed.append((item.item_id, item.host))

    _race(8, claim)
    for store in stores:
        store.close()
    assert len(claimed) == 4
    assert len({i for i, _ in claimed}) == 4
    assert len({h for _, h in claimed}) == 4


def test_stale_items_expire_and_an_open_breaker_holds_them(store: AlertStore) -> None:
    """An item queued longer than max_age is expired; with a hold reason all are held."""
    store.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
    claim = store.claim_queue_item(
        "me",
        now=T0 + timedelta(hours=2),
        max_age=timedelta(hours=1),
        hold_reason=None,
        new_run_id=lambda: "r1",
    )
    assert claim.item is None
    assert [i.state for i in claim.expired] == [QueueState.EXPIRED]
    store.record_alerts([_firing("b1", "dev-b")], [], now=T0, hold_reason=None)
    held = store.claim_queue_item(
        "me", now=T0, max_age=timedelta(hours=1), hold_reason="storm", new_run_id=lambda: "r"
    )
    assert held.item is None
    assert {(i.state, i.reason) for i in held.held} == {(QueueState.HELD, "storm")}
    recorded = store.record_alerts([_firing("c1", "dev-c")], [], now=T0, hold_reason="open")
    assert list(recorded.held) == [
        i for i in store.list_queue(QueueState.HELD) if i.reason == "open"
    ]


def test_interrupting_marks_item_and_run_and_frees_the_lease(store: AlertStore) -> None:
    """A claimed item of a dead process becomes interrupted (never queued again), with its run."""
    store.record_alerts([_firing("a1", "dev-a")], [], now=T0, hold_reason=None)
    item = store.claim_queue_item(
        "dead", now=T0, max_age=timedelta(hours=1), hold_reason=None, new_run_id=lambda: "r1"
    ).item
    assert item is not None
    store.start_run(_run("r1", "engine-down", trigger="alert:a1"))
    _lease(store, "dev-a", "r1")
    (interrupted,) = store.interrupt_running(now=T0, reason="server died")
    assert interrupted.state is QueueState.INTERRUPTED
    run = store.get_run("r1")
    assert run is not None
    assert run.status is RunStatus.INTERRUPTED
    assert store.lock_holder("dev-a") is None
    assert _claim(store, run_id="r2") is None


def test_items_of_a_controller_whose_heartbeat_stopped_are_interrupted(
    store: AlertStore, backend: Backend
) -> None:
    """A controller that stopped renewing its heartbeat loses its running items; a live one not."""
    store.record_alerts(
        [_firing("a1", "dev-a"), _firing("b1", "dev-b")], [], now=T0, hold_reason=None
    )
    store.heartbeat("dead", SHORT)
    store.heartbeat("alive", TTL)
    assert _claim(store, "dead", "r1") is not None
    assert _claim(store, "alive", "r2") is not None
    store.start_run(_run("r1", "engine-down"))
    assert store.interrupt_orphans(now=T0) == []
    backend.advance(SHORT + timedelta(milliseconds=200))
    (orphan,) = store.interrupt_orphans(now=T0)
    assert (orphan.owner, orphan.state) == ("dead", QueueState.INTERRUPTED)
    assert "dead" in orphan.reason
    run = store.get_run("r1")
    assert run is not None
    assert run.status is RunStatus.INTERRUPTED
    assert store.queue_counts()[QueueState.RUNNING] == 1


def test_latest_queued_per_host_reads_the_items_added_since(store: AlertStore) -> None:
    """Per host the last time a run was queued, from the items after a given id only."""
    store.record_alerts(
        [_firing("a1", "dev-a"), _firing("b1", "dev-b")], [], now=T0, hold_reason=None
    )
    last, latest = store.latest_queued_per_host(0)
    assert latest == {"dev-a": T0, "dev-b": T0}
    later = T0 + timedelta(minutes=1)
    store.record_alerts([_firing("a2", "dev-a", "other")], [], now=later, hold_reason=None)
    last2, latest2 = store.latest_queued_per_host(last)
    assert (last2 > last, latest2) == (True, {"dev-a": later})
    assert store.latest_queued_per_host(last2) == (last2, {})
    assert store.count_alerting_devices(T0, stop_at=10) == 2
    store.record_alerts([], [_resolved("b1")], now=later, hold_reason=None)
    assert store.count_alerting_devices(T0, stop_at=10) == 1


def test_failed_items_are_counted_for_the_breaker_and_the_breaker_is_saved(
    store: AlertStore,
) -> None:
    """Runs ending unsuccessfully are counted since a time; the breaker round-trips."""
    store.record_alerts(
        [_firing("a1", "dev-a"), _firing("b1", "dev-b")], [], now=T0, hold_reason=None
    )
    first, second = _claim(store, run_id="r1"), _claim(store, run_id="r2")
    assert first is not None
    assert second is not None
    store.finish_queue_item(
        first.item_id, "me", QueueState.DONE, now=T0, run_status=RunStatus.DEGRADED
    )
    store.finish_queue_item(
        second.item_id, "me", QueueState.DONE, now=T0, run_status=RunStatus.SUCCEEDED
    )
    assert store.count_failed_items(T0) == 1
    assert store.count_failed_items(T0 + timedelta(seconds=1)) == 0
    assert store.breaker_state() is None
    record = BreakerRecord(open=True, reason="storm", opened_at=T0, reset_at=None)
    store.save_breaker(record)
    assert store.breaker_state() == record


# --------------------------------------------------------------------------- approvals


def _approval(approval_id: str = "ap-1", **changes: object) -> ApprovalRecord:
    base = ApprovalRecord(
        approval_id=approval_id,
        runbook="fix-wifi",
        source="user:alice",
        requested_by="alice",
        requested_at=T0,
        expires_at=T0 + timedelta(hours=1),
        four_eyes=True,
        plan={"digest": "sha256:d", "plan": {"hosts": []}},
    )
    return base.model_copy(update=changes)


def test_approvals_round_trip_expire_and_need_four_eyes(store: AlertStore) -> None:
    """Approvals are listed newest first; expiry closes them; the requester cannot approve."""
    store.add_approval(_approval("ap-1"))
    store.add_approval(_approval("ap-2", requested_at=T0 + timedelta(minutes=1)))
    store.add_approval(_approval("ap-3", expires_at=T0 + timedelta(minutes=5)))
    assert store.get_approval("ap-1") == _approval("ap-1")
    assert [a.approval_id for a in store.list_approvals()][:1] == ["ap-2"]
    with pytest.raises(ApprovalError, match="four eyes"):
        decide(store, "ap-1", approver="alice", approve=True, now=T0)
    granted = decide(store, "ap-1", approver="bob", approve=True, now=T0, reason="ok")
    assert (granted.status, granted.decided_by, granted.decided_at) == (
        ApprovalStatus.APPROVED,
        "bob",
        T0,
    )
    later = T0 + timedelta(minutes=10)
    assert [a.approval_id for a in expire_approvals(store, later)] == ["ap-3"]
    with pytest.raises(ApprovalError, match="already expired"):
        decide(store, "ap-3", approver="bob", approve=True, now=later)
    assert [a.approval_id for a in store.list_approvals(ApprovalStatus.PENDING)] == ["ap-2"]


def test_two_approvers_at_once_one_decision(backend: Backend) -> None:
    """Eight approvers decide one approval at the same instant: exactly one succeeds."""
    with backend.store() as store:
        store.add_approval(_approval("ap-1", four_eyes=False))
    stores = [backend.store() for _ in range(8)]
    won: list[str] = []

    def approve(n: int) -> None:
        decided = stores[n].transition_approval(
            "ap-1",
            from_status=ApprovalStatus.PENDING,
            to_status=ApprovalStatus.APPLYING,
            at=T0,
            reason="",
            by=f"approver-{n}",
        )
        if decided is not None:
            won.append(f"approver-{n}")

    _race(8, approve)
    record = stores[0].get_approval("ap-1")
    for store in stores:
        store.close()
    assert len(won) == 1
    assert record is not None
    assert (record.status, record.decided_by) == (ApprovalStatus.APPLYING, won[0])


def test_two_approvers_deciding_at_once_one_decides_the_other_is_told(
    backend: Backend,
) -> None:
    """Eight people approve one approval at the same instant (claiming it): one applies it."""
    with backend.store() as store:
        store.add_approval(_approval("ap-1"))
    stores = [backend.store() for _ in range(8)]
    decided: list[str] = []
    refused: list[str] = []

    def approve(n: int) -> None:
        try:
            decide(stores[n], "ap-1", approver=f"p{n}", approve=True, now=T0, claim=True)
        except ApprovalError as exc:
            refused.append(str(exc))
        else:
            decided.append(f"p{n}")

    _race(8, approve)
    for store in stores:
        store.close()
    assert len(decided) == 1
    assert len(refused) == 7
    assert all("already applying" in r or "someone else" in r for r in refused)


# --------------------------------------------------------------------------- schema


def test_the_factory_opens_either_url_and_refuses_others(tmp_path: Path) -> None:
    """sqlite:/// opens the embedded store; an unknown scheme is a configuration error."""
    with open_database(sqlite_url(tmp_path / "s.db"), clock=Clock()) as database:
        store: StateStore = database.store()
        assert store.list_runs() == []
        store.close()
    with pytest.raises(ConfigError, match="expected sqlite"):
        open_database("mysql://root:secret@db/x", clock=Clock())


def test_a_database_newer_than_the_engine_is_refused(backend: Backend) -> None:
    """A schema migrated by a newer engine is refused, naming the database and versions."""
    if backend.name == "sqlite":
        path = Path(backend.url.removeprefix("sqlite:///"))
        extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "future", ("CREATE TABLE f (x)",)))
        SqliteStateStore(path, clock=Clock(), migrations=extra).close()
    else:
        future = (*PG, Migration(len(PG) + 1, "future", ("CREATE TABLE f (x int)",)))
        PostgresDatabase(backend.url, clock=Clock(), migrations=future).close()
    with pytest.raises(StateError, match="newer than this engine") as info:
        open_database(backend.url, clock=Clock()).store().close()
    assert "upgrade remediate" in str(info.value)


#: Rows an engine before coalescing wrote: three runs queued for one symptom of dev-a (the
#: second running), one for dev-b (``T0`` stands for the time).
_T0_TEXT = "'2025-03-01T12:00:00.000000+00:00'"
_BEFORE_COALESCING = (
    (
        "INSERT INTO alert_firings (fingerprint, starts_at, alertname, labels, status, outcome,"
        " reason, received_at, last_seen_at, times_seen)"
        " SELECT column1, T0, 'DiskFull', '{}', 'firing', 'queued', '', T0, T0, 1 FROM (VALUES"
        " ('a1'), ('a2'), ('a3'), ('b1')) AS f"
    ),
    (
        "INSERT INTO alert_queue (fingerprint, starts_at, runbook, host, trigger_mode, mode, state,"
        " reason, enqueued_at) SELECT column1, T0, 'disk-full', column2, 'apply', 'apply', column3,"
        " '', T0"
        " FROM (VALUES ('a1', 'dev-a', 'queued'), ('a2', 'dev-a', 'running'),"
        " ('a3', 'dev-a', 'queued'), ('b1', 'dev-b', 'queued')) AS q ORDER BY column1"
    ),
)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_runs_queued_side_by_side_before_coalescing_are_joined_by_the_upgrade(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Upgrading keeps the running run of a symptom; the others' firings join it, they cancel."""
    if kind == "sqlite":
        url = sqlite_url(tmp_path / "state.db")
        with SqliteStateStore(tmp_path / "state.db", clock=Clock(), migrations=MIGRATIONS[:5]):
            pass
        with sqlite3.connect(tmp_path / "state.db") as raw:
            for statement in _BEFORE_COALESCING:
                raw.execute(statement.replace("T0", _T0_TEXT))
        raw.close()
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"before_coalescing_{id(tmp_path)}"
        server.execute(f"CREATE DATABASE {name}")
        url = server.url(name)
        PostgresDatabase(url, clock=Clock(), migrations=PG[:2]).close()
        for statement in _BEFORE_COALESCING:
            server.execute(statement.replace("T0", f"{_T0_TEXT}::timestamptz"), dbname=name)
    with open_database(url, clock=Clock()) as database, database.store() as store:
        items = {i.fingerprint: i for i in store.list_queue()}
        assert {fp: i.state for fp, i in items.items()} == {
            "a1": QueueState.CANCELLED,
            "a2": QueueState.RUNNING,
            "a3": QueueState.CANCELLED,
            "b1": QueueState.QUEUED,
        }
        running = items["a2"].item_id
        assert items["a1"].reason == f"coalesced into queue item {running} by the schema upgrade"
        joined = store.item_firings([running, items["b1"].item_id])
        assert [(f.item_id, f.fingerprint) for f in joined] == [
            (running, "a2"),
            (running, "a1"),
            (running, "a3"),
            (items["b1"].item_id, "b1"),
        ]
        later = store.record_alerts(
            [_firing("a4", "dev-a", "disk-full")], [], now=T0, hold_reason=None
        )
        assert [j.item_id for j in later.coalesced] == [running]


# --------------------------------------------------------------------------- SQLite's own


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "remediate.db"


def test_sqlite_migrations_idempotent_on_reopen(db_path: Path) -> None:
    """Reopening applies nothing twice and keeps the data; the file is in WAL mode."""
    with SqliteStateStore(db_path, clock=Clock()) as first:
        assert first.schema_version() == len(MIGRATIONS)
        first.start_run(_run())
    with SqliteStateStore(db_path, clock=Clock()) as second:
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


def test_sqlite_appended_migration_applied_on_open(db_path: Path) -> None:
    """A migration appended later is applied to an existing database, once."""
    extra = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "alerts", ("CREATE TABLE alerts (x)",)))
    with SqliteStateStore(db_path, clock=Clock()) as store:
        store.start_run(_run())
    for _ in range(2):
        with SqliteStateStore(db_path, clock=Clock(), migrations=extra) as store:
            assert store.schema_version() == len(extra)
            assert store.get_run("run-1") is not None


def test_migrations_must_be_numbered_in_order(db_path: Path) -> None:
    """Gaps or reordering in the migration list are a programming error."""
    broken = (*MIGRATIONS, Migration(len(MIGRATIONS) + 2, "gap", ("SELECT 1",)))
    with pytest.raises(ValueError, match="in order"):
        SqliteStateStore(db_path, clock=Clock(), migrations=broken)


def test_sqlite_locks_of_an_older_engine_become_leases(db_path: Path) -> None:
    """Migration 5 keeps a lock taken before leases existed, as a lease with token 0."""
    with SqliteStateStore(db_path, clock=Clock(), migrations=MIGRATIONS[:4]) as old:
        old.start_run(_run())
        old._db.execute(  # what the engine before leases wrote
            "INSERT INTO device_locks VALUES ('dev-1', 'run-1', ?, ?)",
            (T0.isoformat(), (T0 + TTL).isoformat()),
        )
    with SqliteStateStore(db_path, clock=Clock()) as new:
        holder = new.lock_holder("dev-1")
        assert holder is not None
        assert (holder.run_id, holder.token) == ("run-1", 0)
        assert new.acquire_lease("dev-1", "run-2", holder="c", ttl=TTL).lease is None


def test_corrupt_db_is_a_state_error(db_path: Path) -> None:
    """A file that is not a SQLite database yields StateError naming the path."""
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(StateError) as info:
        SqliteStateStore(db_path, clock=Clock())
    assert str(db_path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_write_ahead_log_is_cut_back_once_it_starts_over(db_path: Path) -> None:
    """A log grown past ``wal_size_limit`` is cut back to it when it starts over."""
    limit = 64 * 1024
    wal = db_path.with_name(db_path.name + "-wal")
    with SqliteStateStore(db_path, clock=Clock(), wal_size_limit=limit) as store:
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
