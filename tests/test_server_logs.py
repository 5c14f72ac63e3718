"""The server's stderr log: formats, levels, tracebacks, and secrets kept out."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from engine.audit import AuditLog
from engine.logopts import LogFormat, LogLevel
from engine.redaction import NO_SECRETS
from engine.server.logs import configure_server_logs, operator_log

TOKEN = "webhook-token-0123456789abcdef"  # noqa: S105 - a test credential
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def configure(tmp_path: Path) -> Iterator[Any]:
    """Configure the server's logs into a buffer; put structlog and logging back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def make(fmt: LogFormat, level: LogLevel = LogLevel.INFO) -> tuple[io.StringIO, Path]:
        stream = io.StringIO()
        audit = tmp_path / "audit.jsonl"
        configure_server_logs(
            AuditLog(audit),
            clock=lambda: T0,
            secrets=NO_SECRETS.with_values([TOKEN]),
            fmt=fmt,
            level=level,
            stream=stream,
        )
        return stream, audit

    yield make
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_show_the_operators_events_and_audit_everything(configure: Any) -> None:
    """At info: the operator's events and warnings on stderr, a run's inner events audited only."""
    stream, audit = configure(LogFormat.JSON)
    log = structlog.get_logger()
    log.info("queue.started", runbook="disk-full", host="dev-a")
    log.info("probe.result", host="dev-a", check="free")  # a pipeline event: debug on stderr
    log.warning("breaker.opened", cause="storm")
    operator_log().info("webhook", status=202, queued=1)
    shown = _lines(stream)
    assert [(e["event"], e["level"]) for e in shown] == [
        ("queue.started", "info"),
        ("breaker.opened", "warning"),
        ("webhook", "info"),
    ]
    assert list(shown[0])[:3] == ["ts", "level", "event"]
    audited = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert audited == ["queue.started", "probe.result", "breaker.opened"]  # not the webhook line


def test_debug_shows_a_runs_inner_events_and_warning_hides_info(configure: Any) -> None:
    """--log-level debug adds the pipeline's events; --log-level warning keeps only warnings up."""
    stream, _ = configure(LogFormat.JSON, LogLevel.DEBUG)
    structlog.get_logger().info("probe.result", host="dev-a")
    assert [(e["event"], e["level"]) for e in _lines(stream)] == [("probe.result", "debug")]
    stream, _ = configure(LogFormat.JSON, LogLevel.WARNING)
    structlog.get_logger().info("queue.started")
    operator_log().info("webhook", status=202)
    structlog.get_logger().error("worker.error", error="boom")
    assert [e["event"] for e in _lines(stream)] == ["worker.error"]


def test_a_worker_error_is_logged_with_its_traceback(configure: Any) -> None:
    """An exception logged by a worker reaches stderr with its traceback."""
    stream, _ = configure(LogFormat.JSON)

    def fail() -> None:
        raise RuntimeError("the claim went wrong")

    try:
        fail()
    except RuntimeError:
        structlog.get_logger().exception("worker.error", worker="remediate-worker-0")
    (event,) = _lines(stream)
    assert event["exception"].startswith("Traceback (most recent call last):")
    assert "in fail" in event["exception"]
    assert "RuntimeError: the claim went wrong" in event["exception"]


def _leak() -> None:
    raise ValueError(f"token was {TOKEN}")


def test_secrets_never_reach_stderr_by_name_or_value(configure: Any) -> None:
    """A known secret in any field, a header, a traceback or a library's log is scrubbed."""
    for fmt in (LogFormat.JSON, LogFormat.CONSOLE):
        stream, _ = configure(fmt)
        log = structlog.get_logger()
        log.warning("inventory.reload_failed", error=f"bad token {TOKEN} in hosts.ini")
        log.info("queue.started", authorization=f"Bearer {TOKEN}", nested={"k": [TOKEN]})
        operator_log().info("webhook", status=401, error=f"got {TOKEN}")
        try:
            _leak()
        except ValueError:
            log.exception("worker.error")
        logging.getLogger("uvicorn.error").error("request with %s failed", TOKEN)
        text = stream.getvalue()
        assert TOKEN not in text
        assert text.count("[REDACTED]") >= 6, text
        assert "ValueError" in text
        assert "request with [REDACTED] failed" in text


def test_the_console_format_is_for_people(configure: Any) -> None:
    """Console format: one readable line per event, no JSON, the time first."""
    stream, _ = configure(LogFormat.CONSOLE)
    operator_log().info("webhook", status=202, queued=1, latency_ms=1.5)
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("2026-12-01T12:00:00")
    assert "webhook" in line
    assert "status=202" in line
    assert not line.lstrip().startswith("{")


def test_auto_picks_json_when_stderr_is_not_a_terminal(configure: Any) -> None:
    """``auto`` on a pipe or file writes JSON lines."""
    stream, _ = configure(LogFormat.AUTO)
    operator_log().info("webhook", status=202)
    assert _lines(stream)[0]["event"] == "webhook"
