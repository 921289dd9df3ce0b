"""Per-key rate limits and quotas: how they are written, and how a request is charged.

A **rate limit** (``"10/second"``, ``"1000/hour"``) is enforced with GCRA, the generic cell
rate algorithm: each key family has a "theoretical arrival time" per limit, pushed forward
by ``period / count`` on every admitted request. It behaves like a token bucket that holds
``count`` tokens and refills one every ``period / count`` seconds, continuously: there is
no window edge at which a client can send ``2 * count`` requests, and a client that keeps
to the rate is never refused. A burst of ``count`` requests is allowed at once, after which
requests are admitted one per ``period / count``.

A **quota** (``"10000/month"`` or ``500``) is a number of uses: refilled at the start of each
calendar period (UTC) or, as a plain number, never refilled. Operators can add credits.

Both are counted per key *family* (a key and every key rotated from it), in buckets that a
:class:`~keyguard.stores.CounterStore` charges atomically, all or nothing: only admitted
requests are charged, and a request refused by one limit uses nothing of the others. The
per-address :class:`FailureThrottle` against key guessing is the same algorithm, kept
here with the others (the module is a little over the house size for it).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ._counting import EPSILON, Bucket
from .keys import redact_keys

if TYPE_CHECKING:
    from .records import KeyInfo
    from .stores.base import AsyncCounterStore, CounterStore

__all__ = ["FailureThrottle", "Limiter", "Quota", "Rate", "Usage", "parse_quota", "parse_rates"]

#: Seconds in each unit a rate limit may use.
RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
#: Calendar periods (UTC) a quota may be refilled on.
QUOTA_PERIODS = ("hour", "day", "month")
#: The most a count may be, so that every store keeps it exactly (a double holds 2**53).
MAX_COUNT = 10**12
MAX_RATES = 8
#: The shortest spacing a rate may set (1000 per second). Arrival times are POSIX seconds
#: as doubles, which step by 2.4e-7 s today: a millisecond spacing keeps the rounding of
#: each step under 0.03 %, where a microsecond one would lose a quarter of it.
MIN_INTERVAL = 0.001

_RATE_RE = re.compile(r"\s*([0-9]{1,13})\s*/\s*([a-z]+?)s?\s*")
_QUOTA_RE = re.compile(r"\s*([0-9]{1,13})\s*(?:/\s*([a-z]+?)s?)?\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` requests per ``unit`` (``second``, ``minute``, ``hour``, ``day``)."""

    count: int
    unit: str
    #: The unit in seconds.
    period: float = field(init=False, repr=False, compare=False)
    #: Seconds between two requests at the steady rate.
    interval: float = field(init=False, repr=False, compare=False)
    #: How the limit is written (``"10/second"``), which also names its counter.
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        period = float(RATE_UNITS[self.unit])
        if period / self.count < MIN_INTERVAL:
            raise ValueError(
                f"invalid rate limit '{self.count}/{self.unit}': at most 1000 requests per"
                f" second ({int(period / MIN_INTERVAL)}/{self.unit})"
            )
        object.__setattr__(self, "period", period)
        object.__setattr__(self, "interval", period / self.count)
        object.__setattr__(self, "text", f"{self.count}/{self.unit}")

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Quota:
    """``count`` uses, refilled each calendar ``period`` (UTC), or never if it is None."""

    count: int
    period: str | None = None

    def __str__(self) -> str:
        return str(self.count) if self.period is None else f"{self.count}/{self.period}"

    def window(self, now: float) -> tuple[str, float | None, float | None]:
        """The current period's label, start and end (POSIX); the start and end are None
        for a quota that is never refilled."""
        if self.period is None:
            return "total", None, None
        t = datetime.fromtimestamp(now, timezone.utc)
        if self.period == "hour":
            start = t.replace(minute=0, second=0, microsecond=0)
            label = f"{start:%Y-%m-%dT%H}"
            end = start.timestamp() + 3600
        elif self.period == "day":
            start = t.replace(hour=0, minute=0, second=0, microsecond=0)
            label = f"{start:%Y-%m-%d}"
            end = start.timestamp() + 86400
        else:
            start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            label = f"{start:%Y-%m}"
            year, month = divmod(start.year * 12 + start.month, 12)
            end = start.replace(year=year, month=month + 1).timestamp()
        return label, start.timestamp(), end


def _shown(value: object) -> str:
    """``repr(value)`` for an error message, with anything key-shaped masked: a key pasted
    into the wrong field must not end up in a log."""
    return redact_keys(repr(value))


def _count(text: str, value: str) -> int:
    count = int(value)
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"invalid limit {_shown(text)}: the count must be from 1 to {MAX_COUNT}")
    return count


@functools.lru_cache(maxsize=1024)
def _parse_rate(text: str) -> Rate:
    match = _RATE_RE.fullmatch(text.lower())
    if match is None or match[2] not in RATE_UNITS:
        raise ValueError(
            f"invalid rate limit {_shown(text)}: write N/second, N/minute, N/hour or N/day"
        )
    return Rate(_count(text, match[1]), match[2])


def parse_rates(values: object) -> tuple[Rate, ...]:
    """``["10/second", "1000/hour"]`` as :class:`Rate` values, or a one-line ``ValueError``.

    A single string is one limit; repeats are dropped. Every limit is enforced.
    """
    if isinstance(values, (str, Rate)):
        values = [values]
    if not isinstance(values, Iterable):
        raise TypeError(
            f"rate limits must be a list of strings like '10/second', not {_shown(values)}"
        )
    rates: list[Rate] = []
    for value in values:
        if isinstance(value, Rate):
            rate = value
        elif isinstance(value, str):
            rate = _parse_rate(value)
        else:
            raise TypeError(f"a rate limit must be a string like '10/second', not {_shown(value)}")
        if rate not in rates:
            rates.append(rate)
    if len(rates) > MAX_RATES:
        raise ValueError(f"at most {MAX_RATES} rate limits per key, got {len(rates)}")
    return tuple(rates)


def parse_quota(value: object) -> Quota:
    """``"10000/month"`` or ``500`` as a :class:`Quota`, or a one-line ``ValueError``."""
    if isinstance(value, Quota):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Quota(_count(str(value), str(value)))
    if not isinstance(value, str):
        raise TypeError(
            f"a quota must be a number or a string like '10000/month', not {_shown(value)}"
        )
    match = _QUOTA_RE.fullmatch(value.lower())
    if match is None or (match[2] is not None and match[2] not in QUOTA_PERIODS):
        raise ValueError(f"invalid quota {_shown(value)}: write N, N/hour, N/day or N/month")
    return Quota(_count(value, match[1]), match[2])


class Usage:
    """The outcome of charging a request: admitted or not, and the headers to send.

    ``code`` is ``rate_limited`` or ``quota_exceeded`` when the request is refused, and
    ``retry_after`` the whole seconds (at least 1) until it could succeed (None when a quota
    is never refilled). ``headers`` are the ``RateLimit-Policy`` and ``RateLimit`` fields
    of draft-ietf-httpapi-ratelimit-headers-11, sent with every response for the key.
    """

    __slots__ = ("allowed", "charged", "code", "headers", "retry_after")

    def __init__(
        self,
        allowed: bool,
        headers: tuple[tuple[str, str], ...],
        code: str | None = None,
        retry_after: int | None = None,
        charged: tuple[Bucket, ...] = (),
    ) -> None:
        self.allowed = allowed
        self.headers = headers
        self.code = code
        self.retry_after = retry_after
        #: The buckets the request was charged to (none if it was refused), for a refund.
        self.charged = charged

    def __repr__(self) -> str:
        return f"Usage(allowed={self.allowed}, code={self.code!r}, retry_after={self.retry_after})"


def _refunds(charged: Sequence[Bucket], now: float) -> list[tuple[Bucket, float]]:
    """Each charged bucket with the amount that undoes one charge: a rate bucket's arrival
    time moves back one interval (and may be forgotten once full), a count goes down one."""
    return [
        (b._replace(expires_at=now + b.capacity), -b.interval) if b.interval > 0 else (b, -1.0)
        for b in charged
    ]


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds - EPSILON))


#: Plans kept per limiter; past this many keys the cache starts afresh.
_PLAN_LIMIT = 100_000


class Plan:
    """What requests with one key are charged to while a quota period lasts (the whole
    time for a key without a refilled quota), and how their outcome is written.

    Made once per record and period, so that a request only reads its counters and
    formats two numbers per limit: the buckets (one per rate, then the quota's), the
    ``RateLimit-Policy`` field, and for each rate its ``RateLimit`` item prefix, period
    and interval. A new plan replaces it, whole, when the record changes or a period starts.
    """

    __slots__ = (
        "buckets",
        "default_rates",
        "end",
        "info",
        "policy",
        "quota",
        "rates",
        "start",
        "steps",
    )

    def __init__(self, info: KeyInfo, default_rates: tuple[Rate, ...], now: float) -> None:
        self.info = info
        self.default_rates = default_rates
        self.rates = rates = info.rate_limits or default_rates
        self.quota = quota = info.quota
        family = info.family_id
        buckets = [Bucket(f"rate:{family}:{r.text}", r.interval, r.period, None) for r in rates]
        self.start, self.end = -math.inf, math.inf
        window = ""
        if quota is not None:
            label, first, last = quota.window(now)
            # Named by family and period, not by the count: an updated quota keeps what
            # the period has used (and any credits added).
            name = f"quota:{family}:{label}"
            if first is None or last is None:
                buckets.append(Bucket(name, 0.0, quota.count, None))
            else:
                # A used-up period is kept a day past its end, then forgotten.
                buckets.append(Bucket(name, 0.0, quota.count, last + 86400))
                self.start, self.end = first, last
                window = f";w={round(last - first)}"
        self.buckets = tuple(buckets)
        items = [f'"{r.text}";q={r.count};w={int(r.period)}' for r in rates]
        if quota is not None:
            items.append(f'"quota";q={quota.count}{window}')
        #: The ``RateLimit-Policy`` field, the same for every response in the period.
        self.policy = ("ratelimit-policy", ", ".join(items))
        self.steps = tuple((f'"{r.text}";r=', r.period, r.interval) for r in rates)

    def usage(self, taken: bool, values: Sequence[float], now: float) -> Usage:
        """The outcome and headers for counter ``values`` of the buckets (after the
        charge, if ``taken``)."""
        items = []
        # enumerate, not zip(strict=False): on CPython 3.11 zip's keyword is not cheap.
        for i, (prefix, span, interval) in enumerate(self.steps):
            tat = values[i]
            ahead = tat - now if tat > now else 0.0
            left = int((span - ahead) / interval + EPSILON)
            items.append(f"{prefix}{left if left > 0 else 0};t={math.ceil(ahead - EPSILON)}")
        quota = self.quota
        if quota is not None:
            left = max(int(quota.count - values[-1]), 0)
            if self.end == math.inf:
                items.append(f'"quota";r={left}')
            else:
                items.append(f'"quota";r={left};t={_whole_seconds(self.end - now)}')
        headers = (self.policy, ("ratelimit", ", ".join(items)))
        if taken:
            return Usage(True, headers, None, None, self.buckets)
        return self._refusal(values, now, headers)

    def _refusal(
        self, values: Sequence[float], now: float, headers: tuple[tuple[str, str], ...]
    ) -> Usage:
        """The refusal for counter ``values`` that had no room: the quota's if it is used
        up, else the rates' with the longest wait."""
        quota = self.quota
        if quota is not None and values[-1] + 1 > quota.count:
            refill = None if self.end == math.inf else _whole_seconds(self.end - now)
            return Usage(False, headers, "quota_exceeded", refill)
        retry = 0.0
        for i, rate in enumerate(self.rates):
            tat = values[i]
            ahead = tat - now if tat > now else 0.0
            if ahead + rate.interval > rate.period + EPSILON:
                retry = max(retry, ahead + rate.interval - rate.period)
        return Usage(False, headers, "rate_limited", _whole_seconds(retry))


class Limiter:
    """Charges admitted requests to their key family's rate limits and quota.

    :param counters: where the counters live (shared by every worker using the store).

    ``default_rates`` (a middleware's ``rate_limits``) apply to keys without their own.
    """

    def __init__(self, counters: CounterStore) -> None:
        self.counters = counters
        self._plans: dict[str, Plan] = {}

    def plan(self, info: KeyInfo, now: float, default_rates: tuple[Rate, ...] = ()) -> Plan:
        """What a request with ``info`` at ``now`` is charged to: the key's plan, made once
        and reused while the record and the quota period are the same."""
        plan = self._plans.get(info.key_id)
        if (
            plan is None
            or plan.info is not info
            or plan.default_rates is not default_rates
            or not plan.start <= now < plan.end
        ):
            if len(self._plans) >= _PLAN_LIMIT:
                self._plans = {}
            # Threads that race at a period's edge each make a whole plan.
            plan = self._plans[info.key_id] = Plan(info, default_rates, now)
        return plan

    def take(self, info: KeyInfo, now: float, default_rates: tuple[Rate, ...] = ()) -> Usage:
        """Charge one request with ``info`` at ``now``; a failing store raises StoreError."""
        plan = self.plan(info, now, default_rates)
        taken, values = self.counters.consume(plan.buckets, now)
        return plan.usage(taken, values, now)

    async def atake(
        self,
        info: KeyInfo,
        now: float,
        counters: AsyncCounterStore,
        default_rates: tuple[Rate, ...] = (),
    ) -> Usage:
        """:meth:`take` through the counter store's async twin."""
        plan = self.plan(info, now, default_rates)
        taken, values = await counters.aconsume(plan.buckets, now)
        return plan.usage(taken, values, now)

    def headers(
        self, info: KeyInfo, now: float, default_rates: tuple[Rate, ...] = ()
    ) -> tuple[tuple[str, str], ...]:
        """The RateLimit fields of ``info`` as they stand, charging nothing (for refusals)."""
        plan = self.plan(info, now, default_rates)
        values = self.counters.peek([b.name for b in plan.buckets])
        return plan.usage(True, values, now).headers

    async def aheaders(
        self,
        info: KeyInfo,
        now: float,
        counters: AsyncCounterStore,
        default_rates: tuple[Rate, ...] = (),
    ) -> tuple[tuple[str, str], ...]:
        """:meth:`headers` through the counter store's async twin."""
        plan = self.plan(info, now, default_rates)
        values = await counters.apeek([b.name for b in plan.buckets])
        return plan.usage(True, values, now).headers

    def refund(self, charged: Sequence[Bucket], now: float) -> None:
        """Give back one charge of ``charged`` (a request a route refused after admission)."""
        for bucket, delta in _refunds(charged, now):
            self.counters.adjust(bucket, delta)

    async def arefund(
        self, charged: Sequence[Bucket], now: float, counters: AsyncCounterStore
    ) -> None:
        """:meth:`refund` through the counter store's async twin."""
        for bucket, delta in _refunds(charged, now):
            await counters.aadjust(bucket, delta)

    def remaining(self, info: KeyInfo, now: float) -> int | None:
        """The credits left in the key family's quota now, or None if it has no quota."""
        quota = info.quota
        if quota is None:
            return None
        bucket = self.plan(info, now).buckets[-1]
        (used,) = self.counters.peek([bucket.name])
        return max(int(quota.count - used), 0)

    def add_credits(self, info: KeyInfo, credits: int, now: float) -> int:
        """Add ``credits`` to the current period of the family's quota; return what is left.

        Credits given to a refilled quota last until the period's refill.
        """
        quota = info.quota
        if quota is None:
            raise ValueError(f"key {info.key_id} has no quota to add credits to")
        bucket = self.plan(info, now).buckets[-1]
        used = self.counters.adjust(bucket, -float(credits))
        return max(int(quota.count - used), 0)


@functools.lru_cache(maxsize=4096)
def throttled_source(address: str) -> str:
    """What the failure budget is kept for: the address, an IPv6 address's /64 (one host
    holds a whole /64), or the IPv4 address inside an IPv4-mapped IPv6 one."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


class FailureThrottle:
    """Failed key checks per client address, counted in this process (GCRA, like a rate).

    An address that has failed ``rate.count`` checks in a burst is refused (429
    ``too_many_failures``) before any store lookup, then allowed one more failure every
    ``rate.interval`` seconds. Counting in the process keeps a flood of invented keys off
    the shared store; with N workers an address gets up to N times the budget. IPv6
    addresses are counted by /64. At most ``max_addresses`` are tracked: when full,
    addresses whose budget is whole again are forgotten, then those not throttled; a
    throttled address is never forgotten before its wait is over, so a flood of new
    addresses cannot free one (while every tracked address is throttled, new ones go
    untracked).
    """

    def __init__(self, rate: Rate, max_addresses: int = 100_000) -> None:
        self.rate = rate
        self.max_addresses = max_addresses
        self._tats: dict[str, float] = {}
        self._lock = threading.Lock()
        # A tracked address is throttled while its TAT is more than this ahead of now.
        self._allowance = rate.period - rate.interval

    def retry_after(self, address: str, now: float) -> int:
        """Seconds until ``address`` may fail a check again; 0 if it is not throttled."""
        if not self._tats:
            return 0  # no failures: the usual case costs no address parsing
        tat = self._tats.get(throttled_source(address))
        if tat is None:
            return 0
        wait = tat - now - self._allowance
        return _whole_seconds(wait) if wait > EPSILON else 0

    def failed(self, address: str, now: float) -> None:
        """Count one failed check from ``address`` at ``now``."""
        source = throttled_source(address)
        with self._lock:
            tats = self._tats
            if source not in tats and len(tats) >= self.max_addresses:
                tats = self._make_room(now)
                if len(tats) >= self.max_addresses:
                    return
            tat = tats.get(source, now)
            tats[source] = (tat if tat > now else now) + self.rate.interval

    def _make_room(self, now: float) -> dict[str, float]:
        """Forget whole budgets, then budgets not throttled; keep throttled addresses."""
        tats = {a: t for a, t in self._tats.items() if t > now}
        if len(tats) >= self.max_addresses:
            limit = now + self._allowance + EPSILON
            tats = {a: t for a, t in tats.items() if t > limit}
        self._tats = tats
        return tats
