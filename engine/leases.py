"""Leases: a run holds each device it acts on through a lease it keeps renewing.

A :class:`LeaseKeeper` takes the leases of one batch (``lease.acquired``, with the fencing
token), renews them (and the run's fleet-wide admission) from a thread every third of their
time to live while the playbooks run, and notices a lease it lost (``lease.lost``): the
store refused the renewal (the lease expired and passed on), or the store could not be
reached for longer than the lease lives, or the run held the device longer than its
runbook's ``lock_ttl``.  The pipeline acts no more on a lost device, and writes its results
fenced by the lease (:meth:`LeaseKeeper.lease`), so a late write cannot land.

Expiry is the store's clock, never this process's: a controller that stops renewing (it
died, or cannot reach the database) loses its devices after ``ttl``, and whoever finds the
expired lease next marks its run interrupted (:func:`audit_interruptions`).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from types import TracebackType
from typing import Self

import structlog

from engine.audit import audit_context, log_anyway
from engine.errors import StateError
from engine.state import Interruption, Lease, LeaseGrant, StateStore


def audit_interruptions(interruptions: Sequence[Interruption]) -> None:
    """Audit ``run.interrupted`` for runs found with expired leases (in their own context)."""
    for found in interruptions:
        with audit_context(found.run_id, runbook=found.runbook, trigger=found.trigger):
            structlog.get_logger().warning(
                "run.interrupted",
                host=found.host,
                token=found.token,
                item=found.item_id,
                reason=found.reason,
            )


class LeaseKeeper:
    """The device leases of one run: taken, renewed in the background, released, or lost."""

    def __init__(
        self,
        store: StateStore,
        *,
        run_id: str,
        holder: str,
        ttl: timedelta,
        max_hold: timedelta,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._holder = holder
        self._ttl = ttl
        self._max_hold = max_hold.total_seconds()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Lease, float]] = {}  # host -> lease, when taken (monotonic)
        self.lost: dict[str, str] = {}  # host -> why
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = time.monotonic()
        self._log = structlog.get_logger()

    def __enter__(self) -> Self:
        context = contextvars.copy_context()  # events from the thread carry the run's context
        self._thread = threading.Thread(
            target=context.run,
            args=(self._renew_until_stopped,),
            name=f"remediate-leases-{self._run_id}",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release_all()

    def acquire(self, host: str) -> LeaseGrant:
        """Take ``host``'s lease (audited, with its token); audit runs found dead on the way."""
        grant = self._store.acquire_lease(host, self._run_id, holder=self._holder, ttl=self._ttl)
        audit_interruptions(grant.interrupted)
        if grant.lease is not None:
            with self._lock:
                self._held[host] = (grant.lease, time.monotonic())
                self.lost.pop(host, None)
            self._log.info(
                "lease.acquired",
                host=host,
                token=grant.lease.token,
                expires_at=grant.lease.expires_at,
            )
        return grant

    def lease(self, host: str) -> Lease | None:
        """The lease held on ``host`` (for fenced writes), or None when lost or never held."""
        with self._lock:
            held = self._held.get(host)
        return None if held is None else held[0]

    def release_all(self) -> None:
        """Give every held lease up."""
        with self._lock:
            held, self._held = self._held, {}
        for lease, _ in held.values():
            try:
                self._store.release_lease(lease)
            except StateError as exc:  # it expires on its own
                log_anyway(
                    self._log.warning, "lease.release_failed", host=lease.host, error=str(exc)
                )

    def mark_lost(self, host: str, why: str) -> None:
        """Stop acting on ``host``: its lease is gone (audited as ``lease.lost``)."""
        with self._lock:
            held = self._held.pop(host, None)
            self.lost[host] = why
        log_anyway(
            self._log.warning,
            "lease.lost",
            host=host,
            token=held[0].token if held else None,
            reason=why,
        )

    def renew(self) -> None:
        """Renew every held lease and the run's admission once; note the ones lost."""
        now = time.monotonic()
        with self._lock:
            held = dict(self._held)
        for host, (_, taken) in held.items():
            if now - taken > self._max_hold:
                self.mark_lost(
                    host, f"held longer than the runbook's lock_ttl ({self._max_hold:g}s)"
                )
        with self._lock:
            leases = [lease for lease, _ in self._held.values()]
        try:
            renewed = self._store.renew_leases(leases, self._ttl)
            self._store.renew_admission(self._run_id, self._ttl)
        except StateError as exc:
            log_anyway(self._log.warning, "lease.renew_failed", error=str(exc))
            if now - self._renewed_at >= self._ttl.total_seconds():
                for lease in leases:
                    self.mark_lost(lease.host, f"could not renew it for {self._ttl}: {exc}")
            return
        self._renewed_at = now
        kept = {lease.host: lease for lease in renewed}
        for lease in leases:
            if lease.host not in kept:
                self.mark_lost(lease.host, "the store refused its renewal: it expired or passed on")
                continue
            with self._lock:
                if lease.host in self._held:
                    self._held[lease.host] = (kept[lease.host], self._held[lease.host][1])

    def _renew_until_stopped(self) -> None:
        interval = self._ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            self.renew()
