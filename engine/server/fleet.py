"""The fleet as alert routing sees it: inventory hosts by runbook target pattern, indexed.

Resolving an inventory takes Ansible (a child process), far too slow per alert, so a
:class:`FleetWatcher` keeps a :class:`Fleet` snapshot, re-reads it when the inventory's files
change or every ``refresh``, and keeps the last good snapshot when a re-read fails.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from engine.errors import InventoryError, InventorySourceError
from engine.targets import Host, TargetSet

#: ``resolve_targets`` without a limit: (inventory, host pattern) → the selected hosts.
ResolveTargets = Callable[[Path, str], TargetSet]

#: A device index key: the runbook's host pattern and the host var compared (None: the name).
IndexKey = tuple[str, str | None]


def _index_value(value: object) -> str | None:
    """A host var value as compared with label text: strings and integers only."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int):
        return str(value)
    return None


@dataclass(frozen=True)
class Fleet:
    """One snapshot of the inventory: hosts per pattern and exact-match device indexes."""

    inventory: Path
    hosts: Mapping[str, tuple[Host, ...]]  # host pattern → selected hosts
    loaded_at: datetime | None
    _index: Mapping[IndexKey, Mapping[str, tuple[str, ...]]] = field(repr=False)

    @property
    def size(self) -> int:
        """Distinct hosts the trigger runbooks may act on (the breaker's fleet)."""
        return len({h.name for hosts in self.hosts.values() for h in hosts})

    def devices(self, pattern: str, var: str | None, value: str) -> tuple[str, ...]:
        """Host names of ``pattern`` whose name (or host var ``var``) equals ``value`` exactly."""
        return tuple(self._index.get((pattern, var), {}).get(value, ()))


def empty_fleet(inventory: Path) -> Fleet:
    """A fleet with no hosts (before the first load)."""
    return Fleet(inventory=inventory, hosts={}, loaded_at=None, _index={})


def load_fleet(
    inventory: Path,
    keys: Iterable[IndexKey],
    resolve: ResolveTargets,
    now: datetime,
) -> Fleet:
    """Resolve every pattern in ``keys`` and build the device indexes.

    A pattern that selects nothing is an empty group, unless the inventory itself cannot be
    read (then :class:`InventoryError` is raised).
    """
    wanted = sorted(set(keys), key=lambda k: (k[0], k[1] or ""))
    hosts: dict[str, tuple[Host, ...]] = {}
    for pattern in sorted({p for p, _ in wanted}):
        try:
            hosts[pattern] = resolve(inventory, pattern).hosts
        except InventoryError:
            resolve(inventory, "all")  # raises when the inventory is the problem
            hosts[pattern] = ()
    index: dict[IndexKey, dict[str, tuple[str, ...]]] = {}
    for pattern, var in wanted:
        by_value: dict[str, list[str]] = {}
        for host in hosts[pattern]:
            value = host.name if var is None else _index_value(host.vars.get(var))
            if value is not None:
                by_value.setdefault(value, []).append(host.name)
        index[(pattern, var)] = {k: tuple(v) for k, v in by_value.items()}
    return Fleet(inventory=inventory, hosts=hosts, loaded_at=now, _index=index)


def inventory_signature(inventory: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every file the inventory is read from (and its vars dirs)."""
    roots = [inventory]
    base = inventory if inventory.is_dir() else inventory.parent
    roots += [base / "group_vars", base / "host_vars"]
    found: list[tuple[str, int, int]] = []
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((os.fspath(path), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


class FleetWatcher:
    """Holds the current :class:`Fleet`; reloads on file change or every ``refresh``."""

    def __init__(
        self,
        inventory: Path,
        keys: Iterable[IndexKey],
        *,
        resolve: ResolveTargets,
        clock: Callable[[], datetime],
        refresh: timedelta,
    ) -> None:
        self.inventory = inventory
        self._keys = tuple(keys)
        self._resolve = resolve
        self._clock = clock
        self._refresh = refresh
        self._lock = threading.Lock()
        self._fleet = empty_fleet(inventory)
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._tried: tuple[datetime, tuple[tuple[str, int, int], ...]] | None = None
        self.error: str | None = None

    @property
    def current(self) -> Fleet:
        """The last good snapshot."""
        return self._fleet

    def load(self) -> Fleet:
        """Load now; raise :class:`InventoryError` when the inventory cannot be read.

        :class:`InventorySourceError` when its source (the balena API) is down.
        """
        with self._lock:
            signature = inventory_signature(self.inventory)
            fleet = load_fleet(self.inventory, self._keys, self._resolve, self._clock())
            self._fleet, self._signature, self.error = fleet, signature, None
        structlog.get_logger().info(
            "inventory.loaded", inventory=str(self.inventory), hosts=fleet.size
        )
        return fleet

    def reload_if_due(self) -> bool:
        """Reload when the files changed or the refresh interval passed; keep the old on error."""
        now = self._clock()
        last, seen = self._fleet.loaded_at, self._signature
        if self._tried is not None:  # the last attempt failed: wait for a change or the interval
            last, seen = self._tried
        signature = inventory_signature(self.inventory)
        due = last is None or now - last >= self._refresh
        if not due and signature == seen:
            return False
        try:
            self.load()
            self._tried = None
        except (InventoryError, InventorySourceError) as exc:  # the API down: keep the last
            self._tried = (now, signature)
            self.error = str(exc)
            structlog.get_logger().warning(
                "inventory.reload_failed", inventory=str(self.inventory), error=str(exc)
            )
            return False
        return True
