"""State: runs, host outcomes, cool-downs, device leases, approvals and the alert queue.

::

    records    the values a store takes and returns (runs, hosts, leases, approvals)
    protocols  StateStore, AlertStore, StateDatabase: what the engine needs of a backend
    factory    open_database(url): the one place that picks a backend
    sqlite/    the embedded default (one file, one server at a time)
    postgres/  PostgreSQL (replicas share it; leases on the database's clock)

The webhook queue's own values live next to the server (:mod:`engine.server.queue`).
Nothing outside this package knows which backend it has.
"""

from __future__ import annotations

from engine.state.factory import open_database, redacted_url, sqlite_url
from engine.state.protocols import AlertStore, StateDatabase, StateStore
from engine.state.records import (
    Admission,
    ApprovalRecord,
    ApprovalStatus,
    HostRecord,
    Interruption,
    Lease,
    LeaseGrant,
    RunRecord,
)

__all__ = [
    "Admission",
    "AlertStore",
    "ApprovalRecord",
    "ApprovalStatus",
    "HostRecord",
    "Interruption",
    "Lease",
    "LeaseGrant",
    "RunRecord",
    "StateDatabase",
    "StateStore",
    "open_database",
    "redacted_url",
    "sqlite_url",
]
