"""An executor for unit tests: answers from a table and records every call.

``scripts`` maps a host to how it answers ``run_script``: a :class:`FakeReply`
(exit code, stdout, or unreachable), or a callable that receives the script and returns
the stdout (or a whole :class:`FakeReply`), for probes whose output depends on the script.
``playbooks`` maps a host to its playbook outcome: a :class:`HostStatus`, or a callable
``(request, host) -> PlaybookResult`` (which may also change the state a later probe
reads, to simulate a fix).  Hosts missing from a table come back ``failed``, as a host
missing from the inventory does with the real executor.

``hosts`` and ``groups`` are the fake's inventory, and all it knows of one: host name → vars
in inventory order (by default the hosts of ``scripts``, with no vars), and group name → its
hosts.  The fake never reads the inventory file a call names.  ``select_and_run_script``
selects from that table with a small, exact subset of Ansible's host patterns, for both the
pattern and the limit: terms separated by ``,`` or ``:``, each ``all`` (or ``*``), a group or
a host name, ``!`` before a term to exclude it and ``&`` to intersect (plain terms first,
then ``&``, then ``!``; a pattern of ``!``/``&`` terms alone starts from ``all``); a name the
table does not hold selects nothing, as in Ansible.  Anything else (globs, ``~regex``,
``@file``) is a ``ValueError``: a test that needs Ansible's own selection uses the real
executor.  It then answers the script from ``scripts`` on the kept hosts.

Every call is recorded in ``script_calls`` / ``playbook_calls``, so a test can assert
that a dry run started no playbook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.executors.base import (
    CommandResult,
    Host,
    HostStatus,
    PlaybookRequest,
    PlaybookResult,
    Selection,
    SelectionResult,
)
from engine.models import FrozenModel


class FakeReply(FrozenModel):
    """How one fake host answers a script: ``unreachable`` set means it could not be reached."""

    rc: int = 0
    stdout: str = ""
    stderr: str = ""
    unreachable: str | None = None


class ScriptCall(FrozenModel):
    """One recorded ``run_script`` call."""

    inventory: Path
    hosts: tuple[str, ...]
    script: str
    timeout: float


class PlaybookCall(FrozenModel):
    """One recorded ``run_playbook`` call."""

    inventory: Path
    request: PlaybookRequest
    artifacts_dir: Path


#: Ansible evaluates a pattern's plain terms first, then ``&`` ones, then ``!`` ones.
_TERM_ORDER = {"": 0, "&": 1, "!": 2}

ScriptAnswer = FakeReply | Callable[[str], "FakeReply | str"]
PlaybookAnswer = HostStatus | Callable[[PlaybookRequest, str], PlaybookResult]


class FakeExecutor:
    """A table-driven :class:`~engine.executors.base.Executor` that records its calls."""

    def __init__(
        self,
        scripts: Mapping[str, ScriptAnswer] | None = None,
        playbooks: Mapping[str, PlaybookAnswer] | None = None,
        *,
        hosts: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``hosts`` (name → vars, or names alone; default: the ``scripts`` hosts), ``groups``."""
        self.scripts: dict[str, ScriptAnswer] = dict(scripts or {})
        if hosts is None:
            hosts = list(self.scripts)
        table: Mapping[str, Mapping[str, Any]] = (
            hosts if isinstance(hosts, Mapping) else {name: {} for name in hosts}
        )
        self.hosts: tuple[Host, ...] = tuple(
            Host(name=name, vars=dict(host_vars)) for name, host_vars in table.items()
        )
        self.groups: dict[str, tuple[str, ...]] = {
            name: tuple(members) for name, members in (groups or {}).items()
        }
        self.playbooks: dict[str, PlaybookAnswer] = dict(playbooks or {})
        self.script_calls: list[ScriptCall] = []
        self.playbook_calls: list[PlaybookCall] = []

    def run_script(
        self, inventory: Path, hosts: Sequence[str], script: str, *, timeout: float
    ) -> Mapping[str, CommandResult]:
        """Answer each host from ``scripts``; record the call."""
        self.script_calls.append(
            ScriptCall(inventory=inventory, hosts=tuple(hosts), script=script, timeout=timeout)
        )
        return {host: self._script_result(host, script) for host in hosts}

    def select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> SelectionResult:
        """Select hosts from ``hosts``, answer the kept ones from ``scripts``; record the call."""
        chosen = self._select(selection.pattern)
        if selection.limit is not None:
            chosen &= self._select(selection.limit)
        hosts = tuple(h for h in self.hosts if h.name in chosen)
        ran = [h.name for h in hosts if selection.only is None or h.name in selection.only]
        return SelectionResult(
            hosts=hosts,
            results=dict(self.run_script(selection.inventory, ran, script, timeout=timeout)),
        )

    def run_playbook(
        self, inventory: Path, request: PlaybookRequest, *, artifacts_dir: Path
    ) -> Mapping[str, PlaybookResult]:
        """Answer each host from ``playbooks`` (default: ok); record the call."""
        self.playbook_calls.append(
            PlaybookCall(inventory=inventory, request=request, artifacts_dir=artifacts_dir)
        )
        return {host: self._playbook_result(request, host) for host in request.hosts}

    @property
    def playbooks_run(self) -> tuple[Path, ...]:
        """The playbooks requested so far, in order."""
        return tuple(call.request.playbook for call in self.playbook_calls)

    def _select(self, pattern: str) -> set[str]:
        """The host names ``pattern`` selects from the table (the subset described above)."""
        names = {h.name for h in self.hosts}
        terms = [t.strip() for t in pattern.replace(",", ":").split(":") if t.strip()]
        if all(t[0] in "!&" for t in terms):  # as in Ansible: "!x" alone means "all:!x"
            terms.insert(0, "all")
        chosen: set[str] = set()
        for term in sorted(terms, key=lambda t: _TERM_ORDER.get(t[0], 0)):
            prefix, word = (term[0], term[1:]) if term[0] in "!&" else ("", term)
            if word in {"all", "*"}:
                matched = names
            elif word in self.groups:
                matched = set(self.groups[word]) & names
            elif word and not set(word) & set("*?[]~@"):
                matched = {word} & names
            else:
                raise ValueError(f"fake executor: unsupported host pattern term {term!r}")
            if prefix == "!":
                chosen -= matched
            elif prefix == "&":
                chosen &= matched
            else:
                chosen |= matched
        return chosen

    def _script_result(self, host: str, script: str) -> CommandResult:
        answer = self.scripts.get(host)
        if answer is None:
            return CommandResult(
                host=host, status=HostStatus.FAILED, message=f"no fake answer for host {host}"
            )
        reply = answer if isinstance(answer, FakeReply) else answer(script)
        if isinstance(reply, str):
            reply = FakeReply(stdout=reply)
        if reply.unreachable is not None:
            return CommandResult(
                host=host,
                status=HostStatus.UNREACHABLE,
                message=reply.unreachable or "unreachable",
            )
        return CommandResult(
            host=host,
            status=HostStatus.OK if reply.rc == 0 else HostStatus.FAILED,
            rc=reply.rc,
            stdout=reply.stdout,
            stderr=reply.stderr,
            message="" if reply.rc == 0 else "non-zero return code",
        )

    def _playbook_result(self, request: PlaybookRequest, host: str) -> PlaybookResult:
        answer = self.playbooks.get(host, HostStatus.OK)
        if isinstance(answer, HostStatus):
            message = "" if answer is HostStatus.OK else f"fake {answer.value}"
            return PlaybookResult(host=host, status=answer, message=message)
        return answer(request, host)
