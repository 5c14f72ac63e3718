"""The PostgreSQL schema, in order: append a migration, never edit or reorder an applied one.

Times are ``timestamptz`` (microseconds, as the SQLite text has them); JSON is kept as the
text the engine wrote (labels verbatim, never parsed by the database).  A firing is keyed
start time first, so new firings land together at the end of the index.
"""

from __future__ import annotations

from engine.state.migrations import Migration, check_migrations

#: Queue items that stand for a symptom (the partial unique index keeps one per runbook,
#: device and trigger mode).
_ACTIVE = "state IN ('queued', 'running')"
#: The item that the active items of ``{item}``'s runbook, device and mode join (migration 3).
_SURVIVOR = (
    "SELECT s.item_id FROM alert_queue s JOIN alert_queue o ON o.item_id = {item}"
    " WHERE s.runbook = o.runbook AND s.host = o.host AND s.trigger_mode = o.trigger_mode"
    " AND s.state IN ('queued', 'running') ORDER BY s.state = 'running' DESC, s.item_id LIMIT 1"
)

#: The schema, in order.  Append new migrations; never edit or reorder applied ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, host results, cool-downs, device leases, admissions, approvals, alert queue",
        (
            """
            CREATE TABLE runs (
                run_id         TEXT PRIMARY KEY,
                runbook        TEXT NOT NULL,
                runbook_digest TEXT NOT NULL,
                mode           TEXT NOT NULL,
                trigger        TEXT NOT NULL,
                started_at     TIMESTAMPTZ NOT NULL,
                finished_at    TIMESTAMPTZ,
                status         TEXT NOT NULL,
                summary        TEXT NOT NULL,  -- JSON object: outcome -> count
                created        BIGINT GENERATED ALWAYS AS IDENTITY  -- ties in started_at
            )
            """,
            "CREATE INDEX runs_by_start ON runs (started_at, created)",
            "CREATE INDEX runs_by_runbook ON runs (runbook, started_at)",
            "CREATE INDEX runs_by_status ON runs (status)",
            """
            CREATE TABLE host_results (
                run_id      TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
                host        TEXT NOT NULL,
                outcome     TEXT NOT NULL,
                reason      TEXT NOT NULL,
                steps       TEXT NOT NULL,  -- JSON array of step ids
                finished_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (run_id, host)
            )
            """,
            """
            CREATE TABLE cooldowns (
                runbook  TEXT NOT NULL,
                host     TEXT NOT NULL,
                acted_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (runbook, host)
            )
            """,
            "CREATE SEQUENCE lease_tokens",  # fencing tokens: every lease granted takes one
            """
            CREATE TABLE device_locks (
                host        TEXT PRIMARY KEY,
                run_id      TEXT NOT NULL,
                holder      TEXT NOT NULL,
                token       BIGINT NOT NULL,
                acquired_at TIMESTAMPTZ NOT NULL,
                expires_at  TIMESTAMPTZ NOT NULL  -- the database's clock
            )
            """,
            "CREATE INDEX device_locks_by_expiry ON device_locks (expires_at)",
            # One row per runbook, locked while its runs' admissions are counted and written.
            "CREATE TABLE admission_locks (runbook TEXT PRIMARY KEY)",
            """
            CREATE TABLE admissions (
                runbook    TEXT NOT NULL,
                run_id     TEXT NOT NULL,
                host       TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (runbook, run_id, host)
            )
            """,
            "CREATE INDEX admissions_by_run ON admissions (run_id)",
            """
            CREATE TABLE controllers (
                owner      TEXT PRIMARY KEY,
                expires_at TIMESTAMPTZ NOT NULL
            )
            """,
            """
            CREATE TABLE audit_head (
                id   INTEGER PRIMARY KEY CHECK (id = 1),
                seq  BIGINT NOT NULL,
                hash TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE approvals (
                approval_id  TEXT PRIMARY KEY,
                runbook      TEXT NOT NULL,
                source       TEXT NOT NULL,
                requested_by TEXT NOT NULL,
                requested_at TIMESTAMPTZ NOT NULL,
                expires_at   TIMESTAMPTZ NOT NULL,
                four_eyes    BOOLEAN NOT NULL,
                status       TEXT NOT NULL,
                decided_by   TEXT,
                decided_at   TIMESTAMPTZ,
                reason       TEXT NOT NULL,
                plan         TEXT NOT NULL  -- the saved plan (JSON, with its digest)
            )
            """,
            "CREATE INDEX approvals_by_status ON approvals (status, requested_at)",
            """
            CREATE TABLE alert_firings (
                fingerprint  TEXT NOT NULL,
                starts_at    TIMESTAMPTZ NOT NULL,
                alertname    TEXT NOT NULL,
                labels       TEXT NOT NULL,  -- JSON object, as received (untrusted data)
                status       TEXT NOT NULL,  -- firing | resolved
                outcome      TEXT NOT NULL,
                reason       TEXT NOT NULL,
                received_at  TIMESTAMPTZ NOT NULL,
                last_seen_at TIMESTAMPTZ NOT NULL,
                times_seen   INTEGER NOT NULL,
                resolved_at  TIMESTAMPTZ,
                PRIMARY KEY (starts_at, fingerprint)
            )
            """,
            "CREATE INDEX alert_firings_by_outcome ON alert_firings (outcome, received_at)",
            "CREATE INDEX alert_firings_by_received ON alert_firings (received_at)",
            """
            CREATE TABLE alert_queue (
                item_id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                fingerprint  TEXT NOT NULL,
                starts_at    TIMESTAMPTZ NOT NULL,
                runbook      TEXT NOT NULL,
                host         TEXT NOT NULL,  -- an inventory host name, never label text
                trigger_mode TEXT NOT NULL,
                mode         TEXT NOT NULL,
                state        TEXT NOT NULL,
                reason       TEXT NOT NULL,
                enqueued_at  TIMESTAMPTZ NOT NULL,
                claimed_at   TIMESTAMPTZ,
                finished_at  TIMESTAMPTZ,
                owner        TEXT,           -- the server process that claimed it
                run_id       TEXT,
                run_status   TEXT,
                UNIQUE (starts_at, fingerprint, runbook),
                FOREIGN KEY (starts_at, fingerprint)
                    REFERENCES alert_firings (starts_at, fingerprint) ON DELETE CASCADE
            )
            """,
            "CREATE INDEX alert_queue_by_state ON alert_queue (state, item_id)",
            "CREATE INDEX alert_queue_by_host ON alert_queue (host, state)",
            "CREATE INDEX alert_queue_by_enqueued ON alert_queue (enqueued_at)",
            "CREATE INDEX alert_queue_by_finished ON alert_queue (finished_at)",
            "CREATE INDEX alert_queue_by_run ON alert_queue (run_id)",
            """
            CREATE TABLE alert_breaker (
                id        INTEGER PRIMARY KEY CHECK (id = 1),
                open      BOOLEAN NOT NULL,
                reason    TEXT NOT NULL,
                opened_at TIMESTAMPTZ,
                reset_at  TIMESTAMPTZ
            )
            """,
        ),
    ),
    Migration(
        2,
        "the audit chain, appended in the transactions of the changes it records",
        (
            # One row per record: its canonical JSON line, exactly as the file sink writes it
            # (``remediate audit export`` writes these lines).  The application is granted
            # INSERT only: it can neither read, edit nor delete records.
            """
            CREATE TABLE audit_chain (
                seq    BIGINT PRIMARY KEY,
                record TEXT NOT NULL
            )
            """,
            # The chain's head, locked by every append: records follow commit order.
            """
            CREATE TABLE audit_chain_head (
                id   INTEGER PRIMARY KEY CHECK (id = 1),
                seq  BIGINT NOT NULL,
                hash TEXT NOT NULL
            )
            """,
            "INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 0, repeat('0', 64))",
        ),
    ),
    Migration(
        3,
        "one queued or running run per runbook, device and trigger mode; the firings it runs for",
        (
            # Every firing a queue item runs for: the one that queued it, and those that came
            # while it was queued or running (same runbook, device and trigger mode) and joined
            # it instead of queueing another run.
            """
            CREATE TABLE queue_firings (
                item_id     BIGINT NOT NULL REFERENCES alert_queue (item_id) ON DELETE CASCADE,
                fingerprint TEXT NOT NULL,
                starts_at   TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (item_id, starts_at, fingerprint),
                FOREIGN KEY (starts_at, fingerprint)
                    REFERENCES alert_firings (starts_at, fingerprint) ON DELETE CASCADE
            )
            """,
            "CREATE INDEX queue_firings_by_firing ON queue_firings (starts_at, fingerprint)",
            "INSERT INTO queue_firings SELECT item_id, fingerprint, starts_at FROM alert_queue",
            # Runs an older engine queued side by side for one symptom: the later ones join the
            # first (the running one, else the oldest queued), as they would have now.
            f"""
            UPDATE queue_firings SET item_id = ({_SURVIVOR.format(item="queue_firings.item_id")})
            WHERE item_id IN (SELECT item_id FROM alert_queue WHERE {_ACTIVE})
            """,  # noqa: S608 - constant text
            f"""
            UPDATE alert_queue SET state = 'cancelled', finished_at = now(),
                reason = 'coalesced into queue item '
                    || ({_SURVIVOR.format(item="alert_queue.item_id")}) || ' by the schema upgrade'
            WHERE {_ACTIVE} AND item_id <> ({_SURVIVOR.format(item="alert_queue.item_id")})
            """,  # noqa: S608 - constant text
            f"""
            CREATE UNIQUE INDEX alert_queue_one_active ON alert_queue (runbook, host, trigger_mode)
            WHERE {_ACTIVE}
            """,
        ),
    ),
    Migration(
        4,
        "distributed runs: their request and phase, their hosts, their shards, their workers",
        (
            # One row per run spread over workers (remediate worker): what was asked, where
            # the coordinator is (phase, serial batch), and why it stopped, if it did.
            """
            CREATE TABLE dist_runs (
                run_id     TEXT PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
                request    TEXT NOT NULL,  -- JSON: the run's request and settings
                phase      TEXT NOT NULL,  -- resolve | probe | act | finish | done
                batch      INTEGER NOT NULL DEFAULT 0,  -- the serial batch acting now
                targeted   INTEGER NOT NULL DEFAULT 0,
                hosts      INTEGER NOT NULL DEFAULT 0,  -- hosts resolved
                meta       TEXT,           -- JSON: the plan without its hosts, once planned
                stopped    TEXT,           -- why no more batches run (budget, cancel)
                cancelled  TEXT,           -- who cancelled it
                error      TEXT,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
            )
            """,
            # Its hosts, one row each (never all in one process): vars as Ansible merged
            # them, the probe shard, the host's plan, its serial batch and act shard, and
            # its report once it ended.  ``recorded``: its outcome is in host_results.
            """
            CREATE TABLE dist_hosts (
                run_id    TEXT NOT NULL REFERENCES dist_runs (run_id) ON DELETE CASCADE,
                host      TEXT NOT NULL,
                position  INTEGER NOT NULL,  -- inventory order
                vars      TEXT NOT NULL,     -- JSON: {"vars": {...}, "groups": [...]}
                shard     INTEGER NOT NULL,  -- its probe shard
                plan      TEXT,              -- JSON HostPlan, once probed and decided
                outcome   TEXT,              -- the plan's outcome, then the report's
                batch     INTEGER,           -- acting hosts: the serial batch
                act_shard INTEGER,
                report    TEXT,              -- JSON HostReport, once it ended
                attempts  INTEGER NOT NULL DEFAULT 0,  -- act attempts
                recorded  BOOLEAN NOT NULL DEFAULT false,
                PRIMARY KEY (run_id, host)
            )
            """,
            "CREATE INDEX dist_hosts_by_position ON dist_hosts (run_id, position)",
            "CREATE INDEX dist_hosts_by_shard ON dist_hosts (run_id, shard)",
            "CREATE INDEX dist_hosts_by_act_shard ON dist_hosts (run_id, act_shard)",
            # The shards: a probe shard or an act shard (of one serial batch), the job that
            # runs it, and how it ended.
            """
            CREATE TABLE dist_shards (
                run_id   TEXT NOT NULL REFERENCES dist_runs (run_id) ON DELETE CASCADE,
                kind     TEXT NOT NULL,     -- probe | act
                shard    INTEGER NOT NULL,
                batch    INTEGER NOT NULL DEFAULT 0,
                state    TEXT NOT NULL,     -- queued | running | done | interrupted | failed
                attempts INTEGER NOT NULL DEFAULT 0,
                job_id   BIGINT,
                worker   TEXT,
                reason   TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (run_id, kind, shard)
            )
            """,
            "CREATE INDEX dist_shards_by_job ON dist_shards (job_id)",
            # The task engine's workers as people know them (machine, pid), by its worker id.
            """
            CREATE TABLE dist_workers (
                worker_id   BIGINT PRIMARY KEY,
                name        TEXT NOT NULL,
                host        TEXT NOT NULL,
                pid         INTEGER NOT NULL,
                concurrency INTEGER NOT NULL,
                queues      TEXT NOT NULL,  -- JSON array
                started_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
            )
            """,
        ),
    ),
)

check_migrations(MIGRATIONS)
