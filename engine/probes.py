"""Probe: run every check of a runbook on every targeted host in one ``raw`` task per host.

One POSIX-sh script runs all checks, each under its own ``timeout``, and prints one record per
check: a marker line with the check id, exit code and elapsed seconds, then stdout and stderr in
base64, so no output (binary, multi-line, or shaped like a marker) can confuse the parser.  The
marker carries a random nonce per run.  The cost of a probe therefore grows with what the
checks do on the device, not with how many checks there are.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import shlex
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.executors.base import CommandResult, Executor, HostStatus
from engine.expressions import failed_value
from engine.runbooks.spec import Check, ParseKind

#: Bytes of stdout kept per check (stderr: 4 KiB); more is cut and the check fails to parse.
MAX_STDOUT = 1 << 20
MAX_STDERR = 4096
#: Exit codes ``timeout`` uses when it stops a command (coreutils 124; signals TERM/KILL).
_TIMEOUT_CODES = frozenset({124, 137, 143})
_TRUE = frozenset({"true", "yes", "1", "on", "active"})
_FALSE = frozenset({"false", "no", "0", "off"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CheckResult(_Frozen):
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


class HostProbe(_Frozen):
    """Every check's result on one host."""

    host: str
    status: ProbeStatus
    checks: dict[str, CheckResult] = {}
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
        f"__rt=$(mktemp -d /tmp/.remediate-probe.XXXXXX) || {{ echo '{nonce} FATAL'; exit 97; }}",
        "trap 'rm -rf \"$__rt\"' EXIT",
        # Elapsed seconds come from /proc/uptime (a builtin read, no process), and the encoders
        # run only for non-empty output: per check, the cost is one `timeout` and one `sh -c`.
        "__rc() {",
        "  read -r __s __ </proc/uptime; __s=${__s%.*}",
        '  timeout -s KILL "$2" sh -c "$3" >"$__rt/o" 2>"$__rt/e" </dev/null',
        "  __x=$?",
        "  read -r __n __ </proc/uptime; __n=${__n%.*}",
        f'  printf \'\\n{nonce} C %s %s %s\\n\' "$1" "$__x" "$((__n - __s))"',
        f'  [ -s "$__rt/o" ] && head -c {MAX_STDOUT + 1} "$__rt/o" | base64',
        f"  printf '{nonce} E\\n'",
        f'  [ -s "$__rt/e" ] && head -c {MAX_STDERR} "$__rt/e" | base64',
        f"  printf '{nonce} Z\\n'",
        "}",
    ]
    for check in checks:
        seconds = max(1, int(check.timeout.total_seconds()))
        lines.append(f"__rc {check.id} {seconds} {shlex.quote(check.command)}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def _decode(chunks: list[str]) -> bytes:
    return base64.b64decode("".join(chunks), validate=False)


def _records(stdout: str, nonce: str) -> dict[str, tuple[int, int, bytes, bytes]]:
    """Check id → (exit code, elapsed seconds, stdout, stderr) from a probe's output."""
    records: dict[str, tuple[int, int, bytes, bytes]] = {}
    current: list[str] | None = None
    out: list[str] = []
    err: list[str] = []
    header: tuple[str, int, int] | None = None
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith(nonce + " "):
            parts = line.split()
            if parts[1] == "C" and len(parts) == 5:  # noqa: PLR2004 - nonce C id rc elapsed
                header = (parts[2], int(parts[3]), int(parts[4]))
                out, err = [], []
                current = out
            elif parts[1] == "E":
                current = err
            elif parts[1] == "Z" and header is not None:
                try:
                    records[header[0]] = (header[1], header[2], _decode(out), _decode(err))
                except (binascii.Error, ValueError):
                    records[header[0]] = (header[1], header[2], b"", b"undecodable output")
                header, current = None, None
        elif current is not None and line:
            current.append(line)
    return records


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


def _check_result(check: Check, record: tuple[int, int, bytes, bytes] | None) -> CheckResult:
    if record is None:
        return CheckResult(id=check.id, error="no result (the probe script stopped early)")
    rc, elapsed, out_bytes, err_bytes = record
    stderr = err_bytes.decode("utf-8", "replace").strip()
    timeout = int(check.timeout.total_seconds())
    if rc in _TIMEOUT_CODES and elapsed >= max(1, timeout) - 1:
        return CheckResult(id=check.id, rc=rc, stderr=stderr, error=f"timed out after {timeout}s")
    if len(out_bytes) > MAX_STDOUT:
        return CheckResult(id=check.id, rc=rc, error=f"output larger than {MAX_STDOUT} bytes")
    stdout = out_bytes.decode("utf-8", "replace")
    try:
        value = parse_value(check.parse, rc, stdout)
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
