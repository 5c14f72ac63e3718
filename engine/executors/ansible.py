"""The executor that drives real ansible-runner.

Everything Ansible-specific the engine depends on lives here:

* ``run_script`` runs **one** generated play (``gather_facts: false``, one
  ``ansible.builtin.raw`` task) over exactly the requested hosts, in one ansible-runner
  invocation.  The script goes into the play tagged ``!unsafe``, so Ansible passes it
  verbatim even when it contains ``{{ }}``.
* ``select_and_run_script`` is ``run_script`` over the hosts a host pattern and a limit
  select: the play's ``hosts`` is the pattern (``&all`` added, so Ansible's implicit
  ``localhost`` never runs it) and ``--limit`` the limit, and the ``remediate_targets``
  callback plugin (``ansible_callbacks/``) writes what Ansible selected, with the hosts'
  untemplated inventory vars, to a file read after the run: targets and first probe come
  from one ``ansible-playbook``, which reads the inventory once.
  ``start_select_and_run_script`` starts the same call in a thread and returns once
  ``ansible-playbook`` has been spawned, so the caller can work while Ansible starts up.
* ``run_playbook`` runs a project playbook limited to the requested hosts.  Extra vars
  are written by us to ``env/extravars`` as YAML with **every string tagged ``!unsafe``**:
  ansible-core (2.19 included) treats extra vars as trusted and would otherwise render
  any ``{{ }}`` they contain, and their values can come from devices and alerts.
* Hosts are selected with ``--limit @file`` whose single line is an anchored regex of
  the escaped names, so no host name is ever read as a pattern (glob, range, ``!``,
  ``&``), and Ansible's implicit ``localhost`` is never added.  (Ansible still matches a
  *group* that has exactly a requested host's name; it warns about such inventories.)
* Events are consumed once, as they stream, by an event handler; only the per-host
  results are kept.  A host that never shows up in the events is reported ``failed``.
* What a playbook leaves is private and holds no secret the executor knows
  (:mod:`engine.redaction`): each event is scrubbed in the handler before ansible-runner
  writes it, every artifact file once the run is over; folders are ``0700``, files
  ``0600``.  ansible-playbook gets this process's environment (ansible-runner copies it)
  with the engine's own credentials blanked.
* Every run finds the project's inventory plugins (``ANSIBLE_INVENTORY_PLUGINS``); when
  ``ansible-playbook`` stops because the balena plugin failed, its one-line error is raised
  as what it is (:func:`engine.balena.inventory_error`: the token, the API), not as a tool
  failure.

A device that fails is a result.  ansible-runner or ansible-playbook failing as a tool
(bad playbook, missing binary, no final stats) raises :class:`ExecutorError`.

SIGINT and SIGTERM stop a running ``ansible-playbook`` and are delivered again once the
call has cleaned up; ansible-runner checks for that every ``_CANCEL_CHECK`` seconds (its
own default is 5 s).  ansible-runner kills ansible-playbook's process group only, but
Ansible's workers call ``setsid()``: they, and the task commands they run, would go on
unseen (ansible-runner #973).  So a cancel first stops ansible-playbook (it starts no more
tasks) and notes its whole process tree (:class:`_Tree`); once ansible-runner has killed
the group, the tasks in flight get ``cancel_grace`` seconds to finish (a playbook's step is
not cut short mid-command if it can end; a probe, read-only, gets none), then whatever is
left of the tree is killed.  Nothing the call started outlives it.

One adjustment to ansible-runner, kept here (:func:`_close_promptly`): the pty it reads
ansible-playbook through is closed without ptyprocess' fixed 0.1 s sleep, which every run
paid after ansible-playbook had already exited.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import ansible_runner
import ansible_runner.runner
import pexpect
import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field

from engine.ansible_plugins import inventory_plugins_env
from engine.balena import carries_error, inventory_error
from engine.errors import ExecutorError, InventoryError
from engine.executors.ansible_env import INVENTORY_ENV, PLAIN_OUTPUT_ENV
from engine.executors.base import (
    CommandResult,
    Host,
    HostStatus,
    PendingSelection,
    PlaybookRequest,
    PlaybookResult,
    Selection,
    SelectionResult,
    TaskResult,
)
from engine.privacy import private_dir, tighten_tree
from engine.redaction import NO_SECRETS, Secrets, is_engine_secret_env

_ERROR_TAIL_LINES = 20
#: Callback plugins of our own, loaded only by runs that select their hosts.
_CALLBACKS_DIR = Path(__file__).parent / "ansible_callbacks"
#: ansible-runner's event callback as probes use it: no ``runner_on_start`` event per host
#: (``ansible_display/awx_display.py``); ansible-runner loads it from ``AWX_LIB_DIRECTORY``.
_PROBE_DISPLAY_DIR = Path(__file__).parent / "ansible_display"
#: What the remediate_targets callback reads (it knows the name: ``REQUEST_ENV``).
_TARGETS_REQUEST_ENV = "REMEDIATE_TARGETS"
#: Seconds between ansible-runner's checks for a cancel (``pexpect_timeout``; 5 by default).
_CANCEL_CHECK = 0.2
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_HOST_EVENTS = {
    "runner_on_ok": HostStatus.OK,
    "runner_on_failed": HostStatus.FAILED,
    "runner_on_unreachable": HostStatus.UNREACHABLE,
    "runner_on_skipped": None,
}


class AnsibleSettings(BaseModel):
    """How the engine drives Ansible; built once by an entry point and passed in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    work_dir: Path
    """Private data dirs of ansible-runner are created (and removed) under this directory."""
    forks: int = Field(default=50, ge=1)
    """Hosts Ansible works on in parallel."""
    ssh_timeout: int = Field(default=10, ge=1)
    """Seconds to wait for an SSH connection (``ANSIBLE_TIMEOUT``)."""
    ssh_args: tuple[str, ...] | None = None
    """Replaces Ansible's default ``ssh_args`` (``-C -o ControlMaster=auto -o ControlPersist=60s``).

    Inventory ``ansible_ssh_common_args``/``ansible_ssh_extra_args`` still add to them.
    """
    host_key_checking: bool = True
    """Default for hosts whose inventory does not set ``ansible_host_key_checking``.

    ansible-runner would turn checking off for everything; we keep Ansible's own default.
    """
    playbook_task_timeout: int = Field(default=900, ge=0)
    """Upper bound in seconds of any one task of a playbook (``ANSIBLE_TASK_TIMEOUT``; 0: none)."""
    ansible_bin_dir: Path = Field(default_factory=lambda: Path(sys.executable).parent)
    """Directory holding ``ansible-playbook``; by default the one beside the running Python."""
    cancel_grace: float = Field(default=10.0, ge=0)
    """Seconds a cancelled playbook's tasks in flight get to finish before they are killed."""


class AnsibleExecutor:
    """Runs probe scripts and playbooks through ansible-runner (see the module docstring)."""

    def __init__(
        self,
        settings: AnsibleSettings,
        *,
        cancel: Callable[[], bool] | None = None,
        secrets: Secrets = NO_SECRETS,
    ) -> None:
        """``cancel`` returning true stops running ansible-playbook children (server shutdown).

        ``secrets`` are scrubbed from what a playbook leaves (its events, task results and
        artifacts) and from every error's text.  A probe's output is returned as it is: it is
        the evidence guards decide on, and is scrubbed where it is kept (plans, audit log).
        """
        self._settings = settings
        self._cancel = cancel
        self._secrets = secrets

    def run_script(
        self, inventory: Path, hosts: Sequence[str], script: str, *, timeout: float
    ) -> Mapping[str, CommandResult]:
        """Run ``script`` verbatim with one ``raw`` task on each host; a result for every host."""
        wanted = tuple(dict.fromkeys(hosts))
        if not wanted:
            return {}
        collector = _ScriptResults(frozenset(wanted))
        private = Path(tempfile.mkdtemp(prefix="script-", dir=private_dir(self._settings.work_dir)))
        try:
            self._run_probe_play(
                private,
                inventory,
                _probe_play(script, timeout, "all"),
                what=f"probe script on {len(wanted)} host(s) of {inventory}",
                limit=_limit_file(private, wanted),
                collector=collector,
                extra_env={},
            )
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return {host: collector.result(host) for host in wanted}

    def select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> SelectionResult:
        """Run ``script`` on the hosts Ansible selects; those hosts with their vars (see above).

        An inventory or a limit Ansible cannot read makes ansible-playbook fail before any
        host is selected: :class:`ExecutorError`, with Ansible's message.
        """
        return self._select_and_run(selection, script, timeout, cancelled=None)

    def start_select_and_run_script(
        self, selection: Selection, script: str, *, timeout: float
    ) -> PendingSelection:
        """:meth:`select_and_run_script` in a thread; returns once ansible-playbook runs.

        Until the call is collected or cancelled, SIGINT and SIGTERM (when started from the
        main thread) stop it instead of the caller, and are delivered again afterwards.
        """
        return _PendingSelection(
            lambda cancelled: self._select_and_run(selection, script, timeout, cancelled)
        )

    def _select_and_run(
        self,
        selection: Selection,
        script: str,
        timeout: float,
        cancelled: Callable[[], bool] | None,
    ) -> SelectionResult:
        inventory = selection.inventory
        if not inventory.exists():
            raise InventoryError(f"inventory {inventory}: no such file or directory")
        limit = _absolute_limit(selection.limit, Path.cwd())
        hosts: list[Any] = [_Unsafe(selection.pattern), "&all"]  # &all: no implicit localhost
        if selection.only is not None:
            hosts.append(_Unsafe("&" + _exact_names(selection.only)))
        collector = _ScriptResults(None if selection.only is None else frozenset(selection.only))
        private = Path(tempfile.mkdtemp(prefix="select-", dir=private_dir(self._settings.work_dir)))
        answer = private / "targets.json"
        request = {"pattern": selection.pattern, "out": str(answer)}
        plugins = os.pathsep.join(
            p for p in (str(_CALLBACKS_DIR), os.environ.get("ANSIBLE_CALLBACK_PLUGINS")) if p
        )
        try:
            self._run_probe_play(
                private,
                inventory,
                _probe_play(script, timeout, hosts),
                what=f"probe script on host pattern {selection.pattern!r} of {inventory}",
                limit=limit,
                collector=collector,
                extra_env={
                    **INVENTORY_ENV,
                    "ANSIBLE_CALLBACK_PLUGINS": plugins,
                    _TARGETS_REQUEST_ENV: json.dumps(request),
                },
                cancelled=cancelled,
            )
            selected = _read_selection(answer, inventory, collector.watcher)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        names = [h.name for h in selected]
        ran = names if selection.only is None else [n for n in names if n in selection.only]
        return SelectionResult(hosts=selected, results={n: collector.result(n) for n in ran})

    def _run_probe_play(
        self,
        private: Path,
        inventory: Path,
        play: dict[str, Any],
        *,
        what: str,
        limit: str | None,
        collector: _ScriptResults,
        extra_env: Mapping[str, str],
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Write ``play`` as the probe playbook in ``private`` and run it there.

        Ansible reports each host's result, not that its task started (the probe's display
        callback): one event per host, not two.
        """
        playbook = private / "probe.yml"
        _write_yaml(playbook, [play])
        self._run(
            private_data_dir=private,
            artifact_dir=private / "artifacts",
            ident="probe",
            inventory=inventory,
            playbook=playbook,
            what=what,
            limit=limit,
            watcher=collector.watcher,
            on_event=collector.see,
            extra_env={**extra_env, "AWX_LIB_DIRECTORY": str(_PROBE_DISPLAY_DIR)},
            cancelled=cancelled,
        )

    def run_playbook(
        self, inventory: Path, request: PlaybookRequest, *, artifacts_dir: Path
    ) -> Mapping[str, PlaybookResult]:
        """Run ``request.playbook`` limited to ``request.hosts``; a result for every host.

        ansible-runner's ``stdout`` and ``job_events`` are kept under
        ``artifacts_dir/<label>/`` (a ``-2``, ``-3``… suffix if that folder exists), owner-only
        and with the executor's and the request's secrets scrubbed: from each event before
        ansible-runner writes it, from every file once the run is over.
        """
        wanted = tuple(dict.fromkeys(request.hosts))
        if not wanted:
            return {}
        playbook = request.playbook.resolve()
        if not playbook.is_file():
            raise ExecutorError(f"playbook {request.playbook}: no such file")
        secrets = self._secrets.with_values(request.secret_values)
        tasks: dict[str, list[TaskResult]] = {host: [] for host in wanted}
        watcher = _EventWatcher()

        def on_event(event: Mapping[str, Any]) -> bool:
            watcher.see(event)
            status, data = _host_event(event)
            if data is not None and data.get("host") in tasks:
                res = _mapping(data.get("res"))
                tasks[data["host"]].append(
                    TaskResult(
                        name=_text(data.get("task")),
                        status=status,
                        changed=bool(res.get("changed", False)),
                        message=_task_message(status, res),
                        stdout=_text(res.get("stdout")),
                    )
                )
            return True

        label = _unique_label(artifacts_dir, request.label or playbook.stem)
        private_dir(artifacts_dir)
        work = private_dir(self._settings.work_dir)
        private = Path(tempfile.mkdtemp(prefix="playbook-", dir=work))
        try:
            (private / "env").mkdir(mode=0o700)
            _write_yaml(
                private / "env" / "extravars", _unsafe(dict(request.extravars), "extravars")
            )
            self._run(
                private_data_dir=private,
                artifact_dir=artifacts_dir,
                ident=label,
                inventory=inventory,
                playbook=playbook,
                what=f"playbook {request.playbook}",
                limit=_limit_file(private, wanted),
                watcher=watcher,
                on_event=_scrubbing(on_event, secrets),
                extra_env=(
                    {"ANSIBLE_TASK_TIMEOUT": str(self._settings.playbook_task_timeout)}
                    if self._settings.playbook_task_timeout
                    else {}
                ),
                cancel_grace=self._settings.cancel_grace,
                secrets=secrets,
            )
        finally:
            shutil.rmtree(private, ignore_errors=True)
            _drop_environment(artifacts_dir / label / "command")
            _keep_private(artifacts_dir / label, secrets)
        stats = watcher.stats or {}
        return {host: _playbook_result(host, tuple(tasks[host]), stats) for host in wanted}

    # -- internals -----------------------------------------------------------------

    def _env(self, extra_env: Mapping[str, str]) -> dict[str, str]:
        settings = self._settings
        env = {
            "PATH": os.pathsep.join(
                p for p in (str(settings.ansible_bin_dir), os.environ.get("PATH", "")) if p
            ),
            "ANSIBLE_SSH_USETTY": "False",  # no -tt: raw output without \r\n, stderr apart
            "ANSIBLE_TIMEOUT": str(settings.ssh_timeout),
            "ANSIBLE_HOST_KEY_CHECKING": str(settings.host_key_checking),
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOWS": "True",
            **PLAIN_OUTPUT_ENV,
            # ansible-runner hands ansible-playbook this process's whole environment: the
            # engine's own credentials (webhook, approvers) are blanked, no task needs them.
            **{name: "" for name in os.environ if is_engine_secret_env(name)},
            **inventory_plugins_env(),
            **extra_env,
        }
        if settings.ssh_args is not None:
            env["ANSIBLE_SSH_ARGS"] = shlex.join(settings.ssh_args)
        return env

    def _run(
        self,
        *,
        private_data_dir: Path,
        artifact_dir: Path,
        ident: str,
        inventory: Path,
        playbook: Path,
        what: str,
        limit: str | None,
        watcher: _EventWatcher,
        on_event: Callable[[Mapping[str, Any]], bool],
        extra_env: Mapping[str, str],
        cancelled: Callable[[], bool] | None = None,
        cancel_grace: float = 0.0,
        secrets: Secrets | None = None,
    ) -> None:
        """One ansible-runner call; ``secrets`` (by default the executor's) leave its errors."""
        secrets = self._secrets if secrets is None else secrets
        if not inventory.exists():
            raise ExecutorError(f"{what}: inventory {inventory}: no such file or directory")
        # ansible-runner reads env/settings only from the private data dir, not from run().
        (private_data_dir / "env").mkdir(mode=0o700, exist_ok=True)
        _write_yaml(private_data_dir / "env" / "settings", {"pexpect_timeout": _CANCEL_CHECK})
        tree = _Tree()

        def cancel() -> bool:
            if signalled() or (cancelled and cancelled()) or (self._cancel and self._cancel()):
                if tree.freeze(getattr(_spawn_hooks, "pid", None)) and signalled() and cancel_grace:
                    sys.stderr.write(
                        f"remediate: stopping Ansible; the tasks in flight get up to "
                        f"{cancel_grace:g} s to end (signal again to kill them now)\n"
                    )
                return True
            return False

        try:
            with _cancel_on_signals() as signalled:
                try:
                    runner = ansible_runner.run(
                        private_data_dir=str(private_data_dir),
                        artifact_dir=str(artifact_dir),
                        ident=ident,
                        playbook=str(playbook),
                        inventory=str(inventory.resolve()),
                        limit=limit,
                        forks=self._settings.forks,
                        envvars=self._env(extra_env),
                        quiet=True,
                        event_handler=on_event,
                        cancel_callback=cancel,
                    )
                finally:
                    # Before a signal received is delivered (it may end the process): a
                    # stopped tree left behind would stay stopped for good.
                    _spawn_hooks.pid = None
                    tree.end(grace=cancel_grace, hurry=signalled.repeated)
        except Exception as exc:  # ansible-runner raises bare exceptions of many kinds
            raise ExecutorError(secrets.scrub(f"{what}: ansible-runner failed: {exc}")) from exc
        if runner.status == "canceled":
            raise ExecutorError(f"{what}: cancelled (a signal, or the engine shutting down)")
        if watcher.stats is None and not watcher.no_hosts:
            source_error = inventory_error(inventory, watcher.inventory_error)
            if source_error is not None:  # the balena plugin said why (its token, its API)
                raise source_error
            raise ExecutorError(
                secrets.scrub(
                    f"{what}: ansible-playbook did not finish "
                    f"(runner status {runner.status}, rc {runner.rc}): {watcher.error_text()}"
                )
            )


_NOT_RUN = "host {} did not run: not in the inventory, or not matched by the play's hosts"


#: ansible-playbook's error when ``--limit`` matches no host of the inventory.
_NO_HOSTS = "leaves us with no hosts to target"


class _ScriptResults:
    """Collects one ``raw`` task's result per host from the event stream, as it streams."""

    def __init__(self, wanted: frozenset[str] | None) -> None:
        self.watcher = _EventWatcher()
        self._wanted = wanted  # None: every host
        self._results: dict[str, CommandResult] = {}

    def see(self, event: Mapping[str, Any]) -> bool:
        """ansible-runner's event handler: keep the result, write nothing to disk."""
        self.watcher.see(event)
        status, data = _host_event(event)
        if data is None or (self._wanted is not None and data.get("host") not in self._wanted):
            return False
        res = _mapping(data.get("res"))
        rc = res.get("rc")
        self._results[data["host"]] = CommandResult(
            host=data["host"],
            status=status or HostStatus.FAILED,
            rc=rc if isinstance(rc, int) else None,
            stdout=_text(res.get("stdout")),
            stderr=_text(res.get("stderr")),
            message="" if status is HostStatus.OK else _message(res),
        )
        return False  # nothing to keep on disk: the probe's output is in the results

    def result(self, host: str) -> CommandResult:
        """The host's result; ``failed`` if it never showed up in the events."""
        return self._results.get(host) or CommandResult(
            host=host, status=HostStatus.FAILED, message=_NOT_RUN.format(host)
        )


def _read_selection(answer: Path, inventory: Path, watcher: _EventWatcher) -> tuple[Host, ...]:
    """The hosts the remediate_targets callback reported (none if the limit matched none)."""
    try:
        data = json.loads(answer.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if watcher.no_hosts:  # --limit matched no host at all: Ansible stopped before the play
            return ()
        raise ExecutorError(
            f"inventory {inventory}: ansible-playbook did not report which hosts it selected"
        ) from None
    except ValueError as exc:
        raise ExecutorError(f"inventory {inventory}: unreadable host selection: {exc}") from exc
    if "error" in data:
        raise InventoryError(f"inventory {inventory}: {data['error']}")
    return tuple(Host(name=name, vars=host_vars) for name, host_vars in data["hosts"])


class _EventWatcher:
    """Keeps what we need of the event stream besides per-host results: stats and error lines."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.no_hosts = False  # the limit matched no inventory host: nothing ran, not a fault
        self.inventory_error = ""  # an inventory plugin's marked error line (engine.balena)
        self._tail: deque[str] = deque(maxlen=_ERROR_TAIL_LINES)

    def see(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "playbook_on_stats":
            self.stats = dict(_mapping(event.get("event_data")))
        elif event.get("event") in {"verbose", "error"}:
            text = _text(event.get("stdout")).strip()
            if text:
                self._tail.append(text)
                self.no_hosts = self.no_hosts or _NO_HOSTS in text
                if not self.inventory_error and carries_error(text):
                    self.inventory_error = text

    def error_text(self) -> str:
        lines = [line for line in self._tail if not line.startswith("[WARNING]")]
        return " ".join(lines) if lines else "no output"


def _host_event(event: Mapping[str, Any]) -> tuple[HostStatus | None, Mapping[str, Any] | None]:
    """The status and event data of a per-host task result event, or ``(None, None)``."""
    kind = event.get("event")
    if kind not in _HOST_EVENTS:
        return None, None
    data = _mapping(event.get("event_data"))
    if not isinstance(data.get("host"), str):
        return None, None
    return _HOST_EVENTS[kind], data


def _playbook_result(
    host: str, tasks: tuple[TaskResult, ...], stats: Mapping[str, Any]
) -> PlaybookResult:
    """Aggregate one host from the final stats (which count rescues and ignored errors)."""

    def counted(key: str) -> bool:
        return bool(_mapping(stats.get(key)).get(host))

    if counted("dark"):
        status = HostStatus.UNREACHABLE
    elif counted("failures"):
        status = HostStatus.FAILED
    elif tasks or any(counted(k) for k in ("ok", "changed", "skipped", "rescued", "ignored")):
        status = HostStatus.OK
    else:
        return PlaybookResult(host=host, status=HostStatus.FAILED, message=_NOT_RUN.format(host))
    bad = next((t for t in reversed(tasks) if t.status is status), None)
    message = f"{bad.name}: {bad.message}" if bad and status is not HostStatus.OK else ""
    return PlaybookResult(host=host, status=status, tasks=tasks, message=message)


def write_probe_playbook(path: Path, script: str, *, timeout: float) -> None:
    """Write the play the engine probes with, for all of an inventory's hosts, to ``path``.

    For benchmarks that run the engine's probe in a plain ``ansible-playbook``: the script
    is written as the engine writes it (``!unsafe``, dict form of ``raw``, task timeout).
    """
    _write_yaml(path, [_probe_play(script, timeout, "all")])


def _probe_play(script: str, timeout: float, hosts: str | list[Any]) -> dict[str, Any]:
    return {
        "name": "remediate probe",
        "hosts": hosts,
        "gather_facts": False,
        "tasks": [
            {
                "name": "probe",
                # Dict form: a free-form string would go through Ansible's argument splitter,
                # which rejects some valid shell quoting; _raw_params is taken as it is.
                "ansible.builtin.raw": {"_raw_params": _Unsafe(script)},
                "timeout": max(1, math.ceil(timeout)),
            }
        ],
    }


def _limit_line(hosts: Sequence[str]) -> str:
    """One ``--limit`` pattern matching exactly these host names and nothing else."""
    return "~^(?:" + "|".join(re.escape(h) for h in hosts) + ")$"


def _limit_file(private: Path, hosts: Sequence[str]) -> str:
    """``--limit @file`` for exactly ``hosts``, the file written in ``private``."""
    path = private / "limit"
    path.write_text(_limit_line(hosts) + "\n", encoding="utf-8")
    return f"@{path}"


def _exact_names(hosts: Sequence[str]) -> str:
    """A regex pattern matching exactly these host names, safe as one item of a play's hosts.

    Ansible splits every item of a play's ``hosts`` at ``,`` (or ``:``, whitespace, brackets),
    so every character but letters, digits, ``_`` and ``-`` is written as a regex escape.
    """

    def escaped(name: str) -> str:
        return "".join(
            c if c.isascii() and (c.isalnum() or c in "_-") else f"\\U{ord(c):08x}" for c in name
        )

    return "~^(" + "|".join(escaped(h) for h in hosts) + ")$"


#: How Ansible splits a host pattern at ``:`` when it has no ``,`` (split_host_pattern).
_COLON_TERMS = re.compile(r"(?:[^\s:\[\]]|\[[^\]]*\])+")


def _absolute_limit(limit: str | None, cwd: Path) -> str | None:
    """``limit`` with each relative ``@file`` made absolute against ``cwd``.

    ansible-playbook runs in ansible-runner's private directory, and Ansible reads an
    ``@file`` relative to its working directory; the operator meant theirs.  The limit is
    split as Ansible splits it; one without a relative ``@file`` is returned unchanged.
    """
    if limit is None:
        return None
    terms = [t.strip() for t in (limit.split(",") if "," in limit else _COLON_TERMS.findall(limit))]
    terms = [t for t in terms if t]
    if not any(t.startswith("@") and not Path(t[1:]).is_absolute() for t in terms):
        return limit
    return ",".join(
        f"@{cwd / t[1:]}" if t.startswith("@") and not Path(t[1:]).is_absolute() else t
        for t in terms
    )


def _unique_label(artifacts_dir: Path, label: str) -> str:
    base = _LABEL_UNSAFE.sub("_", label).strip("._") or "playbook"
    candidate, n = base, 1
    while (artifacts_dir / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


class _Unsafe(str):
    """A string Ansible must never template; dumped as ``!unsafe``."""

    __slots__ = ()


class _Dumper(yaml.SafeDumper):
    pass


def _represent_unsafe(dumper: yaml.SafeDumper, value: _Unsafe) -> yaml.Node:
    return dumper.represent_scalar("!unsafe", str(value), style='"')


_Dumper.add_representer(_Unsafe, _represent_unsafe)


def _unsafe(value: Any, where: str) -> Any:
    """Copy ``value`` with every string tagged ``!unsafe``; only JSON-like data is accepted."""
    if isinstance(value, str):
        return _Unsafe(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _unsafe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_unsafe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ExecutorError(f"{where}: cannot pass a {type(value).__name__} to Ansible")


def _write_yaml(path: Path, data: Any) -> None:
    text = yaml.dump(data, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=2**31)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


class _Signals:
    """SIGINT/SIGTERM recorded instead of handled while installed (from the main thread only).

    ansible-runner would otherwise install handlers of its own and leave them in place.  A
    signal the process ignores (SIGINT in a shell's background job) stays ignored.
    """

    def __init__(self) -> None:
        self._received: list[int] = []
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            self._previous = {s: h for s, h in handlers.items() if h is not signal.SIG_IGN}
            for s in self._previous:
                signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self._received.append(signum)

    def __call__(self) -> bool:
        """Whether a signal arrived."""
        return bool(self._received)

    def repeated(self) -> bool:
        """Whether a second signal arrived (the operator insists: stop the tasks now)."""
        return len(self._received) > 1

    def restore(self, *, deliver: bool) -> None:
        """Put the previous handlers back; then deliver the first signal received, if asked."""
        previous, self._previous = self._previous, {}
        for s, old in previous.items():
            signal.signal(s, old)
        if deliver and self._received:
            signal.raise_signal(self._received[0])


@contextmanager
def _cancel_on_signals() -> Iterator[_Signals]:
    """Let SIGINT/SIGTERM stop the child cleanly, then deliver them to the old handlers."""
    signals = _Signals()
    try:
        yield signals
    except BaseException:
        signals.restore(deliver=False)
        raise
    signals.restore(deliver=True)


#: Per thread: what to call once ansible-runner has spawned ansible-playbook (``spawned``),
#: and the pid of the ansible-playbook it runs (``pid``).
_spawn_hooks = threading.local()


class _Tree:
    """ansible-playbook's process tree, noted at a cancel so that none of it outlives the call.

    :meth:`freeze` stops ansible-playbook and each descendant before listing its children
    (a stopped process forks no more), whatever their session.  ansible-runner then kills
    ansible-playbook's group; the workers, in sessions of their own, are not in it.
    :meth:`end` lets the noted processes finish the task in flight for up to ``grace``
    seconds (continued, they run no new task: ansible-playbook is gone), then kills what is
    left, with any children it has started since.
    """

    def __init__(self) -> None:
        self._noted: list[psutil.Process] = []

    def freeze(self, pid: int | None) -> bool:
        """Stop ``pid`` (our child) and its descendants and note them; whether it did, now.

        Only the first call does anything (a cancel is checked again until the call ends).
        """
        if pid is None or self._noted:
            return False
        try:
            root = psutil.Process(pid)
            if root.ppid() != os.getpid():  # not (or no longer) the child we spawned
                return False
        except psutil.Error:  # gone, or not ours to signal
            return False
        self._noted = _stop_all([root])
        return bool(self._noted)

    def end(self, *, grace: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Let the noted processes finish for up to ``grace`` seconds, then kill the rest.

        ``hurry`` turning true (a second signal) ends the grace at once.
        """
        if not self._noted:
            return
        for process in self._noted:
            with contextlib.suppress(psutil.Error):
                process.resume()
        deadline = time.monotonic() + grace
        alive = self._noted
        while alive and not hurry():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, alive = psutil.wait_procs(alive, timeout=min(left, _CANCEL_CHECK))
        for process in _stop_all(alive):
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)


def _stop_all(roots: Sequence[psutil.Process]) -> list[psutil.Process]:
    """SIGSTOP ``roots`` and all their descendants (each stopped before its children are read)."""
    stopped: list[psutil.Process] = []
    pending = list(roots)
    while pending:
        process = pending.pop()
        try:
            process.suspend()
            _wait_stopped(process)
            stopped.append(process)
            pending.extend(process.children())
        except psutil.Error:  # gone, or not ours to signal
            continue
    return stopped


def _wait_stopped(process: psutil.Process, timeout: float = 1.0) -> None:
    """Wait until ``process`` has stopped (or ended); one in uninterruptible sleep may not."""
    deadline = time.monotonic() + timeout
    while process.status() not in _STOPPED and time.monotonic() < deadline:
        time.sleep(0.001)


_STOPPED = frozenset({psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


class _PendingSelection:
    """A ``select_and_run_script`` call running in a thread (see ``PendingSelection``).

    Built once ``ansible-playbook`` has been spawned (or the call has already ended).
    Signals are recorded from then on and stop the call; :meth:`result` and :meth:`cancel`
    put the handlers back and deliver a signal that arrived.
    """

    def __init__(self, call: Callable[[Callable[[], bool]], SelectionResult]) -> None:
        self._stop = threading.Event()
        self._spawned = threading.Event()
        self._signals = _Signals()
        self._result: SelectionResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._work, args=(call,), name="remediate-probe", daemon=True
        )
        try:
            self._thread.start()
        except BaseException:
            self._signals.restore(deliver=False)
            raise
        self._spawned.wait()

    def _work(self, call: Callable[[Callable[[], bool]], SelectionResult]) -> None:
        _spawn_hooks.spawned = self._spawned.set
        try:
            self._result = call(lambda: self._stop.is_set() or self._signals())
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that collects it
            self._error = exc
        finally:
            _spawn_hooks.spawned = None
            self._spawned.set()

    def result(self) -> SelectionResult:
        """Wait for the call; its result or its error (after delivering a signal received)."""
        self._thread.join()
        self._signals.restore(deliver=True)
        if self._error is not None:
            raise self._error
        if self._result is None:  # pragma: no cover - the thread sets one of the two
            raise ExecutorError("internal: the probe thread ended without a result")
        return self._result

    def cancel(self) -> None:
        """Stop ansible-playbook if it still runs, wait for the cleanup, drop the outcome."""
        self._stop.set()
        self._thread.join()
        self._signals.restore(deliver=True)


def _scrubbing(
    on_event: Callable[[Mapping[str, Any]], bool], secrets: Secrets
) -> Callable[[Mapping[str, Any]], bool]:
    """``on_event`` seeing, and leaving to ansible-runner to write, events with ``secrets`` out.

    ansible-runner writes the very dict it passed to the handler: it is scrubbed in place.
    """
    if not secrets:
        return on_event

    def handler(event: Mapping[str, Any]) -> bool:
        scrubbed = secrets.scrub_data(event)
        if isinstance(event, dict):
            event.clear()
            event.update(scrubbed)
        return on_event(scrubbed)

    return handler


def _keep_private(artifacts: Path, secrets: Secrets) -> None:
    """A run's artifacts as kept: secrets scrubbed from every file, owner-only.

    ansible-runner writes some files (``stdout``) from ansible-playbook's own output, and
    others with the process's umask (``stderr``).
    """
    if not artifacts.is_dir():
        return
    secrets.scrub_tree(artifacts)
    private_dir(artifacts)
    tighten_tree(artifacts)


def _drop_environment(command_file: Path) -> None:
    """Keep the command line and cwd of ansible-runner's ``command`` artifact, not its env.

    ansible-runner records the whole process environment there, which may hold secrets.
    """
    try:
        recorded = json.loads(command_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict) and "env" in recorded:
        del recorded["env"]
        command_file.write_text(json.dumps(recorded), encoding="utf-8")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _task_message(status: HostStatus | None, res: Mapping[str, Any]) -> str:
    if status is None:
        return _text(res.get("skip_reason")) or "skipped"
    return "" if status is HostStatus.OK else _message(res)


def _message(res: Mapping[str, Any]) -> str:
    """A non-empty, one-paragraph explanation of a failed or unreachable result."""
    msg = _text(res.get("msg")).strip() or "task failed"
    stderr = _text(res.get("stderr")).strip()
    if stderr and stderr not in msg:
        msg = f"{msg}; stderr: {stderr[-500:]}"
    return msg


# -- ansible-runner adjustment -------------------------------------------------------------


class _PromptCloseSpawn(pexpect.spawn):  # type: ignore[misc] # pexpect ships no type information
    """``pexpect.spawn`` whose ``close()`` does not sleep 0.1 s before checking the child.

    It also tells a background call (:class:`_PendingSelection`) that ansible-playbook runs,
    and a cancel (:class:`_Tree`) which process it is.

    ptyprocess' ``close()`` sleeps ``delayafterclose`` (0.1 s, "to give the kernel time to
    update process status") and then terminates the child if it is still alive.
    ansible-runner calls it only after its read loop ended on ``isalive()`` being false,
    i.e. after ansible-playbook exited and was reaped, so the sleep only delayed every run.
    A child still alive is terminated as before (SIGHUP, SIGINT, then SIGKILL).
    """

    def _spawnpty(self, args: list[str], **kwargs: Any) -> Any:
        pty = super()._spawnpty(args, **kwargs)
        pty.delayafterclose = 0
        _spawn_hooks.pid = pty.pid  # for a cancel (_Tree), in the thread that runs the call
        spawned = getattr(_spawn_hooks, "spawned", None)
        if spawned is not None:  # a background call waits for this moment (_PendingSelection)
            spawned()
        return pty


class _PexpectForRunner(ModuleType):
    """The ``pexpect`` ansible-runner's runner module sees: pexpect, with our ``spawn``."""

    spawn = _PromptCloseSpawn

    def __getattr__(self, name: str) -> Any:
        return getattr(pexpect, name)


def _close_promptly() -> None:
    """Have ansible-runner spawn ansible-playbook with :class:`_PromptCloseSpawn`.

    ansible-runner (2.4) calls ``pexpect.spawn`` through its runner module's ``pexpect``
    global; only that reference is replaced, so pexpect itself is unchanged for anyone else.
    If a later ansible-runner does it differently, nothing is replaced (runs are as before).
    """
    if getattr(ansible_runner.runner, "pexpect", None) is pexpect:
        ansible_runner.runner.pexpect = _PexpectForRunner("pexpect")


_close_promptly()
