"""The server's log options: a module of their own, so the CLI declares them cheaply."""

from __future__ import annotations

from enum import StrEnum


class LogFormat(StrEnum):
    """How stderr lines are rendered."""

    AUTO = "auto"  # console on a terminal, JSON otherwise
    CONSOLE = "console"
    JSON = "json"


class LogLevel(StrEnum):
    """The least level shown on stderr (the audit log keeps every event regardless)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
