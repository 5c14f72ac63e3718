"""What ``remediate serve`` tells its operator: structlog lines on stderr.

Every event still goes to the audit log first (:func:`engine.audit.audit_processors`); the
same event, already redacted and scrubbed of known secrets, is then shown on stderr when it
is one an operator follows (:data:`OPERATOR_EVENTS`) or a warning or worse; the rest (a run's
per-host pipeline events) are ``debug`` on stderr.  One line per notification (status code,
counts, latency) is written to stderr only (:func:`operator_log`): an audit record per HTTP
request would cost an append each, and ``alert.received`` already records every alert.

Formats: ``console`` (structlog's, for a person at a terminal) or ``json`` (one object per
line, for journald or a log shipper); ``auto`` picks ``console`` when stderr is a terminal.
Standard-library logging (uvicorn's errors, libraries) goes to the same stream in the same
format.  Whatever the format, a known secret's value never reaches stderr: events are
scrubbed by key and by value, and each rendered line is scrubbed again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import structlog

from engine.audit import AuditSink, audit_processors, redact_secrets
from engine.logopts import LogFormat, LogLevel
from engine.redaction import Secrets

_NUMBERS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}

#: Events shown on stderr at their own level: the server's life, notifications, runs started
#: and finished, breaker, inventory, approvals.  Others below warning are shown as debug.
OPERATOR_EVENTS = frozenset(
    {
        "server.started",
        "server.listening",
        "server.stopping",
        "server.stopped",
        "webhook",
        "queue.started",
        "queue.finished",
        "queue.held",
        "queue.expired",
        "run.interrupted",
        "breaker.opened",
        "breaker.closed",
        "inventory.loaded",
        "inventory.reload_failed",
        "approval.requested",
        "approval.granted",
        "approval.denied",
        "approval.applied",
        "approval.failed",
        "approval.expired",
    }
)


class _ForOperator:
    """Processor: drop what is below the level asked for; a run's inner events are debug."""

    def __init__(self, level: LogLevel) -> None:
        self._least = _NUMBERS[level.value]

    def __call__(
        self,
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        del logger
        level = str(event_dict.get("level", method_name))
        number = _NUMBERS.get(level, logging.INFO)
        if number < logging.WARNING and event_dict.get("event") not in OPERATOR_EVENTS:
            level, number = "debug", logging.DEBUG
        if number < self._least:
            raise structlog.DropEvent
        # Read left to right: when, how bad, what; then the details.
        return {
            "ts": event_dict.pop("ts", None),
            "level": level,
            "event": event_dict.pop("event", None),
            **{k: v for k, v in event_dict.items() if k != "level"},
        }


class _ScrubLine:
    """Processor (last): scrub known secrets from the rendered line once more, by value."""

    def __init__(self, secrets: Secrets) -> None:
        self._secrets = secrets

    def __call__(
        self, logger: structlog.typing.WrappedLogger, method_name: str, rendered: Any
    ) -> Any:
        del logger, method_name
        return self._secrets.scrub(rendered) if isinstance(rendered, str) else rendered


def _renderer(fmt: LogFormat, stream: TextIO) -> structlog.typing.Processor:
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if stream.isatty() else LogFormat.JSON
    if fmt is LogFormat.CONSOLE:
        # Tracebacks arrive formatted (format_exc_info) and scrubbed: never Rich's, which
        # would show local variables.
        return structlog.dev.ConsoleRenderer(
            colors=stream.isatty(),
            timestamp_key="ts",
            exception_formatter=structlog.dev.plain_traceback,
        )
    return structlog.processors.JSONRenderer(sort_keys=False)


def _stamp(clock: Callable[[], datetime]) -> structlog.typing.Processor:
    def stamp(
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        del logger, method_name
        event_dict.setdefault("ts", clock().isoformat(timespec="milliseconds"))
        return event_dict

    return stamp


def _scrub_values(secrets: Secrets) -> structlog.typing.Processor:
    def scrub(
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        del logger, method_name
        scrubbed: structlog.typing.EventDict = secrets.scrub_data(event_dict)
        return scrubbed

    return scrub


def _drop(
    logger: structlog.typing.WrappedLogger,
    method_name: str,
    event_dict: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    del logger, method_name, event_dict
    raise structlog.DropEvent


_operator: Any = structlog.wrap_logger(structlog.ReturnLogger(), processors=[_drop])


def operator_log() -> Any:
    """A logger whose events go to stderr only, never to the audit log (see the module doc)."""
    return _operator


def configure_server_logs(
    audit: AuditSink,
    *,
    clock: Callable[[], datetime],
    secrets: Secrets,
    fmt: LogFormat = LogFormat.AUTO,
    level: LogLevel = LogLevel.INFO,
    stream: TextIO | None = None,
) -> None:
    """Audit every event to ``audit`` and show the operator's on ``stream`` (stderr)."""
    global _operator  # noqa: PLW0603 - configured once, by the entry point
    out = stream or sys.stderr
    render: list[structlog.typing.Processor] = [_renderer(fmt, out), _ScrubLine(secrets)]
    tail: list[structlog.typing.Processor] = [_ForOperator(level), *render]
    structlog.configure(
        processors=audit_processors(audit, clock, then=tail, secrets=secrets),
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    chain: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        redact_secrets,
        _scrub_values(secrets),
        _stamp(clock),
    ]
    _operator = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[*chain, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
    )
    # Standard-library logging (uvicorn's errors, libraries): the same stream and format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=chain,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    least = _NUMBERS[level.value]
    root.setLevel(least if least == logging.DEBUG else max(least, logging.WARNING))
