"""Audit log: hash chain, verification, cross-process appends, redaction, structlog wiring."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from pydantic import BaseModel

from engine.audit import (
    GENESIS,
    AuditHead,
    AuditLog,
    audit_context,
    configure_audit,
    redact_secrets,
    verify_audit,
)
from engine.errors import AuditError
from engine.outcomes import HostOutcome, Mode
from engine.redaction import REDACTED, Secrets, is_secret_name

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class _Clock:
    """A clock that advances one second per reading."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


@pytest.fixture
def configured(audit_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(audit_path)
    configure_audit(log, clock=_Clock())
    yield log
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _write(path: Path, count: int) -> list[str]:
    log = AuditLog(path)
    clock = _Clock()
    for n in range(count):
        log.append({"event": "step.finished", "ts": clock(), "n": n, "host": f"dev-{n}"})
    return path.read_text().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def test_chain_written_and_verified(audit_path: Path) -> None:
    """Records carry 1-based seq, prev linking to the previous hash, and verify clean."""
    lines = _write(audit_path, 3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == records[0]["hash"]
    assert records[2]["prev"] == records[1]["hash"]
    assert records[0]["ts"] == "2025-03-01T12:00:01+00:00"
    assert lines[0] == json.dumps(records[0], sort_keys=True, separators=(",", ":")) + "\n"
    result = verify_audit(audit_path)
    assert (result.ok, result.records, result.first_bad_line) == (True, 3, None)


def test_edit_one_byte_of_middle_record(audit_path: Path) -> None:
    """Changing one byte of a middle record fails verification at exactly that line."""
    lines = _write(audit_path, 5)
    lines[2] = lines[2].replace('"host":"dev-2"', '"host":"dev-7"')
    _rewrite(audit_path, lines)
    result = verify_audit(audit_path)
    assert not result.ok
    assert result.first_bad_line == 3
    assert result.records == 2
    assert "edited" in result.reason


def test_edit_raw_byte_anywhere_is_detected(audit_path: Path) -> None:
    """Flipping any single byte of the file makes verification fail at that byte's line."""
    _write(audit_path, 3)
    original = audit_path.read_bytes()
    line_of = [original[:i].count(b"\n") + 1 for i in range(len(original))]
    for index in range(0, len(original), 7):
        data = bytearray(original)
        data[index] = ord("#") if data[index] != ord("#") else ord("%")
        audit_path.write_bytes(bytes(data))
        result = verify_audit(audit_path)
        assert not result.ok, index
        assert result.first_bad_line == line_of[index], index


def test_edit_last_record(audit_path: Path) -> None:
    """Editing the last record breaks its own hash even though nothing follows it."""
    lines = _write(audit_path, 4)
    lines[3] = lines[3].replace('"n":3', '"n":9')
    _rewrite(audit_path, lines)
    result = verify_audit(audit_path)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "hash mismatch" in result.reason


def test_delete_a_line(audit_path: Path) -> None:
    """Removing a record is reported at the line that now follows the gap."""
    lines = _write(audit_path, 5)
    del lines[1]
    _rewrite(audit_path, lines)
    result = verify_audit(audit_path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "removed" in result.reason


def test_swap_two_lines(audit_path: Path) -> None:
    """Reordering two records is reported at the first moved line."""
    lines = _write(audit_path, 5)
    lines[1], lines[3] = lines[3], lines[1]
    _rewrite(audit_path, lines)
    result = verify_audit(audit_path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "reordered" in result.reason


def test_unparsable_line(audit_path: Path) -> None:
    """A line that is not JSON is named with the reason."""
    lines = _write(audit_path, 3)
    lines.insert(1, "garbage\n")
    _rewrite(audit_path, lines)
    result = verify_audit(audit_path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "not valid JSON" in result.reason


def test_truncated_tail_detected_with_saved_head(audit_path: Path) -> None:
    """Removing the last records is invisible to the chain but caught against a saved head."""
    lines = _write(audit_path, 4)
    head = AuditLog(audit_path).head()
    assert head == AuditHead(seq=4, hash=json.loads(lines[3])["hash"])
    _rewrite(audit_path, lines[:2])
    assert verify_audit(audit_path).ok
    result = verify_audit(audit_path, expected_head=head)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "removed from the end" in result.reason


def test_missing_and_empty_files(audit_path: Path) -> None:
    """A missing log is an AuditError naming the path; an empty one is valid with 0 records."""
    with pytest.raises(AuditError, match="does not exist") as info:
        verify_audit(audit_path)
    assert str(audit_path) in str(info.value)
    audit_path.parent.mkdir(parents=True)
    audit_path.touch()
    result = verify_audit(audit_path)
    assert (result.ok, result.records) == (True, 0)
    assert "empty" in result.reason
    assert AuditLog(audit_path).head() is None


def test_append_refuses_reserved_keys_and_missing_ts(audit_path: Path) -> None:
    """Events cannot forge chain fields and must carry a timestamp."""
    log = AuditLog(audit_path)
    with pytest.raises(AuditError, match="reserved key"):
        log.append({"event": "x", "ts": T0, "seq": 9})
    with pytest.raises(AuditError, match="has no 'ts'"):
        log.append({"event": "x"})


def test_append_refuses_a_torn_tail(audit_path: Path) -> None:
    """Appending after an incomplete last line fails instead of chaining onto garbage."""
    lines = _write(audit_path, 2)
    _rewrite(audit_path, [lines[0], lines[1][:20]])
    with pytest.raises(AuditError, match="incomplete"):
        AuditLog(audit_path).append({"event": "x", "ts": T0})


class _Sample(BaseModel):
    name: str


def test_non_json_values_serialize(audit_path: Path) -> None:
    """Paths, datetimes, enums, sets, timedeltas and pydantic models are written as plain JSON."""
    record = AuditLog(audit_path).append(
        {
            "event": "run.started",
            "ts": datetime(2025, 3, 1, 13, 0, tzinfo=UTC),
            "path": Path("/etc/remediate"),
            "mode": Mode.APPLY,
            "outcome": HostOutcome.FIXED,
            "hosts": {"b", "a"},
            "cooldown": timedelta(minutes=5),
            "model": _Sample(name="x"),
            "pair": (1, 2),
        }
    )
    written = json.loads(audit_path.read_text())
    assert written == record
    assert written["path"] == "/etc/remediate"
    assert written["mode"] == "apply"
    assert written["outcome"] == "fixed"
    assert written["hosts"] == ["a", "b"]
    assert written["cooldown"] == 300.0
    assert written["model"] == {"name": "x"}
    assert written["pair"] == [1, 2]
    assert written["ts"] == "2025-03-01T13:00:00+00:00"
    assert verify_audit(audit_path).ok


def test_each_log_notices_the_other_writer(audit_path: Path) -> None:
    """Two logs on one file, appending in turn, chain onto each other's records."""
    first, second = AuditLog(audit_path), AuditLog(audit_path)
    for n in range(6):
        (first if n % 3 else second).append({"event": "test.append", "ts": T0, "n": n})
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["prev"] == p["hash"] for p, r in itertools.pairwise(records))
    assert verify_audit(audit_path).ok


def test_line_is_the_canonical_json_of_the_record(audit_path: Path) -> None:
    """A record's line is its canonical JSON, and its hash covers everything but the hash."""
    record = AuditLog(audit_path).append(
        {"event": "x", "ts": T0, "zeta": [1, {"b": "é", "a": None}], "alpha": 1.5}
    )
    line = audit_path.read_text()
    assert line == json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    unhashed = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(unhashed, sort_keys=True, separators=(",", ":"))
    assert record["hash"] == hashlib.sha256(canonical.encode()).hexdigest()


def _append_many(path: str, writer: int, count: int) -> None:
    """Child process body: append ``count`` records through its own AuditLog."""
    log = AuditLog(Path(path))
    for n in range(count):
        log.append({"event": "test.append", "ts": T0, "writer": writer, "n": n})


def test_two_processes_append_concurrently(audit_path: Path) -> None:
    """Two processes appending 200 records each leave one valid chain of 400 records."""
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_append_many, args=(str(audit_path), writer, 200)) for writer in (1, 2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0]
    for worker in workers:
        worker.close()
    result = verify_audit(audit_path)
    assert (result.ok, result.records) == (True, 400), result.reason
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    for writer in (1, 2):
        assert [r["n"] for r in records if r["writer"] == writer] == list(range(200))


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "ssh_pass",
        "ansible_become_pass",
        "db_passwd",
        "client_secret",
        "github_token",
        "accessToken",
        "API_KEY",
        "apikey",
        "private_key",
        "ssh_key",
        "credentials",
        "Authorization",
        "bearer",
    ],
)
def test_secret_names_recognised(key: str) -> None:
    """Common secret field names are recognised whatever their case or separator."""
    assert is_secret_name(key)


@pytest.mark.parametrize("key", ["host", "passed", "bypass", "compass", "keys", "event", "reason"])
def test_ordinary_names_not_secret(key: str) -> None:
    """Ordinary field names that merely contain secret-like letters are kept."""
    assert not is_secret_name(key)


def test_long_names_are_judged_like_short_ones() -> None:
    """A name too long to be remembered gets the same answer, asked twice."""
    long_secret, long_plain = "x" * 80 + "_token", "x" * 80 + "_host"
    assert [is_secret_name(long_secret), is_secret_name(long_secret)] == [True, True]
    assert [is_secret_name(long_plain), is_secret_name(long_plain)] == [False, False]


def test_redaction_of_nested_secrets_and_secret_keys() -> None:
    """Secrets are redacted at any depth, by name and by secret_keys, which is dropped."""
    event = {
        "event": "step.started",
        "host": "dev-1",
        "vars": {
            "wifi_ssid": "shop",
            "ssh_pass": "hunter2",
            "nested": [{"api_token": "abc", "count": 2}, {"Password": "x"}],
        },
        "token": "t",
        "secret_keys": ["wifi_psk", "SSH_PASS"],
        "extra": {"deep": {"wifi_psk": "psk-value"}},
    }
    out = redact_secrets(None, "info", event)
    assert out == {
        "event": "step.started",
        "host": "dev-1",
        "vars": {
            "wifi_ssid": "shop",
            "ssh_pass": REDACTED,
            "nested": [{"api_token": REDACTED, "count": 2}, {"Password": REDACTED}],
        },
        "token": REDACTED,
        "extra": {"deep": {"wifi_psk": REDACTED}},
    }


def test_events_through_structlog_land_in_the_file(configured: AuditLog, audit_path: Path) -> None:
    """Events from structlog.get_logger() after configure_audit are redacted, stamped, chained."""
    log = structlog.get_logger()
    with audit_context("run-1", runbook="fix-wifi", mode=Mode.DRY_RUN):
        log.info("guard.denied", host="dev-1", guard="cooldown", message="acted 5 min ago")
        log.warning(
            "step.started",
            host="dev-2",
            vars={"wifi_psk": "s3cret", "ssid": "x"},
            secret_keys=["wifi_psk"],
        )
    log.info("outside.context")
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["guard.denied", "step.started", "outside.context"]
    first = records[0]
    assert first["run_id"] == "run-1"
    assert first["runbook"] == "fix-wifi"
    assert first["mode"] == "dry-run"
    assert first["level"] == "info"
    assert first["guard"] == "cooldown"
    assert first["ts"] == "2025-03-01T12:00:01+00:00"
    assert records[1]["vars"] == {"wifi_psk": REDACTED, "ssid": "x"}
    assert records[1]["level"] == "warning"
    assert "secret_keys" not in records[1]
    assert "run_id" not in records[2]
    assert verify_audit(audit_path).records == 3
    assert configured.head() == AuditHead(seq=3, hash=records[2]["hash"])


def test_known_secrets_are_scrubbed_by_value_anywhere(audit_path: Path) -> None:
    """The entry point's and the run's secrets are replaced in any string, model or error."""
    process, run = "webhook-token-0123456789", "param-secret-0123456789"
    configure_audit(AuditLog(audit_path), clock=_Clock(), secrets=Secrets([process]))
    log = structlog.get_logger()
    try:
        with audit_context("run-1", secrets=Secrets([run])):
            log.info(
                "step.finished",
                message=f"curl: 401 for Authorization: Bearer {process}",
                evidence={"out": [f"token={run}"]},
                error=ValueError(f"bad {run}"),
            )
        log.info("outside.context", labels={"echo": run, "prefix": process[:6]})
    finally:
        structlog.reset_defaults()
    text = audit_path.read_text()
    assert process not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["message"] == f"curl: 401 for Authorization: Bearer {REDACTED}"
    assert records[0]["evidence"] == {"out": [f"token={REDACTED}"]}
    assert records[0]["error"] == f"ValueError: bad {REDACTED}"
    # Outside the run's context its own secrets are not known (and a short part is no secret).
    assert records[1]["labels"] == {"echo": run, "prefix": process[:6]}
    assert verify_audit(audit_path).ok


def test_exceptions_are_rendered_as_text(configured: AuditLog, audit_path: Path) -> None:
    """log.exception() writes the traceback as a string, not a Python object."""
    log = structlog.get_logger()
    try:
        raise RuntimeError("boom")  # noqa: TRY301 - the test needs a live exception
    except RuntimeError:
        log.exception("run.crashed")
    record = json.loads(audit_path.read_text())
    assert "RuntimeError: boom" in record["exception"]
    assert configured.head() is not None


def test_console_output_is_redacted(audit_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With also_console the event is written to the file and rendered on stderr, redacted."""
    configure_audit(AuditLog(audit_path), clock=_Clock(), also_console=True)
    try:
        structlog.get_logger().info("run.started", password="hunter2")  # noqa: S106 - a fake secret
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "run.started" in err
    assert "hunter2" not in err
    assert verify_audit(audit_path).records == 1


def test_capture_logs_captures_events(audit_path: Path) -> None:
    """structlog.testing.capture_logs() sees events instead of the file: how stage tests assert."""
    configure_audit(AuditLog(audit_path), clock=_Clock())
    try:
        with structlog.testing.capture_logs() as captured:
            structlog.get_logger().info("guard.denied", host="dev-1", guard="lock")
    finally:
        structlog.reset_defaults()
    assert captured == [
        {"event": "guard.denied", "host": "dev-1", "guard": "lock", "log_level": "info"}
    ]
    assert not audit_path.exists()
