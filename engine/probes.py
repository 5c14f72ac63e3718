"""Probe: run every check of a runbook on every targeted host in one ``raw`` task per host.

One POSIX-sh script runs all checks and prints one record per check: a marker line with the
check id, exit code, elapsed seconds and whether it timed out, then its stdout, then its
stderr, each closed by a marker.  Markers carry a random nonce per run, so no output (shaped
like a marker or not) can forge or end a record.  Output is text: NUL bytes are dropped and
every line comes back ending in a newline.

The framing costs no process per check, so a probe's cost grows with what the checks do on
the device, not with how many there are: each check runs in a subshell (a fork, no exec) with
stdout and stderr in files capped by ``ulimit -f``, printed back with shell builtins; its
timeout is kept by one watchdog per probe, which wakes every second and kills the running
check, with everything it started, once past its deadline (so at most about a second late).

A run's first probe also selects its hosts (:func:`start_probe`, with a selecting executor).
It can be started before the rest of the run is prepared: an entry point starts it as soon
as it knows the runbook and hands the :class:`PendingProbe` to the pipeline, which collects it.
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import Field

from engine.executors.base import (
    BackgroundSelectingExecutor,
    CommandResult,
    Executor,
    Host,
    HostStatus,
    PendingSelection,
    SelectingExecutor,
    Selection,
    SelectionResult,
)
from engine.expressions import failed_value
from engine.models import FrozenModel
from engine.runbooks.spec import Check, ParseKind

#: Bytes of stdout kept per check (stderr: 4 KiB); more is cut and the check fails to parse.
MAX_STDOUT = 1 << 20
MAX_STDERR = 4096
#: ``ulimit -f`` for a check's output files: room for MAX_STDOUT plus one more line (the
#: unit is 512 bytes in dash and busybox, 1024 in bash: either way large enough).
_FILE_BLOCKS = MAX_STDOUT // 512 + 2
_TRUE = frozenset({"true", "yes", "1", "on", "active"})
_FALSE = frozenset({"false", "no", "0", "off"})


class _Record(FrozenModel):
    """What the probe script printed for one check."""

    rc: int
    elapsed: int
    timed_out: bool
    too_large: bool
    stdout: str
    stderr: str


class CheckResult(FrozenModel):
    """One check on one host: its parsed value, or why there is none."""

    id: str
    value: Any = None
    error: str | None = None
    rc: int | None = None
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """Whether the check produced a value."""
        return self.error is None


class ProbeStatus(StrEnum):
    """Whether a host could be probed at all."""

    OK = "ok"
    UNREACHABLE = "unreachable"
    ERROR = "error"  # the probe script itself failed (no records)


class HostProbe(FrozenModel):
    """Every check's result on one host."""

    host: str
    status: ProbeStatus
    checks: dict[str, CheckResult] = Field(default_factory=dict)
    message: str = ""

    def values(self) -> dict[str, Any]:
        """The ``checks`` namespace of an expression context: failed checks fail when used."""
        return {
            cid: result.value if result.ok else failed_value(cid, result.error or "failed")
            for cid, result in self.checks.items()
        }

    def evidence(self) -> dict[str, Any]:
        """Check values and errors as plain data, for plans and the audit log."""
        return {
            cid: result.value if result.ok else {"error": result.error}
            for cid, result in self.checks.items()
        }


def build_probe_script(checks: Sequence[Check], params: Mapping[str, object], nonce: str) -> str:
    """The POSIX-sh script that runs every check and prints one record per check."""
    lines = [
        "set +e",
        "umask 077",
        "LC_ALL=C; export LC_ALL",
    ]
    for name, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"param_{name}={shlex.quote(text)}; export param_{name}")
    lines += [
        # Scratch space for the checks' output (TMPDIR, else /tmp: a tmpfs on balenaOS).
        '__rt=$(mktemp -d "${TMPDIR:-/tmp}/.remediate-probe.XXXXXX") ||',
        f"  {{ echo '{nonce} FATAL'; exit 97; }}",
        # Centiseconds since boot, from a builtin read: no process per clock reading.
        "__cs() {",
        "  read -r __u __ </proc/uptime",
        "  __u=${__u%.*}${__u#*.}; __u=${__u#0}; __u=${__u#0}",
        "}",
        # A check's process and everything it started: stopped first, so nothing forks away.
        "__kt() {",
        '  kill -STOP "$1" 2>/dev/null',
        '  for __c in $(pgrep -P "$1" 2>/dev/null); do __kt "$__c"; done',
        '  kill -KILL "$1" 2>/dev/null',
        "}",
        # The watchdog: every second, kill the running check if it is past its deadline.  If
        # the script itself was killed, it kills the running check, cleans up and leaves.
        # It holds none of the script's output, so it never delays the end of the task.  It
        # ignores SIGHUP: when a cancelled run's ssh goes, the device's sshd hangs up the
        # script's terminal, and the watchdog must outlive the script to clean up after it.
        "__wd() {",
        "  trap '' HUP",
        "  while sleep 1; do",
        '    __p=; read -r __p __d <"$__rt/cur" 2>/dev/null',
        '    if ! kill -0 "$1" 2>/dev/null; then',
        '      [ -n "$__p" ] && __kt "$__p"',
        '      rm -rf "$__rt"; return',
        "    fi",
        '    [ -n "$__p" ] || continue',
        '    __cs; [ "$__u" -ge "$__d" ] || continue',
        '    printf \'\' >"$__rt/k.$__p"; __kt "$__p"',
        "  done",
        "}",
        '__wd "$$" </dev/null >/dev/null 2>&1 &',
        "__w=$!",
        'trap \'kill "$__w" 2>/dev/null; rm -rf "$__rt"\' EXIT',
        # Print a file line by line with builtins, at most $2 bytes; __o=1 if it held more.
        "__pf() {",
        "  __o=0; __b=0",
        '  [ -s "$1" ] || return 0',
        '  while IFS= read -r __l || [ -n "$__l" ]; do',
        "    __b=$((__b + ${#__l} + 1))",
        '    [ "$__b" -gt "$2" ] && { __o=1; break; }',
        "    printf '%s\\n' \"$__l\"",
        '  done <"$1"',
        "}",
        # One check: id, timeout in seconds, command.  It runs in a subshell (no exec), with
        # stdout and stderr in files capped by `ulimit -f`, under the watchdog's deadline.
        "__rc() {",
        "  __cs; __s=$__u",
        f'  ( ulimit -f {_FILE_BLOCKS}; eval "$3" ) >"$__rt/o.$1" 2>"$__rt/e.$1" </dev/null &',
        "  __p=$!",
        '  echo "$__p $((__s + $2 * 100))" >"$__rt/cur"',
        '  wait "$__p"; __x=$?',
        "  printf '' >\"$__rt/cur\"",
        "  __cs; __t=0",
        '  [ -e "$__rt/k.$__p" ] && __t=1',
        f'  printf \'\\n{nonce} C %s %s %s %s\\n\' "$1" "$__x" "$(((__u - __s) / 100))" "$__t"',
        f'  __pf "$__rt/o.$1" {MAX_STDOUT}',
        f"  printf '{nonce} E %s\\n' \"$__o\"",
        f'  __pf "$__rt/e.$1" {MAX_STDERR}',
        f"  printf '{nonce} Z\\n'",
        "}",
    ]
    for check in checks:
        seconds = max(1, int(check.timeout.total_seconds()))
        lines.append(f"__rc {check.id} {seconds} {shlex.quote(check.command)}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def _records(stdout: str, nonce: str) -> dict[str, _Record]:
    """Check id → its record, from a probe's output (lines outside records are ignored)."""
    records: dict[str, _Record] = {}
    header: tuple[str, int, int, bool] | None = None
    too_large = False
    out: list[str] = []
    err: list[str] = []
    current: list[str] | None = None
    for line in stdout.split("\n"):
        if line.startswith(nonce + " "):
            parts = line.split()
            if parts[1] == "C" and len(parts) == 6:  # noqa: PLR2004 - nonce C id rc secs timed-out
                try:
                    header = (parts[2], int(parts[3]), int(parts[4]), parts[5] == "1")
                except ValueError:
                    header = None
                    continue
                out, err, too_large = [], [], False
                current = out
            elif parts[1] == "E" and header is not None:
                too_large = parts[2:] == ["1"]
                current = err
            elif parts[1] == "Z" and header is not None:
                check_id, rc, elapsed, timed_out = header
                records[check_id] = _Record(
                    rc=rc,
                    elapsed=elapsed,
                    timed_out=timed_out,
                    too_large=too_large,
                    stdout=_joined(out),
                    stderr=_joined(err),
                )
                header, current = None, None
        elif current is not None:
            current.append(line)
    return records


def _joined(lines: list[str]) -> str:
    """The text of lines as the script printed them, each ending in a newline."""
    return "".join(f"{line}\n" for line in lines)


def parse_value(kind: ParseKind, rc: int, stdout: str) -> Any:
    """Turn a check's exit code and stdout into its value; ``ValueError`` says why not."""
    if kind is ParseKind.RC:
        return rc
    if kind is ParseKind.OK:
        return rc == 0
    if rc != 0:
        raise ValueError(f"exit code {rc}")
    text = stdout.strip()
    if kind is ParseKind.INT:
        return int(text)
    if kind is ParseKind.FLOAT:
        return float(text)
    if kind is ParseKind.BOOL:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"not a bool: {text[:80]!r}")
    if kind is ParseKind.LINES:
        return [line for line in stdout.splitlines() if line.strip()]
    if kind is ParseKind.JSON:
        return json.loads(stdout)
    if kind is ParseKind.KV:
        pairs = (line.split("=", 1) for line in stdout.splitlines() if "=" in line)
        return {key.strip(): value.strip() for key, value in pairs}
    return text


def _check_result(check: Check, record: _Record | None) -> CheckResult:
    if record is None:
        return CheckResult(id=check.id, error="no result (the probe script stopped early)")
    rc, stderr = record.rc, record.stderr.strip()
    if record.timed_out:
        timeout = int(check.timeout.total_seconds())
        return CheckResult(id=check.id, rc=rc, stderr=stderr, error=f"timed out after {timeout}s")
    if record.too_large:
        return CheckResult(id=check.id, rc=rc, error=f"output larger than {MAX_STDOUT} bytes")
    try:
        value = parse_value(check.parse, rc, record.stdout)
    except (ValueError, json.JSONDecodeError) as exc:
        detail = f": {stderr.splitlines()[-1][:200]}" if stderr else ""
        return CheckResult(
            id=check.id, rc=rc, stderr=stderr, error=f"{check.parse.value}: {exc}{detail}"
        )
    return CheckResult(id=check.id, value=value, rc=rc, stderr=stderr)


def parse_probe(result: CommandResult, checks: Sequence[Check], nonce: str) -> HostProbe:
    """One host's probe result from its raw command result."""
    if result.status is HostStatus.UNREACHABLE:
        return HostProbe(host=result.host, status=ProbeStatus.UNREACHABLE, message=result.message)
    records = _records(result.stdout, nonce)
    if not records:
        detail = result.message or result.stderr.strip() or result.stdout.strip()
        return HostProbe(
            host=result.host,
            status=ProbeStatus.ERROR,
            message=f"probe script failed (rc {result.rc}): {detail[-300:]}",
        )
    return HostProbe(
        host=result.host,
        status=ProbeStatus.OK,
        checks={c.id: _check_result(c, records.get(c.id)) for c in checks},
    )


def probe_timeout(checks: Sequence[Check]) -> float:
    """An upper bound for the whole probe script: every check's timeout plus slack."""
    return sum(c.timeout.total_seconds() for c in checks) + 30.0


def run_probes(
    executor: Executor,
    inventory: Path,
    hosts: Sequence[str],
    checks: Sequence[Check],
    params: Mapping[str, object],
    *,
    nonce: str | None = None,
) -> dict[str, HostProbe]:
    """Probe ``hosts`` with one executor call; a :class:`HostProbe` for every host."""
    marker = nonce or f"@@remediate-{secrets.token_hex(8)}"
    script = build_probe_script(checks, params, marker)
    results = executor.run_script(inventory, hosts, script, timeout=probe_timeout(checks))
    probes = {}
    for host in hosts:
        result = results.get(host)
        if result is None:
            probes[host] = HostProbe(
                host=host, status=ProbeStatus.ERROR, message="the executor returned no result"
            )
        else:
            probes[host] = parse_probe(result, checks, marker)
    return probes


class SelectedProbes(FrozenModel):
    """The hosts a selection picked, and the probe of each one the script ran on."""

    hosts: tuple[Host, ...]
    """Every host the pattern and limit select, in inventory order."""
    probes: dict[str, HostProbe]
    """Host name → probe, for the selected hosts the selection's ``only`` keeps."""


class PendingProbe:
    """A first probe that selects its hosts, started by :func:`start_probe`.

    Collect it once with :meth:`result`; leaving its ``with`` block without doing so stops
    it, and nothing of it keeps running.
    """

    def __init__(
        self,
        executor: SelectingExecutor,
        selection: Selection,
        checks: Sequence[Check],
        params: Mapping[str, object],
    ) -> None:
        self.selection = selection
        self.checks = tuple(checks)
        self.params = dict(params)
        self._executor = executor
        self._nonce = f"@@remediate-{secrets.token_hex(8)}"
        self._script = build_probe_script(checks, params, self._nonce)
        self._timeout = probe_timeout(checks)
        self._pending: PendingSelection | None = None
        self._done = False
        if isinstance(executor, BackgroundSelectingExecutor):
            self._pending = executor.start_select_and_run_script(
                selection, self._script, timeout=self._timeout
            )

    def result(self) -> SelectedProbes:
        """Wait for the probe (or run it now, if the executor cannot start it ahead)."""
        if self._done:
            raise RuntimeError("internal: a pending probe is collected once")
        self._done = True
        selected: SelectionResult = (
            self._pending.result()
            if self._pending is not None
            else self._executor.select_and_run_script(
                self.selection, self._script, timeout=self._timeout
            )
        )
        return SelectedProbes(
            hosts=selected.hosts,
            probes={
                name: parse_probe(result, self.checks, self._nonce)
                for name, result in selected.results.items()
            },
        )

    def cancel(self) -> None:
        """Stop the probe if it was started and not collected; wait until it has stopped."""
        if not self._done:
            self._done = True
            if self._pending is not None:
                self._pending.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()


def start_probe(
    executor: SelectingExecutor,
    selection: Selection,
    checks: Sequence[Check],
    params: Mapping[str, object],
) -> PendingProbe:
    """Start probing the hosts ``selection`` picks; collect with :meth:`PendingProbe.result`.

    An executor that can work in the background starts now and runs while the caller does
    other work; another one runs when the result is asked for.
    """
    return PendingProbe(executor, selection, checks, params)
