"""Routing: which runbooks an alert starts, on which one inventory host, in which mode.

An alert matches a runbook trigger by ``alertname``, ``match`` (equal labels) and ``match_re``
(labels fully matching a regular expression; a missing label is the empty string, as in
Alertmanager).  The device label's text is looked up **exactly** among the inventory hosts of
the runbook's target pattern (by name, or by the trigger's ``device_var`` host var); only the
inventory host *name* found goes further.  Label text is never a host pattern, never a
template and never part of a command.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.outcomes import Mode
from engine.runbooks import Runbook
from engine.runbooks.spec import Trigger, TriggerMode
from engine.server.alerts import Alert
from engine.server.fleet import Fleet, IndexKey
from engine.server.queue import FiringOutcome, QueueRoute

#: Inventory host names that select exactly that host as an Ansible ``--limit``.
_PLAIN_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PORT = re.compile(r"[0-9]{1,5}")


def run_mode(trigger: TriggerMode) -> Mode:
    """The mode a run started by a trigger has.

    The seam for approvals: ``approve`` plans (a dry run) until operator approval of
    alert-triggered plans is wired; the queue item keeps the trigger's mode to say so.
    """
    return Mode.APPLY if trigger is TriggerMode.APPLY else Mode.DRY_RUN


def strip_port(value: str) -> str:
    """``host:9100`` → ``host``; ``[::1]:9100`` → ``::1``; anything else unchanged."""
    if value.startswith("[") and "]:" in value:
        host, _, port = value[1:].partition("]:")
        return host if _PORT.fullmatch(port) else value
    host, sep, port = value.rpartition(":")
    if sep and host and ":" not in host and _PORT.fullmatch(port):
        return host
    return value


@dataclass(frozen=True)
class Routing:
    """What routing decided for one firing alert."""

    outcome: FiringOutcome
    reason: str
    routes: tuple[QueueRoute, ...] = ()


@dataclass(frozen=True)
class _CompiledTrigger:
    runbook: Runbook
    trigger: Trigger
    alertnames: frozenset[str]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]

    def matches(self, alert: Alert) -> bool:
        labels = alert.labels
        if alert.alertname not in self.alertnames:
            return False
        if any(labels.get(k, "") != v for k, v in self.trigger.match.items()):
            return False
        return all(rx.fullmatch(labels.get(k, "")) for k, rx in self.regexes)


#: Routing decisions remembered for one fleet snapshot (the same devices alert again and again).
MEMO_SIZE = 4096
#: Alerts whose routing labels are longer than this (in all) are routed afresh, never remembered.
MEMO_KEY_CHARS = 1024


class Router:
    """Routes alerts to runbook runs through the runbooks' triggers.

    A decision depends only on the labels the triggers read (``alertname``, ``match``,
    ``match_re`` and device labels) and on the fleet snapshot, so decisions are remembered per
    snapshot by those label values (a bounded memo, dropped when the snapshot changes).
    """

    def __init__(self, runbooks: Iterable[Runbook]) -> None:
        self.runbooks = {rb.name: rb for rb in runbooks if rb.spec.triggers}
        self._triggers = tuple(
            _CompiledTrigger(
                runbook=rb,
                trigger=trigger,
                alertnames=frozenset(trigger.alertname),
                regexes=tuple((k, re.compile(v)) for k, v in trigger.match_re.items()),
            )
            for rb in self.runbooks.values()
            for trigger in rb.spec.triggers
        )
        read = {"alertname"}
        for compiled in self._triggers:
            trigger = compiled.trigger
            read |= {*trigger.match, *trigger.match_re, trigger.device_label}
        self._read_labels = tuple(sorted(read))
        self._memo: dict[tuple[str | None, ...], Routing] = {}
        self._memo_fleet: Fleet | None = None
        self._memo_lock = threading.Lock()

    @property
    def index_keys(self) -> tuple[IndexKey, ...]:
        """The (host pattern, device var) pairs the fleet must index."""
        keys = {(t.runbook.spec.targets.hosts, t.trigger.device_var) for t in self._triggers}
        return tuple(sorted(keys, key=lambda k: (k[0], k[1] or "")))

    def route(self, alert: Alert, fleet: Fleet) -> Routing:
        """Decide the runs one firing alert starts (the first matching trigger per runbook)."""
        key = tuple(map(alert.labels.get, self._read_labels))
        if sum(len(v) for v in key if v is not None) > MEMO_KEY_CHARS:
            return self._decide(alert, fleet)
        with self._memo_lock:
            if fleet is not self._memo_fleet:
                self._memo, self._memo_fleet = {}, fleet
            known = self._memo.get(key)
        if known is not None:
            return known
        decided = self._decide(alert, fleet)
        with self._memo_lock:
            if fleet is self._memo_fleet:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[key] = decided
        return decided

    def _decide(self, alert: Alert, fleet: Fleet) -> Routing:
        matched: dict[str, _CompiledTrigger] = {}
        for compiled in self._triggers:
            if compiled.runbook.name not in matched and compiled.matches(alert):
                matched[compiled.runbook.name] = compiled
        if not matched:
            return Routing(FiringOutcome.UNMATCHED, "no runbook trigger matches the alert")
        routes: list[QueueRoute] = []
        problems: list[str] = []
        for name, compiled in matched.items():
            host, problem = _device(compiled, alert, fleet)
            if host is None:
                problems.append(f"runbook {name}: {problem}")
                continue
            routes.append(
                QueueRoute(
                    runbook=name,
                    host=host,
                    trigger_mode=compiled.trigger.mode.value,
                    mode=run_mode(compiled.trigger.mode),
                )
            )
        reason = "; ".join(problems)
        if not routes:
            return Routing(FiringOutcome.UNRESOLVED, reason)
        return Routing(FiringOutcome.QUEUED, reason, tuple(routes))


def _device(compiled: _CompiledTrigger, alert: Alert, fleet: Fleet) -> tuple[str | None, str]:
    """The one inventory host the alert names for this trigger, or why there is none.

    Reasons never quote the label text: it is untrusted and may be huge; it stays in the
    recorded labels.
    """
    trigger = compiled.trigger
    label = trigger.device_label
    value = alert.labels.get(label)
    if value is None:
        return None, f"the alert has no {label!r} label"
    if trigger.strip_port:
        value = strip_port(value)
    pattern = compiled.runbook.spec.targets.hosts
    found: Sequence[str] = fleet.devices(pattern, trigger.device_var, value)
    compared = f"host var {trigger.device_var!r}" if trigger.device_var else "host name"
    if not found:
        return None, (
            f"no host of {pattern!r} in {fleet.inventory} has a {compared} equal to "
            f"the {label!r} label"
        )
    if len(found) > 1:
        return None, (
            f"{len(found)} hosts of {pattern!r} have a {compared} equal to the {label!r} label "
            f"({', '.join(found[:5])}): a device must be exactly one host"
        )
    host = found[0]
    if not _PLAIN_HOST_NAME.fullmatch(host):
        return None, f"inventory host name {host!r} is not a plain name usable as an exact limit"
    return host, ""
