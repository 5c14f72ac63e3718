"""The worker pool: a bounded number of threads taking runs from the durable queue.

Each worker owns its :class:`~engine.pipeline.Services` (its own store connection; the
executor is shared and stateless) and runs one queue item at a time through
:func:`engine.pipeline.run_runbook`: with ``limit`` and ``hosts`` set to the one inventory host
name routing found, ``trigger="alert:<fingerprint>"`` and ``user="alertmanager"``.  Per-device
locks and cool-downs are the pipeline's, shared with CLI runs.  Nobody approves destructive
steps inside an ``apply`` alert run: a runbook whose policy asks for approval is refused, not
run.  An ``approve`` trigger runs a dry run and keeps its plan as a pending approval; once a
person approves it (CLI or HTTP), an idle worker applies exactly that plan, drift-checked.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from engine.approvals import apply_approved, expire_approvals, request_approval
from engine.audit import audit_context, log_anyway
from engine.errors import EngineError, StateError
from engine.outcomes import RunStatus
from engine.pipeline import RunReport, RunRequest, Services, run_runbook
from engine.planfiles import seal_plan
from engine.plans import Plan
from engine.runbooks import Runbook
from engine.runbooks.spec import TriggerMode
from engine.server.breaker import CircuitBreaker
from engine.server.metrics import ServerMetrics
from engine.server.queue import QueueItem, QueueState
from engine.state import AlertStore, ApprovalStatus

#: Who alert-triggered runs are recorded as.
ALERT_USER = "alertmanager"

#: How long an idle worker sleeps before looking at the queue again (new items wake it).
IDLE_POLL = 1.0
#: The longest a worker backs off after errors in a row (it doubles from ``IDLE_POLL``).
MAX_BACKOFF = 30.0


def _backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` errors in a row: 1, 2, 4, ... up to ``MAX_BACKOFF``."""
    return min(MAX_BACKOFF, IDLE_POLL * float(2 ** min(failures - 1, 16)))


def _no_approver(plan: Plan) -> bool:
    """No person is there to approve an alert-triggered run: decline."""
    del plan
    return False


def audit_set_aside(kind: str, items: tuple[QueueItem, ...], metrics: ServerMetrics) -> None:
    """Audit and count queue items held or expired instead of run."""
    if not items:
        return
    metrics.runs.labels(kind).inc(len(items))
    structlog.get_logger().warning(
        f"queue.{kind}",
        reason=items[0].reason,
        runs=[{"item": i.item_id, "runbook": i.runbook, "host": i.host} for i in items],
    )


def _run_here(runbook: Runbook, request: RunRequest, services: Services) -> RunReport:
    """An alert's run, in this thread."""
    return run_runbook(runbook, request, services, approve=_no_approver)


class WorkerPool:
    """``count`` worker threads; stop claiming on :meth:`stop`, then :meth:`join`."""

    def __init__(
        self,
        *,
        count: int,
        owner: str,
        runbooks: Mapping[str, Runbook],
        inventory: Path,
        open_services: Callable[[], tuple[Services, AlertStore]],
        breaker: CircuitBreaker,
        metrics: ServerMetrics,
        clock: Callable[[], datetime],
        max_age: timedelta,
        new_run_id: Callable[[], str],
        approval_ttl: timedelta = timedelta(hours=1),
        fleet_size: Callable[[str], int] = lambda _pattern: 0,
        execute: Callable[[Runbook, RunRequest, Services], RunReport] | None = None,
    ) -> None:
        self.count = count
        self.owner = owner
        self._runbooks = runbooks
        self._inventory = inventory
        self._open_services = open_services
        self._breaker = breaker
        self._metrics = metrics
        self._clock = clock
        self._max_age = max_age
        self._new_run_id = new_run_id
        self._approval_ttl = approval_ttl
        self._fleet_size = fleet_size
        #: Runs a claimed item's run: here (the default), or on distributed workers.
        self._execute_run = execute or _run_here
        self._stopping = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._busy: dict[int, QueueItem] = {}
        self._failing: set[str] = set()  # workers backing off after an error
        self._busy_lock = threading.Lock()

    def start(self) -> None:
        """Start the worker threads (daemons: a stuck playbook never blocks the exit)."""
        for number in range(self.count):
            thread = threading.Thread(
                target=self._work, name=f"remediate-worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New items were queued: let idle workers look now."""
        with self._wake:
            self._wake.notify_all()

    def stop(self) -> None:
        """Claim nothing more; runs in progress go on."""
        self._stopping.set()
        self.wake()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the workers; return whether all finished."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def running(self) -> list[QueueItem]:
        """The items being run now."""
        with self._busy_lock:
            return sorted(self._busy.values(), key=lambda i: i.item_id)

    @property
    def alive(self) -> int:
        """How many worker threads are alive (a thread that ended is not restarted)."""
        return sum(t.is_alive() for t in self._threads)

    @property
    def failing(self) -> int:
        """How many workers are backing off after an error (their last step failed)."""
        with self._busy_lock:
            return len(self._failing)

    def _work(self) -> None:
        """Claim and run items until stopped; outlive any error, backing off after each.

        A store error (the database is away) is logged and retried, as is any other fault of
        one step (logged with its traceback): the pool never shrinks silently.  Only an
        exception that is not an :class:`Exception` (``SystemExit`` and the like) ends the
        thread, logged with its traceback; ``/healthz`` counts the threads alive.
        """
        log = structlog.get_logger()
        name = threading.current_thread().name
        opened: tuple[Services, AlertStore] | None = None
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    if opened is None:
                        opened = self._open_services()
                    found = self._step(*opened)
                except StateError as exc:  # the database is away: back off, then look again
                    failures += 1
                    log_anyway(
                        log.warning,
                        "worker.state_error",
                        worker=name,
                        error=str(exc),
                        retry_in=_backoff(failures),
                    )
                except Exception as exc:  # noqa: BLE001 - a worker outlives any one fault
                    failures += 1
                    log_anyway(  # with the traceback
                        log.exception,
                        "worker.error",
                        worker=name,
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in=_backoff(failures),
                    )
                else:
                    failures = 0
                    self._failed(name, False)
                    if not found:
                        with self._wake:
                            if not self._stopping.is_set():
                                self._wake.wait(IDLE_POLL)
                    continue
                self._failed(name, True)
                self._stopping.wait(_backoff(failures))
        except BaseException as exc:  # noqa: BLE001 - the thread ends here, said in the log
            log_anyway(log.critical, "worker.died", worker=name, error=repr(exc), exc_info=exc)
        finally:
            self._failed(name, False)
            if opened is not None:
                opened[1].close()

    def _failed(self, name: str, failing: bool) -> None:
        with self._busy_lock:
            if failing:
                self._failing.add(name)
            else:
                self._failing.discard(name)

    def _step(self, services: Services, store: AlertStore) -> bool:
        """Claim and run one item; return whether there was one."""
        self._breaker.refresh(store)
        claim = store.claim_queue_item(
            self.owner,
            now=self._clock(),
            max_age=self._max_age,
            hold_reason=self._breaker.hold_reason,
            new_run_id=self._new_run_id,
        )
        audit_set_aside("held", claim.held, self._metrics)
        audit_set_aside("expired", claim.expired, self._metrics)
        if claim.item is None:
            return self._apply_next_approval(services, store)
        # The claim may belong to a storm committed after the refresh above; the firings came
        # in the same transaction as the item, so a refresh now sees all of them.
        hold = self._breaker.refresh(store).open and self._breaker.hold_reason
        if hold:
            store.finish_queue_item(
                claim.item.item_id, self.owner, QueueState.HELD, now=self._clock(), reason=hold
            )
            audit_set_aside("held", (claim.item,), self._metrics)
            return True
        with self._busy_lock:
            self._busy[claim.item.item_id] = claim.item
        try:
            self._run(claim.item, services, store)
        finally:
            with self._busy_lock:
                del self._busy[claim.item.item_id]
        self._breaker.refresh(store)
        return True

    def _apply_next_approval(self, services: Services, store: AlertStore) -> bool:
        """Apply the oldest approved plan, unless the breaker is open; whether there was one."""
        if self._breaker.hold_reason is not None:
            return False
        now = self._clock()
        expire_approvals(store, now)
        for record in reversed(store.list_approvals(ApprovalStatus.APPROVED)):
            claimed = store.transition_approval(
                record.approval_id,
                from_status=ApprovalStatus.APPROVED,
                to_status=ApprovalStatus.APPLYING,
                at=now,
                reason=f"applying ({self.owner})",
            )
            runbook = self._runbooks.get(record.runbook)
            if claimed is None:
                continue  # another worker took it
            if runbook is None:
                store.transition_approval(
                    record.approval_id,
                    from_status=ApprovalStatus.APPLYING,
                    to_status=ApprovalStatus.FAILED,
                    at=now,
                    reason=f"runbook {record.runbook!r} is no longer loaded",
                )
                return True
            try:
                report = apply_approved(store, claimed, runbook, services, now=now)
            except Exception:  # noqa: BLE001 - a worker outlives any one run's failure
                # apply_approved recorded it failed, with why, and logged it (with the
                # traceback when the fault is not an EngineError).
                return True
            self._metrics.runs.labels(report.status.value).inc()
            self._breaker.refresh(store)
            return True
        return False

    def _run(self, item: QueueItem, services: Services, store: AlertStore) -> None:
        run_id = item.run_id or self._new_run_id()
        log = structlog.get_logger().bind(
            item=item.item_id, run_id=run_id, runbook=item.runbook, host=item.host
        )
        log.info(
            "queue.started",
            fingerprint=item.fingerprint,
            starts_at=item.starts_at,
            trigger_mode=item.trigger_mode,
            mode=item.mode.value,
        )
        started = time.monotonic()
        state, status, reason = self._execute(item, run_id, services)
        reason = services.secrets.scrub(reason)  # an error's text may quote one
        took = time.monotonic() - started
        self._metrics.run_duration.labels(item.runbook).observe(took)
        self._metrics.runs.labels(status.value if status else state.value).inc()
        self._finish(store, item, state, status, reason)
        log.info(
            "queue.finished",
            state=state.value,
            status=status.value if status else None,
            reason=reason,
            duration_s=round(took, 3),
        )

    def _finish(
        self,
        store: AlertStore,
        item: QueueItem,
        state: QueueState,
        status: RunStatus | None,
        reason: str,
    ) -> None:
        """Close the item; while the database is away, try again (it stays ours meanwhile)."""
        while True:
            try:
                store.finish_queue_item(
                    item.item_id,
                    self.owner,
                    state,
                    now=self._clock(),
                    run_status=status,
                    reason=reason,
                )
                self._close_run(store, item)
            except StateError as exc:
                structlog.get_logger().warning(
                    "queue.finish_failed", item=item.item_id, error=str(exc)
                )
                if self._stopping.wait(IDLE_POLL):
                    return  # stopping: recovery or the reaper marks it interrupted
                continue
            return

    @staticmethod
    def _close_run(store: AlertStore, item: QueueItem) -> None:
        """A run whose end could not be recorded (the database was away) ends interrupted."""
        run = store.get_run(item.run_id) if item.run_id else None
        if run is not None and run.status is RunStatus.RUNNING:
            store.finish_run(run.run_id, RunStatus.INTERRUPTED, {})
            with audit_context(run.run_id, runbook=item.runbook, trigger=run.trigger):
                structlog.get_logger().warning(
                    "run.interrupted",
                    item=item.item_id,
                    host=item.host,
                    reason="its end could not be recorded: the state database was unreachable",
                )

    def _execute(
        self, item: QueueItem, run_id: str, services: Services
    ) -> tuple[QueueState, RunStatus | None, str]:
        runbook = self._runbooks.get(item.runbook)
        if runbook is None:
            return QueueState.FAILED, None, f"runbook {item.runbook!r} is no longer loaded"
        request = RunRequest(
            inventory=self._inventory,
            limit=item.host,
            hosts=(item.host,),
            mode=item.mode,
            trigger=f"alert:{item.fingerprint}",
            user=ALERT_USER,
            # The blast radius of an alert run is judged against the hosts its runbook
            # targets (other replicas' runs of it count too), not the one device it acts on.
            fleet=self._fleet_size(runbook.spec.targets.hosts) or None,
        )
        one_run = dataclasses.replace(services, new_run_id=lambda: run_id)
        try:
            report = self._execute_run(runbook, request, one_run)
            reason = self._request_approval(item, runbook, report, services)
        except EngineError as exc:
            return QueueState.FAILED, RunStatus.ERROR, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a worker must outlive any one run's failure
            structlog.get_logger().error(
                "queue.run_error",
                item=item.item_id,
                run_id=run_id,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
            return QueueState.FAILED, RunStatus.ERROR, f"{type(exc).__name__}: {exc}"
        return QueueState.DONE, report.status, reason

    def _request_approval(
        self, item: QueueItem, runbook: Runbook, report: RunReport, services: Services
    ) -> str:
        """For an ``approve`` trigger, keep the dry-run's plan as a pending approval."""
        if item.trigger_mode != TriggerMode.APPROVE.value:
            return ""
        plan = report.plan
        if not plan.acting or plan.refused:
            return "approve mode: nothing to approve"
        saved = seal_plan(plan, plan.created_at + self._approval_ttl, services.secrets)
        record = request_approval(
            services.store, saved, runbook, source=f"alert:{item.fingerprint}", now=self._clock()
        )
        return f"approval {record.approval_id} pending"
