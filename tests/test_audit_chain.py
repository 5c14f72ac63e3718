"""The audit chain in PostgreSQL: appended with the state change it records, INSERT-only.

A run's events land in the database's chain in commit order; a rolled-back change leaves no
record; the application role may append but not read, edit or delete; ``audit verify``
checks the chain in the database and ``audit export`` writes the JSON lines that
``audit verify FILE`` checks offline, both printing the head; edits and a cut tail are named.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog

from engine.audit import AuditSink, audit_unit, configure_audit, verify_audit
from engine.errors import StateError
from engine.outcomes import Mode
from engine.state import RunRecord, StateDatabase, open_database
from tests.support.cli import run_remediate
from tests.support.postgres import PostgresServer
from tests.support.stores import T0, Clock


@pytest.fixture
def database(postgres_url: str) -> Iterator[StateDatabase]:
    """A fresh PostgreSQL state database."""
    with open_database(postgres_url, clock=Clock()) as opened:
        yield opened


@pytest.fixture
def chain(database: StateDatabase) -> Iterator[AuditSink]:
    """Events from structlog go to the database's chain."""
    sink = database.audit_log()
    assert sink is not None
    configure_audit(sink, clock=Clock())
    yield sink
    structlog.reset_defaults()


def _records(url: str) -> list[dict[str, object]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT record FROM audit_chain ORDER BY seq").fetchall()
    return [json.loads(r[0]) for r in rows]


def test_an_event_commits_with_its_state_change_or_not_at_all(
    database: StateDatabase, chain: AuditSink, postgres_url: str
) -> None:
    """In a unit of work the event is appended by the store's transaction; a rollback drops it."""
    store = database.store()
    run = RunRecord(
        run_id="r1",
        runbook="rb",
        runbook_digest="d",
        mode=Mode.APPLY,
        trigger="user:a",
        started_at=T0,
    )
    log = structlog.get_logger()
    with audit_unit():
        log.info("run.started", run_id="r1")
        assert _records(postgres_url) == []  # kept for the transaction
        store.start_run(run)
    with audit_unit():
        log.info("run.started", run_id="r1-again")
        with pytest.raises(StateError, match="already exists"):
            store.start_run(run)
    log.info("breaker.closed", reason="no state change: a transaction of its own")
    events = [(r["seq"], r["event"], r.get("run_id")) for r in _records(postgres_url)]
    assert events == [(1, "run.started", "r1"), (2, "breaker.closed", None)]
    head = chain.head()
    assert head is not None
    assert head.seq == 2
    assert chain.verify().ok


def test_concurrent_appends_chain_in_commit_order_and_export_verifies_offline(
    database: StateDatabase, chain: AuditSink, tmp_path: Path
) -> None:
    """Eight threads append at once: one unbroken chain, exported as a verifiable JSONL file."""
    del database

    def emit(n: int) -> None:
        for i in range(10):
            structlog.get_logger().info("test.event", thread=n, i=i)

    threads = [threading.Thread(target=emit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = chain.verify()
    assert (result.ok, result.records) == (True, 80)
    exported = tmp_path / "audit.jsonl"
    head = chain.export(exported)
    assert head == chain.head()
    assert verify_audit(exported, expected_head=head).ok
    assert len(exported.read_text().splitlines()) == 80


def test_an_edited_record_and_a_cut_tail_are_named(
    database: StateDatabase, chain: AuditSink, postgres_url: str
) -> None:
    """The owner editing a row breaks its hash; deleting the last rows no longer meets the head."""
    del database
    for i in range(5):
        structlog.get_logger().info("test.event", i=i)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE audit_chain SET record = replace(record, '\"i\":2', '\"i\":9') WHERE seq = 3"
        )
    edited = chain.verify()
    assert (edited.ok, edited.first_bad_line) == (False, 3)
    assert "edited" in edited.reason
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_chain WHERE seq >= 3")
    cut = chain.verify()
    assert not cut.ok
    assert "removed from the end" in cut.reason


def test_the_application_role_may_append_but_not_read_edit_or_delete(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    """`state migrate --app-role` grants INSERT only on the chain: the app appends, no more."""
    role = f"app_{postgres_url.rsplit('_', 1)[-1]}_{threading.get_ident() % 1000}"
    postgres_server.execute(f"CREATE ROLE {role} LOGIN")
    done = run_remediate(
        ["--state-url", postgres_url, "state", "migrate", "--app-role", role], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "granted" in done.stdout
    app_url = postgres_url.replace("postgres@", f"{role}@")
    with open_database(app_url, clock=Clock()) as app:
        sink = app.audit_log()
        assert sink is not None
        configure_audit(sink, clock=Clock())
        try:
            structlog.get_logger().info("test.event", by="app")
        finally:
            structlog.reset_defaults()
        with psycopg.connect(app_url, autocommit=True) as conn:
            for statement in (
                "SELECT * FROM audit_chain",
                "UPDATE audit_chain SET record = 'x'",
                "DELETE FROM audit_chain",
                "CREATE TABLE sneaky (x int)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement.encode())
    with open_database(postgres_url, clock=Clock()) as owner:
        owned = owner.audit_log()
        assert owned is not None
        assert owned.verify().ok
        head = owned.head()
        assert head is not None
        assert head.seq == 1


def test_verify_and_export_from_the_command_line_print_the_head(
    database: StateDatabase, chain: AuditSink, postgres_url: str, tmp_path: Path
) -> None:
    """`audit verify` checks the database; `audit export FILE` then `audit verify FILE` agree."""
    del database
    for i in range(3):
        structlog.get_logger().info("test.event", i=i)
    head = chain.head()
    assert head is not None
    structlog.reset_defaults()
    done = run_remediate(["--state-url", postgres_url, "audit", "verify"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 records, chain intact" in done.stdout
    assert head.hash in done.stdout
    target = tmp_path / "export.jsonl"
    done = run_remediate(["--state-url", postgres_url, "audit", "export", str(target)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert head.hash in done.stdout
    done = run_remediate(["audit", "verify", str(target), "-o", "json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["head"] == {"seq": 3, "hash": head.hash}
