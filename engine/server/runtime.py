"""One server's parts, built once and wired: store, router, fleet, breaker, intake, workers.

:func:`engine.server.serve.serve` puts it behind uvicorn; tests build it directly with a
fake executor and a fake inventory resolver.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from engine.audit import audit_context, log_anyway
from engine.errors import ConfigError, StateError
from engine.executors.ansible import AnsibleExecutor, AnsibleSettings
from engine.executors.base import Executor
from engine.leases import audit_interruptions
from engine.pipeline import Services, new_run_id
from engine.privacy import private_dir
from engine.runbooks import load_runbooks
from engine.server.breaker import CircuitBreaker
from engine.server.config import ServerConfig
from engine.server.fleet import FleetWatcher, ResolveTargets
from engine.server.intake import Intake
from engine.server.metrics import ServerMetrics
from engine.server.queue import QueueItem
from engine.server.routing import Router
from engine.server.worker import WorkerPool
from engine.settings import Settings
from engine.state import AlertStore, StateDatabase, open_database, redacted_url
from engine.targets import resolve_targets

#: How often the inventory's files are checked for changes.
INVENTORY_CHECK = 2.0
#: Least time between breaker checks triggered by intake (workers check before every claim).
INTAKE_BREAKER_INTERVAL = 0.5
#: The intake's breaker checks, which run in the background, take at most this share of the time.
INTAKE_BREAKER_SHARE = 0.2
#: How long stopping waits for a breaker check in progress to finish.
WATCHER_JOIN = 10.0


#: Seconds cancelled playbooks get to stop after the shutdown timeout.
ABORT_GRACE = 15.0


class WebhookServer:
    """Everything one server process runs, apart from HTTP."""

    def __init__(
        self,
        config: ServerConfig,
        settings: Settings,
        *,
        clock: Callable[[], datetime],
        executor: Executor | None = None,
        resolve: ResolveTargets = resolve_targets,
        run_ids: Callable[[], str] = new_run_id,
        database: StateDatabase | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.draining = threading.Event()
        runbooks = load_runbooks(
            [config.runbooks(settings)], playbooks_dir=config.playbooks(settings)
        )
        self.router = Router(runbooks)
        self._abort = threading.Event()  # set when running runs overstay the shutdown timeout
        self.executor = executor or AnsibleExecutor(
            AnsibleSettings(work_dir=settings.state_dir / "work"),
            cancel=self._abort.is_set,
            secrets=settings.secrets,
        )
        self._owns_database = database is None
        if database is None:
            private_dir(settings.state_dir)
            database = open_database(
                settings.database_url(config.state.url),
                clock=clock,
                connections=config.workers + 8,  # workers, intake, watchers, HTTP reads
            )
        self.database: StateDatabase = database
        self.store: AlertStore = self.database.store(intake=True)
        self.metrics = ServerMetrics(self.store.queue_counts)
        execute = None
        if config.executor == "distributed":  # runs go to `remediate worker` processes
            board = self.database.run_board()  # ConfigError for SQLite
            try:
                from engine.distributed.client import runner  # noqa: PLC0415 - optional extra
            except ImportError as exc:
                raise ConfigError(
                    "executor: distributed needs procrastinate: install remediate with its "
                    "`distributed` extra"
                ) from exc
            execute = runner(board)
        self.fleet = FleetWatcher(
            config.inventory,
            self.router.index_keys,
            resolve=resolve,
            clock=clock,
            refresh=config.inventory_refresh,
        )
        self.breaker = CircuitBreaker(
            config.breaker,
            clock=clock,
            fleet_size=lambda: self.fleet.current.size,
            metrics=self.metrics,
        )
        self.pool = WorkerPool(
            count=config.workers,
            owner=self.owner,
            runbooks=self.router.runbooks,
            inventory=config.inventory,
            open_services=self._open_services,
            breaker=self.breaker,
            metrics=self.metrics,
            clock=clock,
            max_age=config.queue.max_age,
            new_run_id=run_ids,
            approval_ttl=config.approvals.ttl,
            fleet_size=lambda pattern: len(self.fleet.current.hosts.get(pattern, ())),
            execute=execute,
        )
        self.intake = Intake(
            self.store,
            self.router,
            self.fleet,
            self.breaker,
            self.metrics,
            clock=clock,
            on_queued=self._after_queued,
        )
        self._watcher_stop = threading.Event()
        self._breaker_due = threading.Event()
        self._breaker_watcher: threading.Thread | None = None
        self._keeper: threading.Thread | None = None

    @property
    def state_url(self) -> str:
        """The state database's URL, without a password."""
        return redacted_url(self.database.url)

    def _after_queued(self) -> None:
        """New runs are queued: wake the workers and have the breaker look at them.

        Workers check the breaker themselves before and after every claim, so waking them
        first is safe; the intake's check (which opens the breaker, and so records the next
        runs ``held``, even with no worker) runs in the background: its counting query grows
        with the window's queue and must never hold up the 202 of a notification.
        """
        self.pool.wake()
        self._breaker_due.set()

    def _open_services(self) -> tuple[Services, AlertStore]:
        store = self.database.store()
        services = Services(
            executor=self.executor,
            store=store,
            clock=self.clock,
            new_run_id=new_run_id,
            artifacts_dir=self.settings.artifacts_dir,
            sleep=time.sleep,
            secrets=self.settings.secrets,
            holder=self.owner,
            lease_ttl=self.config.state.lease_ttl,
        )
        return services, store

    # -- lifecycle

    def recover(self) -> list[QueueItem]:
        """Mark runs a stopped server left running as interrupted; they are never re-run.

        With a single-server backend (SQLite; the caller holds the state directory's server
        lock) every running item is a predecessor's.  With replicas, only those of servers
        whose heartbeat expired, and runs whose device leases expired, are.
        """
        if self.database.single_server:
            items = self.store.interrupt_running(
                now=self.clock(), reason="the server stopped while the run was in progress"
            )
            _audit_interrupted(items)
            return items
        return self._reap()

    def _reap(self, store: AlertStore | None = None) -> list[QueueItem]:
        """Interrupt what stopped controllers left: expired leases, silent servers' items."""
        store = store or self.store
        audit_interruptions(store.reap_expired())
        items = store.interrupt_orphans(now=self.clock())
        _audit_interrupted(items)
        return items

    def _keep_alive(self) -> None:
        """Renew the heartbeat; reap stopped controllers' work (every third of a lease)."""
        ttl = self.config.state.lease_ttl
        store = self.database.store()
        try:
            while True:
                try:
                    store.heartbeat(self.owner, ttl)
                    if not self.database.single_server:
                        self._reap(store)
                except StateError as exc:  # the database is away: keep trying
                    log_anyway(
                        structlog.get_logger().warning,
                        "server.heartbeat_failed",
                        error=str(exc),
                    )
                if self._watcher_stop.wait(ttl.total_seconds() / 3):
                    return
        finally:
            store.close()

    def state_health(self) -> dict[str, object]:
        """The state database for /healthz: its URL (no password) and whether it answers."""
        try:
            self.database.ping()
        except StateError as exc:
            return {"url": self.state_url, "reachable": False, "error": str(exc)}
        return {"url": self.state_url, "reachable": True}

    def start(self) -> None:
        """Load the inventory and the breaker; start the workers, inventory and breaker watchers."""
        self.fleet.load()
        self.breaker.load(self.store)
        # Alive before the first claim: a replica that dies right after it is still found.
        self.store.heartbeat(self.owner, self.config.state.lease_ttl)
        self.pool.start()
        threading.Thread(
            target=self._watch_inventory, name="remediate-inventory", daemon=True
        ).start()
        self._breaker_watcher = threading.Thread(
            target=self._watch_breaker, name="remediate-breaker", daemon=True
        )
        self._breaker_watcher.start()
        self._keeper = threading.Thread(
            target=self._keep_alive, name="remediate-heartbeat", daemon=True
        )
        self._keeper.start()
        structlog.get_logger().info(
            "server.started",
            owner=self.owner,
            runbooks=sorted(self.router.runbooks),
            workers=self.config.workers,
            hosts=self.fleet.current.size,
        )

    def stop(self, timeout: float) -> list[QueueItem]:
        """Stop taking work; wait up to ``timeout`` for running runs; interrupt the rest.

        Queued items stay queued for the next start.  Returns the items interrupted.
        """
        self.draining.set()
        running = [i.item_id for i in self.pool.running]
        structlog.get_logger().info("server.stopping", running=running, timeout=timeout)
        self.pool.stop()
        self._watcher_stop.set()
        for watcher in (self._breaker_watcher, self._keeper):
            if watcher is not None:
                watcher.join(WATCHER_JOIN)
        interrupted: list[QueueItem] = []
        if not self.pool.join(timeout):
            # Stop the playbooks still running (ansible-runner terminates its children), so no
            # Ansible process outlives the server, then record those runs as interrupted.
            self._abort.set()
            self.pool.join(ABORT_GRACE)
            interrupted = self.store.interrupt_running(
                now=self.clock(),
                reason=f"the server stopped: the run did not finish within {timeout:g}s",
                owner=self.owner,
            )
            _audit_interrupted(interrupted)
        structlog.get_logger().info("server.stopped", interrupted=[i.item_id for i in interrupted])
        return interrupted

    def close(self) -> None:
        """Stop the intake (recording what is waiting), then close the store (and the database)."""
        self.intake.close()
        self.store.close()
        if self._owns_database:
            self.database.close()

    def _watch_inventory(self) -> None:
        while not self._watcher_stop.wait(INVENTORY_CHECK):
            self.fleet.reload_if_due()

    def _watch_breaker(self) -> None:
        """Refresh the breaker after runs were queued, on its own store connection.

        At most every ``INTAKE_BREAKER_INTERVAL``, and when its queries are slow (a window
        holding many runs) at most ``INTAKE_BREAKER_SHARE`` of the time.
        """
        store = self.database.store()
        try:
            while not self._watcher_stop.is_set():
                if not self._breaker_due.wait(INTAKE_BREAKER_INTERVAL):
                    continue
                self._breaker_due.clear()
                started = time.monotonic()
                try:
                    self.breaker.refresh(store, min_interval=INTAKE_BREAKER_INTERVAL)
                except StateError as exc:  # workers still check before every claim
                    structlog.get_logger().warning("breaker.check_failed", error=str(exc))
                took = time.monotonic() - started
                self._watcher_stop.wait(max(INTAKE_BREAKER_INTERVAL, took / INTAKE_BREAKER_SHARE))
        finally:
            store.close()


def _audit_interrupted(items: list[QueueItem]) -> None:
    for item in items:
        if item.run_id is None:
            continue
        with audit_context(item.run_id, runbook=item.runbook, trigger=f"alert:{item.fingerprint}"):
            structlog.get_logger().warning(
                "run.interrupted",
                item=item.item_id,
                host=item.host,
                reason=item.reason,
            )
