"""Durations as runbooks write them: ``45s``, ``10m``, ``1h30m``, ``2d``, or whole seconds."""

from __future__ import annotations

import re
from datetime import timedelta

DURATION_PATTERN = r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$"
DURATION_RE = re.compile(DURATION_PATTERN)


def parse_duration(value: object) -> timedelta:
    """Parse ``90s``, ``30m``, ``1h30m``, ``2d`` or a whole number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str) and value.strip().isdigit():
        return timedelta(seconds=int(value.strip()))
    if isinstance(value, str):
        match = DURATION_RE.match(value.strip())
        if match and any(match.groupdict().values()):
            parts = {k: int(v) for k, v in match.groupdict().items() if v}
            return timedelta(
                days=parts.get("d", 0),
                hours=parts.get("h", 0),
                minutes=parts.get("m", 0),
                seconds=parts.get("s", 0),
            )
    raise ValueError(f"bad duration {value!r}: use a number of seconds or e.g. 45s, 10m, 1h30m, 2d")


def format_duration(value: timedelta) -> str:
    """Render a duration the way runbooks write it (``1h30m``)."""
    total = int(value.total_seconds())
    if total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
