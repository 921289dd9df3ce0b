"""Durations as operators write and read them: ``90d`` on the way in, ``in 90d`` on the way out.

Both directions use the same short units, so what the CLI prints is what it accepts.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

__all__ = ["parse_duration", "relative_time"]

# [0-9], not \d: \d also matches other scripts' digits, which int() would quietly accept.
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION = timedelta(days=100 * 365)


def parse_duration(text: str, *, allow_zero: bool = False) -> timedelta:
    """Parse ``90d``, ``24h``, ``30m``, ``3600s`` or ``2w`` into a timedelta.

    Raises :class:`ValueError` with a message fit for an operator.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a whole number and a unit s, m, h, d or w"
            " (e.g. 90d, 24h, 30m, 3600s, 2w)"
        )
    # Bound the number before building the timedelta, which overflows past 999999999 days;
    # one of more than 12 digits is over the bound in any unit (and int() refuses very
    # long ones).
    if len(match[1].lstrip("0")) > 12:
        raise ValueError(f"duration {text!r} is longer than 100 years")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > _MAX_DURATION.total_seconds():
        raise ValueError(f"duration {text!r} is longer than 100 years")
    value = timedelta(seconds=seconds)
    if not allow_zero and not value:
        raise ValueError(f"duration {text!r} must be positive")
    return value


def relative_time(value: datetime | None, now: float) -> str:
    """A short, rounded distance from now (``in 90d``, ``5m ago``) that fits a table column."""
    if value is None:
        return "never"
    delta = value.timestamp() - now
    seconds = round(abs(delta))
    if seconds == 0:
        return "now"
    for unit, size, limit in (("s", 1, 60), ("m", 60, 60), ("h", 3600, 48), ("d", 86400, 730)):
        if seconds < size * limit:
            amount = f"{round(seconds / size)}{unit}"
            break
    else:
        amount = f"{round(seconds / (365 * 86400))}y"
    return f"in {amount}" if delta > 0 else f"{amount} ago"
