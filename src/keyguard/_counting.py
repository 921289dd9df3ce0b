"""The one atomic step every counter store performs: take a unit from several buckets at once.

A bucket is either a rate bucket (GCRA: its value is the theoretical arrival time, a POSIX
time) or a count bucket (its value is the units used). An absent bucket has value 0.0,
which means "full" for both kinds. The step is all or nothing: a request is admitted only
if every bucket has room, and then every bucket is charged; otherwise nothing changes. The
Redis script and the PostgreSQL function in the network stores are this function, mirrored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["EPSILON", "Bucket", "apply"]

#: Tolerance for float rounding at a window edge (a microsecond).
EPSILON = 1e-6


class Bucket(NamedTuple):
    """One counter a request draws on.

    ``interval > 0``: a GCRA bucket emitting one unit every ``interval`` seconds, holding
    at most ``capacity`` seconds of credit (``capacity / interval`` units). ``interval == 0``:
    a count bucket of ``capacity`` units. The store may forget the bucket after
    ``expires_at`` (POSIX time; None: keep it).
    """

    name: str
    interval: float
    capacity: float
    expires_at: float | None


def apply(
    buckets: Sequence[Bucket], values: Sequence[float], now: float
) -> list[tuple[float, float | None]] | None:
    """Each bucket's value after taking one unit at ``now``, with when the store may forget
    it (a rate bucket once it is full again, a count bucket at its ``expires_at``); None if
    any bucket has no room."""
    charged: list[tuple[float, float | None]] = []
    # enumerate, not zip(strict=True): on CPython 3.11 a keyword argument to zip costs
    # more than the rest of a one-bucket charge.
    for i, (_, interval, capacity, expires_at) in enumerate(buckets):
        value = values[i]
        if interval > 0:
            new = (value if value > now else now) + interval
            if new - now > capacity + EPSILON:
                return None
            charged.append((new, new))
        else:
            new = value + 1
            if new > capacity:
                return None
            charged.append((new, expires_at))
    return charged
