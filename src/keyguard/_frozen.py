"""Read-only JSON containers, so a record shared between requests cannot be changed.

The memory store and the stores' decode caches hand the same :class:`~keyguard.KeyInfo`
to every request; if its metadata were a plain dict, one handler could grant a key new
permissions for all later requests. These are ``dict``/``list`` subclasses, so equality,
``json.dumps`` and database adapters keep working, but every mutating method raises.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

__all__ = ["FrozenDict", "FrozenList", "freeze", "loads", "thaw"]

_MESSAGE = "key metadata is read-only; APIKeyManager.get_metadata() returns a copy to change"


def _read_only(*args: object, **kwargs: object) -> NoReturn:
    raise TypeError(_MESSAGE)


class FrozenDict(dict[str, Any]):
    """A dict that refuses every change after construction."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return thaw(self)


class FrozenList(list[Any]):
    """A list that refuses every change after construction."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple[type[FrozenList], tuple[list[Any]]]:
        return (FrozenList, (list(self),))

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return thaw(self)


# Values that hold nothing changeable: freezing them is a no-op, so it is skipped.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def freeze(value: Any) -> Any:
    """Return ``value`` (parsed JSON) with every dict and list made read-only.

    Containers that are already read-only are returned as they are, so a record rebuilt
    from another (``dataclasses.replace``) shares its metadata instead of copying it.
    """
    kind = type(value)
    if kind is FrozenDict or kind is FrozenList or kind in _SCALARS:
        return value
    if isinstance(value, dict):
        return FrozenDict({k: v if type(v) in _SCALARS else freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return FrozenList([v if type(v) in _SCALARS else freeze(v) for v in value])
    return value


def _frozen_list(items: list[Any]) -> FrozenList:
    return FrozenList([_frozen_list(v) if type(v) is list else v for v in items])


def _frozen_object(pairs: list[tuple[str, Any]]) -> FrozenDict:
    # Objects nested in this one were already made read-only as they were parsed.
    return FrozenDict([(k, _frozen_list(v) if type(v) is list else v) for k, v in pairs])


_DECODER = json.JSONDecoder(object_pairs_hook=_frozen_object)


def loads(text: str) -> Any:
    """Parse JSON ``text`` straight into read-only containers (no second, freezing pass)."""
    value = _DECODER.decode(text)
    return _frozen_list(value) if type(value) is list else value


def thaw(value: Any) -> Any:
    """Return a plain, mutable deep copy of frozen (or plain) JSON ``value``."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value
