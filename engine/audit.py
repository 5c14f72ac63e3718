"""Audit: a tamper-evident, append-only JSON-lines log fed by structlog.

Every stage emits events with ``structlog.get_logger()``; an entry point calls
:func:`configure_audit` once, and each event then runs through a chain of small
processors (the shape of structlog's own ``processors`` module)::

    merge contextvars → add level → format exc_info → redact secrets → stamp time → append

(secrets are redacted by key name, then scrubbed by value as the event is appended: see
:mod:`engine.redaction`).

Each line of the file is one record in canonical JSON (sorted keys, compact
separators, ASCII) carrying the event plus ``seq`` (1-based), ``ts`` (UTC
ISO-8601), ``prev`` (the previous record's hash, 64 zeros for the first) and
``hash`` (sha256 of the record's canonical JSON without ``hash``).  Editing any
record breaks its own hash; removing or reordering records breaks ``seq`` and
``prev``.  :func:`verify_audit` names the first bad line.

A chain alone cannot tell a truncated tail from a shorter log: keep
:meth:`AuditLog.head` somewhere else (the state store) and pass it to
:func:`verify_audit` as ``expected_head`` to detect that too.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Protocol, cast

import structlog
from pydantic import BaseModel, ConfigDict

from engine.errors import AuditError, EngineError
from engine.redaction import NO_SECRETS, REDACTED, Secrets, is_secret_name

#: ``prev`` of the first record.
GENESIS = "0" * 64
#: Keys the log adds to every record; events must not carry them.
RESERVED_KEYS = frozenset({"seq", "prev", "hash"})

_TAIL_CHUNK = 8192


#: Per-host events of planning: many per run, none of them changes a device.
PER_HOST_EVENTS = frozenset({"targets.resolved", "probe.finished", "host.decided"})


def utc_now() -> datetime:
    """Return the current time in UTC (the default clock of entry points)."""
    return datetime.now(UTC)


class AuditHead(BaseModel):
    """Sequence number and hash of the last record of an audit log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int
    hash: str


class AuditVerification(BaseModel):
    """Result of checking an audit file's hash chain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: bool
    records: int  # records read before the first bad line (all of them when ok)
    first_bad_line: int | None  # 1-based
    reason: str


# --------------------------------------------------------------------------- encoding


#: Types written as they are (exactly these: a StrEnum is a str but is written as its value).
_NATIVE = frozenset({str, int, float, bool, type(None)})


def _jsonable(value: object) -> Any:
    """Return ``value`` as JSON-native data (dict with str keys, list, str, int, float, bool)."""
    # Most of an event is already JSON-native (alert labels, names, counts): exact types
    # first, so only the rest pays for the isinstance chain (Enum before str/int: a StrEnum
    # is a str, but is written as its value).
    kind = type(value)
    if kind is str or kind is int or kind is bool or kind is float or value is None:
        return value
    if kind is dict:  # leaves are copied without a call: most of an event is leaves
        items = cast("dict[object, object]", value).items()
        return {
            k if type(k) is str else str(k): v if type(v) in _NATIVE else _jsonable(v)
            for k, v in items
        }
    if kind is list:
        return [v if type(v) in _NATIVE else _jsonable(v) for v in cast("list[object]", value)]
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=_canonical)
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    for kind, convert in _CONVERTERS:
        if isinstance(value, kind):
            return convert(value)
    return repr(value)


def _iso(moment: datetime) -> str:
    """Return ``moment`` as UTC ISO-8601; naive datetimes are taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


#: How values of common non-JSON types are written (first match wins: datetime before date).
_CONVERTERS: tuple[tuple[type[Any], Callable[[Any], Any]], ...] = (
    (datetime, _iso),
    (date, date.isoformat),
    (timedelta, timedelta.total_seconds),
    (PurePath, str),
    (bytes, lambda data: data.decode("utf-8", errors="backslashreplace")),
    (BaseException, lambda exc: f"{type(exc).__name__}: {exc}"),
)


def _canonical(data: object) -> str:
    """Return the canonical JSON text of JSON-native ``data``."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(record_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(record_without_hash).encode("ascii")).hexdigest()


def _canonical_object(members: Mapping[str, str]) -> str:
    """Return the canonical JSON text of an object from its members' canonical texts.

    The same text :func:`_canonical` gives for the object itself (keys sorted, compact,
    ASCII), so a record's members are encoded once for its hash and its line.
    """
    return "{" + ",".join(f"{_canonical(k)}:{members[k]}" for k in sorted(members)) + "}"


def encode_event(
    event: Mapping[str, object], secrets: Secrets = NO_SECRETS
) -> tuple[dict[str, Any], dict[str, str]]:
    """The event as JSON data, and each member's canonical text (encoded once, reused).

    ``secrets`` are replaced wherever they occur in its values (looked for in the encoded
    text, which costs far less than in each string of a large event).
    """
    body = _jsonable(event)
    members = {key: _canonical(value) for key, value in body.items()}
    if secrets:
        for key, text in members.items():
            if secrets.found_in(text):
                body[key] = secrets.scrub_data(body[key])
                members[key] = _canonical(body[key])
    return body, members


def seal_record(members: Mapping[str, str], seq: int, prev: str) -> tuple[str, str]:
    """The record's line (canonical JSON, no newline) and hash, as number ``seq`` after ``prev``.

    ``members`` are the event's canonical member texts (:func:`encode_event`); every sink
    seals records this way, so a chain kept in a database exports to the very lines a file
    holds, and :func:`verify_audit` checks either.
    """
    sealed = {**members, "seq": str(seq), "prev": _canonical(prev)}
    digest = hashlib.sha256(_canonical_object(sealed).encode("ascii")).hexdigest()
    sealed["hash"] = _canonical(digest)
    return _canonical_object(sealed), digest


def write_export(target: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``target`` (mode 0600) through a temporary file, then rename."""
    partial = target.with_name(target.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        partial.replace(target)
    except OSError as exc:
        raise AuditError(f"{target}: cannot write the export: {exc.strerror}") from exc


# --------------------------------------------------------------------------- the log


class AuditSink(Protocol):
    """Where audited events go: the JSON-lines file, or a chain in the state database."""

    def append(
        self, event: Mapping[str, object], *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, Any]:
        """Append ``event`` as the next record (or keep it for the open unit of work).

        ``secrets`` are scrubbed from its values first (:func:`encode_event`).
        """

    def head(self) -> AuditHead | None:
        """The last record's seq and hash, or None when there is none."""

    def export(self, target: Path) -> AuditHead | None:
        """Write the whole chain to ``target`` as JSON lines; return its head."""

    def verify(self, expected_head: AuditHead | None = None) -> AuditVerification:
        """Check the chain (and, with ``expected_head``, that its tail is all there)."""


# --------------------------------------------------------------------------- units of work
#
# A backend that keeps the chain next to the state (PostgreSQL) appends an event in the same
# transaction as the state change it records.  Inside ``audit_unit()`` its sink keeps the
# events; the store's next transaction in the same context takes them (``take_pending``) and
# appends them before it commits; what is left when the unit ends gets a transaction of its
# own.  A store running a transaction sets a writer, and events emitted meanwhile (from a
# hook the store calls inside it) are appended to that transaction directly.  The file sink
# ignores both: it appends at once, as it always did.


@dataclasses.dataclass
class _Unit:
    """Events kept for the next state change, and who writes them if none takes them."""

    events: list[dict[str, str]] = dataclasses.field(default_factory=list)
    flush: Callable[[list[dict[str, str]]], None] | None = None


_UNIT: contextvars.ContextVar[_Unit | None] = contextvars.ContextVar(
    "remediate_audit_unit", default=None
)
_WRITER: contextvars.ContextVar[Callable[[dict[str, str]], AuditHead] | None] = (
    contextvars.ContextVar("remediate_audit_writer", default=None)
)


@contextmanager
def audit_unit() -> Iterator[None]:
    """Keep the events emitted inside for the next state change (see above)."""
    if _UNIT.get() is not None:  # nested: the outer unit keeps them
        yield
        return
    unit = _Unit()
    token = _UNIT.set(unit)
    try:
        yield
    finally:
        _UNIT.reset(token)
        if unit.events and unit.flush is not None:
            unit.flush(unit.events)


def take_pending() -> list[dict[str, str]]:
    """The events of the open unit of work not yet written (a store's transaction takes them)."""
    unit = _UNIT.get()
    if unit is None or not unit.events:
        return []
    taken = list(unit.events)
    unit.events.clear()
    return taken


@contextmanager
def writing_into(writer: Callable[[dict[str, str]], AuditHead]) -> Iterator[None]:
    """Inside the block, events are appended by ``writer`` (a store's open transaction)."""
    token = _WRITER.set(writer)
    try:
        yield
    finally:
        _WRITER.reset(token)


class DatabaseAuditSink:
    """The audit chain in the state database, appended with the state changes it records.

    ``append_to_store(members)`` appends records in a transaction of their own (events with
    no state change); ``read_head()`` and ``export_to(target)`` read the chain back.
    """

    def __init__(
        self,
        *,
        append: Callable[[list[dict[str, str]]], list[AuditHead]],
        read_head: Callable[[], AuditHead | None],
        export: Callable[[Path], AuditHead | None],
        verify: Callable[[AuditHead | None], AuditVerification],
        where: str,
    ) -> None:
        self._verify = verify
        self._append = append
        self._read_head = read_head
        self._export = export
        self.where = where

    def __repr__(self) -> str:
        return f"DatabaseAuditSink({self.where!r})"

    def append(
        self, event: Mapping[str, object], *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, Any]:
        """Append ``event`` into the open transaction, the open unit, or one of its own."""
        clash = RESERVED_KEYS & event.keys()
        if clash:
            raise AuditError(
                f"{self.where}: event {event.get('event')!r} uses reserved key(s) "
                f"{', '.join(sorted(clash))}"
            )
        if "ts" not in event:
            raise AuditError(f"{self.where}: event {event.get('event')!r} has no 'ts'")
        body, members = encode_event(event, secrets)
        writer = _WRITER.get()
        if writer is not None:
            head = writer(members)
            return {**body, "seq": head.seq, "hash": head.hash}
        unit = _UNIT.get()
        if unit is not None:
            unit.events.append(members)
            unit.flush = self.flush
            return body
        (head,) = self._append([members])
        return {**body, "seq": head.seq, "hash": head.hash}

    def flush(self, pending: list[dict[str, str]]) -> None:
        """Write events a unit kept but no transaction took, in one transaction."""
        if pending:
            self._append(pending)

    def head(self) -> AuditHead | None:
        """The chain's last record (read from the database)."""
        return self._read_head()

    def export(self, target: Path) -> AuditHead | None:
        """Write the chain to ``target`` as the JSON lines ``audit verify FILE`` checks."""
        return self._export(target)

    def verify(self, expected_head: AuditHead | None = None) -> AuditVerification:
        """Check the chain in the database against ``expected_head`` (default: its head row)."""
        return self._verify(expected_head)


@dataclasses.dataclass(frozen=True)
class _Written:
    """The file as one append left it, and the head it wrote."""

    stat: os.stat_result
    head: AuditHead


class AuditLog:
    """An append-only, hash-chained JSON-lines file, safe to append to from many processes.

    Each :meth:`append` opens the file with ``O_APPEND``, takes an exclusive
    ``flock``, reads the last record (or, when nobody else has written since,
    remembers the one it wrote), writes one line, fsyncs and closes — so
    appends from threads and processes interleave as whole, correctly chained
    records.  Earlier lines are never rewritten.

    ``unsynced_events`` names events written without their own fsync (the per-host
    records of a dry run, thousands per fleet-wide plan): a crashed process loses nothing
    (the kernel has the bytes), and the next synced record makes them durable too.
    """

    def __init__(self, path: Path, *, unsynced_events: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.unsynced_events = unsynced_events
        self._last: _Written | None = None

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def append(
        self, event: Mapping[str, object], *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, Any]:
        """Append ``event`` as the next record and return the record as written.

        ``event`` must carry ``ts`` (a datetime or an ISO-8601 string, normally
        set from the injected clock by the processor chain) and must not carry
        ``seq``, ``prev`` or ``hash``.  ``secrets`` are scrubbed from its values first
        (:func:`encode_event`).
        """
        clash = RESERVED_KEYS & event.keys()
        if clash:
            raise AuditError(
                f"{self.path}: event {event.get('event')!r} uses reserved key(s) "
                f"{', '.join(sorted(clash))}"
            )
        if "ts" not in event:
            raise AuditError(f"{self.path}: event {event.get('event')!r} has no 'ts'")
        body, members = encode_event(event, secrets)
        try:
            fd = self._open()
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot open audit log: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            head = self._head_under_lock(fd)
            seq, prev = (head.seq if head else 0) + 1, head.hash if head else GENESIS
            line, digest = seal_record(members, seq, prev)
            _write_all(fd, (line + "\n").encode("ascii"))
            if event.get("event") not in self.unsynced_events:
                os.fsync(fd)
            self._last = _Written(os.fstat(fd), AuditHead(seq=seq, hash=digest))
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot append to audit log: {exc.strerror}") from exc
        finally:
            os.close(fd)  # also releases the flock
        return {**body, "seq": seq, "prev": prev, "hash": digest}

    def verify(self, expected_head: AuditHead | None = None) -> AuditVerification:
        """Check the file's chain (see :func:`verify_audit`)."""
        return verify_audit(self.path, expected_head=expected_head)

    def export(self, target: Path) -> AuditHead | None:
        """Copy the log to ``target`` (the same JSON lines); return the head it ends with."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot read the audit log: {exc.strerror}") from exc
        write_export(target, [data] if data else [])
        return self.head()

    def _open(self) -> int:
        """Open the log for appending, creating it (and its folder) when missing."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # the folder is missing: made once, not checked per append
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, flags, 0o600)

    def _head_under_lock(self, fd: int) -> AuditHead | None:
        """The last record's seq and hash; the caller holds the lock.

        When the file is still the one this object last appended to, at the size that append
        left it (no other writer since), that append's head is used instead of reading and
        parsing the last line again (an ``alert.received`` record runs to kilobytes).
        """
        last = self._last
        if last is not None:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino, now.st_size) == (
                last.stat.st_dev,
                last.stat.st_ino,
                last.stat.st_size,
            ):
                return last.head
        return self._read_head(fd)

    def head(self) -> AuditHead | None:
        """Return the last record's seq and hash, or None for an empty or missing log."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot open audit log: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._read_head(fd)
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot read audit log: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _read_head(self, fd: int) -> AuditHead | None:
        """Return seq and hash of the last line of the open file; the caller holds a lock."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        tail = b""
        offset = size
        while offset > 0:
            step = min(_TAIL_CHUNK, offset)
            offset -= step
            tail = os.pread(fd, step, offset) + tail
            # The last line is complete once a newline precedes it (or the file starts).
            if tail.rfind(b"\n", 0, len(tail) - 1) != -1:
                break
        if not tail.endswith(b"\n"):
            raise AuditError(
                f"{self.path}: last line is incomplete (torn write?); "
                "run `remediate audit verify` and repair the log before appending"
            )
        last = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 : -1]
        try:
            record = json.loads(last)
            head = AuditHead(seq=record["seq"], hash=record["hash"])
        except (ValueError, TypeError, KeyError) as exc:
            raise AuditError(
                f"{self.path}: last line is not an audit record ({exc}); "
                "run `remediate audit verify` before appending"
            ) from exc
        return head


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:  # pragma: no cover - retried by Python since PEP 475
            continue
        if written == 0:  # pragma: no cover - regular files never do this
            raise OSError(errno.EIO, "short write")
        view = view[written:]


# --------------------------------------------------------------------------- verification


def verify_audit(path: Path, *, expected_head: AuditHead | None = None) -> AuditVerification:
    """Check the hash chain of the audit file at ``path`` and name the first bad line.

    Detects an edited record (its hash no longer matches, or it is not in
    canonical form), a removed or reordered record (``seq``/``prev`` do not
    follow), and an unparsable line.  With ``expected_head`` (seq and hash
    saved elsewhere after an append), also detects a truncated tail.  A missing
    file raises :class:`AuditError`; an empty file is a valid log of 0 records.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise AuditError(f"{path}: audit log does not exist") from exc
    except OSError as exc:
        raise AuditError(f"{path}: cannot open audit log: {exc.strerror}") from exc
    with handle:
        return _verify_lines(handle, expected_head)


def verify_lines(lines: Iterable[bytes], expected_head: AuditHead | None) -> AuditVerification:
    """Check records given as lines (each with its newline), as :func:`verify_audit` does."""
    return _verify_lines(iter(lines), expected_head)


def _verify_lines(lines: Iterator[bytes], expected_head: AuditHead | None) -> AuditVerification:
    prev = GENESIS
    count = 0
    head_seen = expected_head is None
    for number, raw in enumerate(lines, start=1):
        checked = _check_line(raw, seq=number, prev=prev)
        if isinstance(checked, str):
            return AuditVerification(ok=False, records=count, first_bad_line=number, reason=checked)
        count = number
        prev = checked["hash"]
        if expected_head is not None and number == expected_head.seq:
            if prev != expected_head.hash:
                return AuditVerification(
                    ok=False,
                    records=count,
                    first_bad_line=number,
                    reason=f"record {number} is not the one saved as the audit head",
                )
            head_seen = True
    if not head_seen:
        assert expected_head is not None  # noqa: S101 - narrowed by head_seen
        return AuditVerification(
            ok=False,
            records=count,
            first_bad_line=count + 1,
            reason=(
                f"log ends at record {count} but the saved head is record "
                f"{expected_head.seq}: records were removed from the end"
            ),
        )
    reason = "empty audit log: no records" if count == 0 else f"{count} records, chain intact"
    return AuditVerification(ok=True, records=count, first_bad_line=None, reason=reason)


def _check_line(raw: bytes, *, seq: int, prev: str) -> dict[str, Any] | str:
    """Return the parsed record, or why line ``seq`` breaks the chain."""
    if not raw.endswith(b"\n"):
        return "line is incomplete (no newline at the end: torn write or truncation)"
    try:
        record = json.loads(raw)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in (("seq", int), ("prev", str), ("hash", str)):
        if not isinstance(record.get(key), kind):
            return f"no {key!r} field of type {kind.__name__}"
    body = {k: v for k, v in record.items() if k != "hash"}
    if _digest(body) != record["hash"]:
        return "hash mismatch: the record was edited"
    if raw[:-1] != _canonical(record).encode("ascii"):
        return "not in canonical form: the line was edited"
    if record["seq"] != seq:
        return (
            f"seq is {record['seq']}, expected {seq}: a record before it was removed, "
            "or records were reordered"
        )
    if record["prev"] != prev:
        return (
            "prev does not match the previous record's hash: a record before it was "
            "removed or edited, or records were reordered"
        )
    return record


# --------------------------------------------------------------------------- processors


#: Whether a key names a secret, remembered per key (events repeat the same few keys: alert
#: labels, run fields), bounded so hostile label names cannot grow it without limit.
_SECRET_KEYS: dict[str, bool] = {}
_SECRET_KEYS_MAX = 4096


def _secret_key(key: str) -> bool:
    secret = is_secret_name(key)
    if len(_SECRET_KEYS) < _SECRET_KEYS_MAX:
        _SECRET_KEYS[key] = secret
    return secret


def _redact(value: object, names: frozenset[str]) -> object:
    """``value`` with every member whose key names a secret (or is in ``names``) redacted."""
    kind = type(value)
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        out: dict[object, object] = {}
        remembered = _SECRET_KEYS.get
        for key, item in cast("Mapping[object, object]", value).items():
            if type(key) is str:
                secret = remembered(key)
                if secret is None:
                    secret = _secret_key(key)
                if secret or (names and key.lower() in names):
                    out[key] = REDACTED
                    continue
            # Most members are strings or numbers: only containers are walked.
            out[key] = item if type(item) in _NATIVE else _redact(item, names)
        return out
    if kind is list or isinstance(value, list | tuple):
        return [
            item if type(item) in _NATIVE else _redact(item, names)
            for item in cast("list[object] | tuple[object, ...]", value)
        ]
    return value


def redact_secrets(
    logger: structlog.typing.WrappedLogger,
    method_name: str,
    event_dict: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    """Replace secret values anywhere in the event with ``[REDACTED]``, by their key.

    A value is secret when its key looks like a secret (``password``,
    ``*_token``, ``api_key``, ``authorization`` …, see :func:`is_secret_name`) or
    is named in the event's ``secret_keys`` field (runbook params marked secret);
    ``secret_keys`` itself is dropped.  Secrets known by value are scrubbed when the
    event is appended (see :class:`_Append`).
    """
    del logger, method_name
    declared = event_dict.pop("secret_keys", None) or ()
    if isinstance(declared, str):
        declared = (declared,)
    names = frozenset(str(name).lower() for name in declared)
    redacted = _redact(event_dict, names)
    assert isinstance(redacted, dict)  # noqa: S101 - _redact maps a mapping to a dict
    return redacted


#: The secrets of the run whose events are emitted in this context (see audit_context).
_RUN_SECRETS: contextvars.ContextVar[Secrets] = contextvars.ContextVar(
    "remediate_run_secrets", default=NO_SECRETS
)


class _Stamp:
    """Processor: set ``ts`` from the injected clock, as UTC ISO-8601."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock

    def __call__(
        self,
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        del logger, method_name
        event_dict["ts"] = _iso(self._clock())
        return event_dict


class _Append:
    """Processor: append the event to the audit log, then drop it or pass it on.

    Known secrets are scrubbed from the event as it is written, by value: the entry point's
    and the run's own (:func:`audit_context`); what is passed on is what was written.
    """

    def __init__(self, log: AuditSink, *, pass_on: bool, secrets: Secrets) -> None:
        self._log = log
        self._pass_on = pass_on
        self._secrets = secrets
        self._with_run: tuple[Secrets, Secrets] = (NO_SECRETS, secrets)  # last run's, combined

    def _known(self) -> Secrets:
        run = _RUN_SECRETS.get()
        if run.values <= self._secrets.values:
            return self._secrets
        last_run, combined = self._with_run
        if last_run is not run:
            combined = self._secrets | run
            self._with_run = (run, combined)
        return combined

    def __call__(
        self,
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        del logger, method_name
        record = self._log.append(event_dict, secrets=self._known())
        if not self._pass_on:
            raise structlog.DropEvent
        return {k: v for k, v in record.items() if k not in RESERVED_KEYS}


def audit_processors(
    log: AuditSink,
    clock: Callable[[], datetime],
    *,
    then: Sequence[structlog.typing.Processor] = (),
    secrets: Secrets = NO_SECRETS,
) -> list[structlog.typing.Processor]:
    """Return the processor chain that redacts, stamps and appends events to ``log``.

    Without ``then`` the last processor drops the event after writing it (any
    logger factory will do); with ``then`` (e.g. a console renderer) the
    event, already redacted, is passed on to those processors.  ``secrets`` are
    replaced wherever they occur in an event (see :class:`_Append`).
    """
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        redact_secrets,
        _Stamp(clock),
        _Append(log, pass_on=bool(then), secrets=secrets),
        *then,
    ]


def configure_audit(
    log: AuditSink,
    *,
    clock: Callable[[], datetime] = utc_now,
    also_console: bool = False,
    secrets: Secrets = NO_SECRETS,
) -> None:
    """Configure structlog (once, in an entry point) so every event is audited to ``log``.

    With ``also_console`` events are also rendered for people on stderr.  ``secrets``: the
    values the entry point knows to be secret, scrubbed from every event.
    """
    if also_console:
        processors = audit_processors(
            log, clock, then=[structlog.dev.ConsoleRenderer()], secrets=secrets
        )
        factory: Any = structlog.PrintLoggerFactory(sys.stderr)
    else:
        processors = audit_processors(log, clock, secrets=secrets)
        factory = structlog.ReturnLoggerFactory()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def log_anyway(method: Callable[..., Any], event: str, **fields: Any) -> None:
    """Log ``event`` with ``method`` (a bound logger's ``warning``, ``error``...), never raising.

    For background threads reporting a fault of the state database, which is also where the
    audit log may live: when the audit cannot take the event, it is written to stderr only
    (one line, with the traceback when ``exc_info`` asks for it), and the thread goes on.
    """
    try:
        method(event, **fields)
    except EngineError as exc:
        shown = {k: v for k, v in fields.items() if k != "exc_info"}
        sys.stderr.write(f"{event} {shown} (not audited: {exc})\n")
        reported = fields.get("exc_info")
        if reported is True:  # the exception being handled where it was logged
            reported = exc.__context__
        if isinstance(reported, BaseException):
            traceback.print_exception(reported, file=sys.stderr)
        sys.stderr.flush()


@contextmanager
def audit_context(
    run_id: str, *, secrets: Secrets = NO_SECRETS, **fields: object
) -> Iterator[None]:
    """Bind ``run_id`` and other run-wide fields to every event emitted inside the block.

    ``secrets`` (the run's secret param values) are scrubbed from those events, never written.
    """
    token = _RUN_SECRETS.set(secrets)
    try:
        with structlog.contextvars.bound_contextvars(run_id=run_id, **fields):
            yield
    finally:
        _RUN_SECRETS.reset(token)
