"""The SQLite schema, in order: append a migration, never edit or reorder an applied one."""

from __future__ import annotations

from engine.state.migrations import Migration, check_migrations

#: The schema, in order.  Append new migrations; never edit or reorder applied ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, host results, cool-downs, device locks, audit head",
        (
            """
            CREATE TABLE runs (
                run_id         TEXT PRIMARY KEY,
                runbook        TEXT NOT NULL,
                runbook_digest TEXT NOT NULL,
                mode           TEXT NOT NULL,
                trigger        TEXT NOT NULL,
                started_at     TEXT NOT NULL,
                finished_at    TEXT,
                status         TEXT NOT NULL,
                summary        TEXT NOT NULL  -- JSON object: outcome -> count
            )
            """,
            "CREATE INDEX runs_by_start ON runs (started_at)",
            "CREATE INDEX runs_by_runbook ON runs (runbook, started_at)",
            "CREATE INDEX runs_by_status ON runs (status)",
            """
            CREATE TABLE host_results (
                run_id      TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
                host        TEXT NOT NULL,
                outcome     TEXT NOT NULL,
                reason      TEXT NOT NULL,
                steps       TEXT NOT NULL,  -- JSON array of step ids
                finished_at TEXT NOT NULL,
                PRIMARY KEY (run_id, host)
            )
            """,
            """
            CREATE TABLE cooldowns (
                runbook  TEXT NOT NULL,
                host     TEXT NOT NULL,
                acted_at TEXT NOT NULL,
                PRIMARY KEY (runbook, host)
            )
            """,
            """
            CREATE TABLE device_locks (
                host        TEXT PRIMARY KEY,
                run_id      TEXT NOT NULL,
                acquired_at TEXT NOT NULL,
                expires_at  TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE audit_head (
                id   INTEGER PRIMARY KEY CHECK (id = 1),
                seq  INTEGER NOT NULL,
                hash TEXT NOT NULL
            )
            """,
        ),
    ),
    Migration(
        2,
        "alert firings, the alert run queue and the circuit breaker (webhook server)",
        (
            """
            CREATE TABLE alert_firings (
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                alertname    TEXT NOT NULL,
                labels       TEXT NOT NULL,  -- JSON object, as received (untrusted data)
                status       TEXT NOT NULL,  -- firing | resolved
                outcome      TEXT NOT NULL,  -- queued | held | unmatched | unresolved | resolved
                reason       TEXT NOT NULL,
                received_at  TEXT NOT NULL,
                last_seen_at TEXT NOT NULL,
                times_seen   INTEGER NOT NULL,
                resolved_at  TEXT,
                PRIMARY KEY (fingerprint, starts_at)
            )
            """,
            "CREATE INDEX alert_firings_by_outcome ON alert_firings (outcome, received_at)",
            "CREATE INDEX alert_firings_by_received ON alert_firings (received_at)",
            """
            CREATE TABLE alert_queue (
                item_id      INTEGER PRIMARY KEY AUTOINCREMENT,
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                runbook      TEXT NOT NULL,
                host         TEXT NOT NULL,  -- an inventory host name, never label text
                trigger_mode TEXT NOT NULL,  -- apply | plan | approve (the runbook trigger's)
                mode         TEXT NOT NULL,  -- apply | dry-run (what the run does)
                state        TEXT NOT NULL,
                reason       TEXT NOT NULL,
                enqueued_at  TEXT NOT NULL,
                claimed_at   TEXT,
                finished_at  TEXT,
                owner        TEXT,           -- the server process that claimed it
                run_id       TEXT,
                run_status   TEXT,
                UNIQUE (fingerprint, starts_at, runbook),
                FOREIGN KEY (fingerprint, starts_at)
                    REFERENCES alert_firings (fingerprint, starts_at) ON DELETE CASCADE
            )
            """,
            "CREATE INDEX alert_queue_by_state ON alert_queue (state, item_id)",
            "CREATE INDEX alert_queue_by_enqueued ON alert_queue (enqueued_at)",
            "CREATE INDEX alert_queue_by_finished ON alert_queue (finished_at)",
            """
            CREATE TABLE alert_breaker (
                id        INTEGER PRIMARY KEY CHECK (id = 1),
                open      INTEGER NOT NULL,
                reason    TEXT NOT NULL,
                opened_at TEXT,
                reset_at  TEXT
            )
            """,
        ),
    ),
    Migration(
        3,
        "approvals of saved plans",
        (
            """
            CREATE TABLE approvals (
                approval_id  TEXT PRIMARY KEY,
                runbook      TEXT NOT NULL,
                source       TEXT NOT NULL,
                requested_by TEXT NOT NULL,
                requested_at TEXT NOT NULL,
                expires_at   TEXT NOT NULL,
                four_eyes    INTEGER NOT NULL,
                status       TEXT NOT NULL,  -- pending | approved | denied | expired
                decided_by   TEXT,
                decided_at   TEXT,
                reason       TEXT NOT NULL,
                plan         TEXT NOT NULL   -- the saved plan (JSON, with its digest)
            )
            """,
            "CREATE INDEX approvals_by_status ON approvals (status, requested_at)",
        ),
    ),
    Migration(
        4,
        "alert firings and queue keyed by start time first (new firings land together)",
        # A firing is looked up by (fingerprint, starts_at), and either order finds it; keyed
        # fingerprint first (a hash), every new firing lands on a random page of a large
        # index, so each notification wrote tens of pages to the log (and the checkpoint
        # copied them back).  Keyed start time first, new firings, which started recently,
        # all land at the end.  SQLite cannot reorder a key in place: the tables are rebuilt
        # (with foreign keys off, as its documentation prescribes; checked before commit).
        (
            """
            CREATE TABLE alert_firings_new (
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                alertname    TEXT NOT NULL,
                labels       TEXT NOT NULL,  -- JSON object, as received (untrusted data)
                status       TEXT NOT NULL,  -- firing | resolved
                outcome      TEXT NOT NULL,  -- queued | held | unmatched | unresolved | resolved
                reason       TEXT NOT NULL,
                received_at  TEXT NOT NULL,
                last_seen_at TEXT NOT NULL,
                times_seen   INTEGER NOT NULL,
                resolved_at  TEXT,
                PRIMARY KEY (starts_at, fingerprint)
            )
            """,
            "INSERT INTO alert_firings_new SELECT * FROM alert_firings",
            """
            CREATE TABLE alert_queue_new (
                item_id      INTEGER PRIMARY KEY AUTOINCREMENT,
                fingerprint  TEXT NOT NULL,
                starts_at    TEXT NOT NULL,
                runbook      TEXT NOT NULL,
                host         TEXT NOT NULL,  -- an inventory host name, never label text
                trigger_mode TEXT NOT NULL,  -- apply | plan | approve (the runbook trigger's)
                mode         TEXT NOT NULL,  -- apply | dry-run (what the run does)
                state        TEXT NOT NULL,
                reason       TEXT NOT NULL,
                enqueued_at  TEXT NOT NULL,
                claimed_at   TEXT,
                finished_at  TEXT,
                owner        TEXT,           -- the server process that claimed it
                run_id       TEXT,
                run_status   TEXT,
                UNIQUE (starts_at, fingerprint, runbook),
                FOREIGN KEY (fingerprint, starts_at)
                    REFERENCES alert_firings (fingerprint, starts_at) ON DELETE CASCADE
            )
            """,
            # Item ids are never reused: the new table takes over the old one's counter.
            "UPDATE sqlite_sequence SET name = 'alert_queue_new' WHERE name = 'alert_queue'",
            "INSERT INTO alert_queue_new SELECT * FROM alert_queue",
            "DROP TABLE alert_queue",
            "DROP TABLE alert_firings",
            "ALTER TABLE alert_firings_new RENAME TO alert_firings",
            "ALTER TABLE alert_queue_new RENAME TO alert_queue",
            "CREATE INDEX alert_firings_by_outcome ON alert_firings (outcome, received_at)",
            "CREATE INDEX alert_firings_by_received ON alert_firings (received_at)",
            "CREATE INDEX alert_queue_by_state ON alert_queue (state, item_id)",
            "CREATE INDEX alert_queue_by_enqueued ON alert_queue (enqueued_at)",
            "CREATE INDEX alert_queue_by_finished ON alert_queue (finished_at)",
        ),
    ),
    Migration(
        5,
        "device leases with fencing tokens, fleet-wide admissions, controller heartbeats",
        (
            "ALTER TABLE device_locks ADD COLUMN holder TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE device_locks ADD COLUMN token INTEGER NOT NULL DEFAULT 0",
            """
            CREATE TABLE lease_tokens (
                id   INTEGER PRIMARY KEY CHECK (id = 1),
                last INTEGER NOT NULL  -- the last fencing token handed out
            )
            """,
            "INSERT INTO lease_tokens (id, last) VALUES (1, 0)",
            """
            CREATE TABLE admissions (
                runbook    TEXT NOT NULL,
                run_id     TEXT NOT NULL,
                host       TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                PRIMARY KEY (runbook, run_id, host)
            )
            """,
            "CREATE INDEX admissions_by_run ON admissions (run_id)",
            """
            CREATE TABLE controllers (
                owner      TEXT PRIMARY KEY,
                expires_at TEXT NOT NULL
            )
            """,
        ),
    ),
)


check_migrations(MIGRATIONS)
