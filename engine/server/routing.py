"""Routing: which runbooks an alert starts, on which one inventory host, in which mode.

An alert matches a runbook trigger by ``alertname``, ``match`` (equal labels) and ``match_re``
(labels fully matching a regular expression; a missing label is the empty string, as in
Alertmanager).  The device label's text (the first of the trigger's device labels the alert
has) is looked up **exactly** among the inventory hosts of the runbook's target pattern (by
name, or by the trigger's ``device_var`` host var); only the inventory host *name* found goes
further.  Label text is never a host pattern, never a template and never part of a command.

:meth:`Router.explain` returns the decision with its reasons as values (which matcher of
which trigger failed, which device label was read, which hosts were found): ``remediate
route`` prints them, and the server's decisions are made of the same call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

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


class Matcher(StrEnum):
    """The parts of a trigger an alert is matched against, in the order they are tried."""

    ALERTNAME = "alertname"
    MATCH = "match"
    MATCH_RE = "match_re"


@dataclass(frozen=True)
class Mismatch:
    """The first matcher of a trigger that an alert fails.

    ``expected`` holds the trigger's side (the alert names, the equal value or the regular
    expression); ``actual`` the alert's label text (None: the alert has no such label), which
    is untrusted: show it quoted and shortened, never as markup or part of a command.
    """

    matcher: Matcher
    label: str
    expected: tuple[str, ...]
    actual: str | None


@dataclass(frozen=True)
class TriggerCheck:
    """One trigger of a runbook checked against an alert (``index`` counts from 0)."""

    index: int
    mismatch: Mismatch | None = None  # None: the trigger matches

    @property
    def matched(self) -> bool:
        """Whether the alert matches this trigger."""
        return self.mismatch is None


@dataclass(frozen=True)
class DeviceLookup:
    """The inventory host a matched trigger's device label names, or why there is none.

    ``label`` is the device label the alert has (the first present of the trigger's), ``hosts``
    the inventory hosts whose name (or ``device_var``) equals its text, ``problem`` empty when
    exactly one usable host was found.
    """

    label: str | None
    hosts: tuple[str, ...] = ()
    problem: str = ""

    @property
    def host(self) -> str | None:
        """The one host the run would go to, or None."""
        return self.hosts[0] if not self.problem else None


@dataclass(frozen=True)
class RunbookExplanation:
    """One runbook with triggers, against one alert.

    ``triggers``: those tried, in order, up to the first that matches; for that one, the
    device lookup and the run it would queue.
    """

    runbook: str
    triggers: tuple[TriggerCheck, ...]
    device: DeviceLookup | None = None
    route: QueueRoute | None = None

    @property
    def trigger(self) -> int | None:
        """Index of the trigger that matched, if one did."""
        last = self.triggers[-1] if self.triggers else None
        return last.index if last is not None and last.matched else None


@dataclass(frozen=True)
class Explanation:
    """How an alert is routed: every runbook with triggers, and the decision that follows."""

    routing: Routing
    runbooks: tuple[RunbookExplanation, ...]


@dataclass(frozen=True)
class _CompiledTrigger:
    index: int
    trigger: Trigger
    alertnames: frozenset[str]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]

    def mismatch(self, labels: Mapping[str, str]) -> Mismatch | None:
        """The first matcher the labels fail, or None when they match.

        A missing label counts as the empty string, as in Alertmanager.
        """
        if labels.get("alertname", "") not in self.alertnames:
            return Mismatch(
                Matcher.ALERTNAME, "alertname", self.trigger.alertname, labels.get("alertname")
            )
        for label, value in self.trigger.match.items():
            if labels.get(label, "") != value:
                return Mismatch(Matcher.MATCH, label, (value,), labels.get(label))
        for label, regex in self.regexes:
            if not regex.fullmatch(labels.get(label, "")):
                return Mismatch(Matcher.MATCH_RE, label, (regex.pattern,), labels.get(label))
        return None


#: Routing decisions remembered for one fleet snapshot (the same devices alert again and again).
MEMO_SIZE = 4096
#: Alerts whose routing labels are longer than this (in all) are routed afresh, never remembered.
MEMO_KEY_CHARS = 1024


class Router:
    """Routes alerts to runbook runs through the runbooks' triggers.

    A decision depends only on the labels the triggers read (``alertname``, ``match``,
    ``match_re`` and device labels) and on the fleet snapshot, so decisions are remembered per
    snapshot by those label values (a bounded memo, dropped when the snapshot changes).
    :meth:`explain` is the decision with its reasons, as values: :meth:`route` is made of it.
    """

    def __init__(self, runbooks: Iterable[Runbook]) -> None:
        self.runbooks = {rb.name: rb for rb in runbooks if rb.spec.triggers}
        self._triggers = {
            name: tuple(
                _CompiledTrigger(
                    index=index,
                    trigger=trigger,
                    alertnames=frozenset(trigger.alertname),
                    regexes=tuple((k, re.compile(v)) for k, v in trigger.match_re.items()),
                )
                for index, trigger in enumerate(rb.spec.triggers)
            )
            for name, rb in self.runbooks.items()
        }
        read = {"alertname"}
        for rb in self.runbooks.values():
            for trigger in rb.spec.triggers:
                read |= {*trigger.match, *trigger.match_re, *trigger.device_label}
        self._read_labels = tuple(sorted(read))
        self._memo: dict[tuple[str | None, ...], Routing] = {}
        self._memo_fleet: Fleet | None = None
        self._memo_lock = threading.Lock()

    @property
    def index_keys(self) -> tuple[IndexKey, ...]:
        """The (host pattern, device var) pairs the fleet must index."""
        keys = {
            (rb.spec.targets.hosts, trigger.device_var)
            for rb in self.runbooks.values()
            for trigger in rb.spec.triggers
        }
        return tuple(sorted(keys, key=lambda k: (k[0], k[1] or "")))

    def route(self, alert: Alert, fleet: Fleet) -> Routing:
        """Decide the runs one firing alert starts (the first matching trigger per runbook)."""
        key = tuple(map(alert.labels.get, self._read_labels))
        if sum(len(v) for v in key if v is not None) > MEMO_KEY_CHARS:
            return self.explain(alert.labels, fleet).routing
        with self._memo_lock:
            if fleet is not self._memo_fleet:
                self._memo, self._memo_fleet = {}, fleet
            known = self._memo.get(key)
        if known is not None:
            return known
        decided = self.explain(alert.labels, fleet).routing
        with self._memo_lock:
            if fleet is self._memo_fleet:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[key] = decided
        return decided

    def explain(self, labels: Mapping[str, str], fleet: Fleet) -> Explanation:
        """Route an alert's labels, keeping why: per runbook, the triggers tried and the device.

        Never remembered (``route`` remembers the decisions); reads no clock and no network.
        """
        runbooks: list[RunbookExplanation] = []
        routes: list[QueueRoute] = []
        problems: list[str] = []
        for name, triggers in self._triggers.items():
            checks: list[TriggerCheck] = []
            matched: _CompiledTrigger | None = None
            for compiled in triggers:
                mismatch = compiled.mismatch(labels)
                checks.append(TriggerCheck(compiled.index, mismatch))
                if mismatch is None:
                    matched = compiled
                    break
            if matched is None:
                runbooks.append(RunbookExplanation(name, tuple(checks)))
                continue
            device = _device(self.runbooks[name], matched.trigger, labels, fleet)
            route = None
            if device.host is None:
                problems.append(f"runbook {name}: {device.problem}")
            else:
                route = QueueRoute(
                    runbook=name,
                    host=device.host,
                    trigger_mode=matched.trigger.mode.value,
                    mode=run_mode(matched.trigger.mode),
                )
                routes.append(route)
            runbooks.append(RunbookExplanation(name, tuple(checks), device, route))
        reason = "; ".join(problems)
        if routes:
            routing = Routing(FiringOutcome.QUEUED, reason, tuple(routes))
        elif problems:
            routing = Routing(FiringOutcome.UNRESOLVED, reason)
        else:
            routing = Routing(FiringOutcome.UNMATCHED, "no runbook trigger matches the alert")
        return Explanation(routing, tuple(runbooks))


def _device(
    runbook: Runbook, trigger: Trigger, labels: Mapping[str, str], fleet: Fleet
) -> DeviceLookup:
    """The one inventory host the alert names for this trigger, or why there is none.

    Problems never quote the label text: it is untrusted and may be huge; it stays in the
    recorded labels.
    """
    label = next((name for name in trigger.device_label if name in labels), None)
    if label is None:
        names = trigger.device_label
        if len(names) == 1:
            return DeviceLookup(None, problem=f"the alert has no {names[0]!r} label")
        listed = ", ".join(repr(n) for n in names)
        return DeviceLookup(None, problem=f"the alert has none of the labels {listed}")
    value = labels[label]
    if trigger.strip_port:
        value = strip_port(value)
    pattern = runbook.spec.targets.hosts
    found = fleet.devices(pattern, trigger.device_var, value)
    compared = f"host var {trigger.device_var!r}" if trigger.device_var else "host name"
    if not found:
        return DeviceLookup(
            label,
            problem=f"no host of {pattern!r} in {fleet.inventory} has a {compared} equal to "
            f"the {label!r} label",
        )
    if len(found) > 1:
        return DeviceLookup(
            label,
            found,
            f"{len(found)} hosts of {pattern!r} have a {compared} equal to the {label!r} label "
            f"({', '.join(found[:5])}): a device must be exactly one host",
        )
    host = found[0]
    if not _PLAIN_HOST_NAME.fullmatch(host):
        return DeviceLookup(
            label,
            found,
            f"inventory host name {host!r} is not a plain name usable as an exact limit",
        )
    return DeviceLookup(label, found)
