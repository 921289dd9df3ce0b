"""IP networks: a key's ``allowed_ips`` and the middleware's ``trusted_proxies``.

Both are lists of IPv4 and IPv6 addresses or CIDRs (``"203.0.113.0/24"``,
``"2001:db8::/32"``), checked once when they are given, so a request only asks whether an
address is inside one of them.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = ["Network", "contains", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: object, what: str = "allowed IP") -> tuple[Network, ...]:
    """``values`` as networks, or a ``ValueError`` naming the first one that is not.

    A bare address is a network of one (``/32``, ``/128``); host bits are ignored
    (``10.0.0.1/8`` is ``10.0.0.0/8``). A single string is refused: it is almost always a
    list written without its brackets.
    """
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"give a list of {what} addresses or CIDRs, not {values!r}")
    networks: list[Network] = []
    for value in values:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except (TypeError, ValueError):
            raise ValueError(f"invalid {what} {value!r}: give an address or a CIDR") from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def contains(networks: tuple[Network, ...], address: str | None) -> bool:
    """Whether ``address`` (text; IPv4-mapped IPv6 counts as IPv4) is in one of
    ``networks``; an unknown or unparseable address is in none."""
    if address is None:
        return False
    ip = _address(address)
    return ip is not None and any(ip in network for network in networks)
