"""The key commands: ``create``, ``list``, ``show``, ``revoke``, ``rotate``, ``update``,
``credits`` and ``verify``.

Each takes the :class:`Session` and returns the exit code; a failure is a :class:`CLIError`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

from ..exceptions import InvalidKeyError, KeyguardError, StoreError
from ..keys import DEFAULT_PREFIX
from ..records import KeyInfo
from ._output import (
    format_time,
    key_info_json,
    key_table,
    print_json,
    print_json_list,
    print_new_key,
    printable,
    terminal_width,
)
from ._session import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    Session,
    key_format,
    read_key,
    resolve,
)

__all__ = [
    "cmd_create",
    "cmd_credits",
    "cmd_list",
    "cmd_revoke",
    "cmd_rotate",
    "cmd_show",
    "cmd_update",
    "cmd_verify",
]

# Keys read from the store, and table rows sized, at a time.
_PAGE = 1000
_RESERVED_META = {
    "user_id": "--user",
    "email": "--email",
    "permissions": "--scope",
    "name": "--name",
    "rate_limits": "--rate-limit",
    "quota": "--quota",
    "allowed_ips": "--allowed-ip",
    "family_id": "rotate",
    "rotated_from": "rotate",
    "replaced_by": "rotate",
    "deprecated_at": "rotate",
}


def cmd_create(session: Session) -> int:
    args = session.args
    metadata: dict[str, Any] = {"user_id": args.user}
    for name, value in args.meta or ():
        if name in _RESERVED_META:
            raise CLIError(f"use {_RESERVED_META[name]} to set {name!r}, not --meta", EXIT_USAGE)
        metadata[name] = value
    if args.email is not None:
        metadata["email"] = args.email
    if args.name is not None:
        metadata["name"] = args.name
    if args.scope:
        metadata["permissions"] = list(dict.fromkeys(args.scope))
    if args.rate_limit:
        metadata["rate_limits"] = args.rate_limit
    if args.quota is not None:
        metadata["quota"] = args.quota
    if args.allowed_ip:
        metadata["allowed_ips"] = args.allowed_ip
    manager = session.manager(args.prefix or DEFAULT_PREFIX, create=True)
    try:
        key, info = manager.create_key(metadata, expires_in=args.expires, actor=session.actor)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if args.json:
        print_json({"key": key, **key_info_json(info, session.now)})
        return EXIT_OK
    expiry = (
        "never expires" if info.expires_at is None else f"expires {format_time(info.expires_at)}"
    )
    print(f"Created {info.key_id} for user {printable(info.user_id)!r} ({expiry}).")
    print_new_key(key)
    return EXIT_OK


def cmd_list(session: Session) -> int:
    """List keys a page at a time, so memory stays flat however many keys there are."""
    args = session.args
    manager = session.manager()
    if args.family is not None:
        if args.expiring is not None or args.user is not None:
            raise CLIError(
                "--family lists one key's generations; drop --user and --expiring", EXIT_USAGE
            )
        _, info = resolve(session, args.family)
        keys = iter(manager.lineage(info.key_id))
    elif args.expiring is not None:
        if args.all:
            raise CLIError("--expiring lists active keys only; drop --all", EXIT_USAGE)
        keys = manager.expiring(args.expiring, args.user)
    else:
        keys = manager.iter_keys(args.user, include_inactive=args.all, page_size=_PAGE)
    if args.json:
        print_json_list("keys", (key_info_json(k, session.now) for k in keys))
        return EXIT_OK
    pages = _pages(keys)
    first = next(pages, None)
    if first is None:
        if args.expiring is not None:
            print("No active key expires within that time.")
        else:
            print("No keys." if args.all else "No active keys (--all shows revoked and expired).")
        return EXIT_OK
    for line in key_table(itertools.chain([first], pages), session.now, terminal_width()):
        print(line)
    return EXIT_OK


def _pages(keys: Iterator[KeyInfo]) -> Iterator[list[KeyInfo]]:
    while page := list(itertools.islice(keys, _PAGE)):
        yield page


def cmd_show(session: Session) -> int:
    manager, info = resolve(session, session.args.ref)
    now = session.now
    remaining = manager.remaining(info.key_id)
    if session.args.json:
        print_json({**key_info_json(info, now), "remaining": remaining})
        return EXIT_OK
    quota = "-" if info.quota is None else f"{info.quota} ({remaining} left)"
    extra = {k: v for k, v in info.metadata.items() if k not in _RESERVED_META}
    fields = [
        ("key_id", info.key_id),
        ("hint", info.hint),
        ("user", info.user_id),
        ("email", info.metadata.get("email") or "-"),
        ("name", info.metadata.get("name") or "-"),
        ("scopes", ", ".join(info.scopes) or "-"),
        ("limits", ", ".join(map(str, info.rate_limits)) or "-"),
        ("quota", quota),
        ("networks", ", ".join(map(str, info.allowed_ips)) or "any"),
        ("metadata", json.dumps(extra, ensure_ascii=False) if extra else "-"),
        ("created", format_time(info.created_at)),
        ("expires", format_time(info.expires_at)),
        ("revoked", format_time(info.revoked_at, "-")),
        ("last used", format_time(info.last_used_at)),
        ("status", info.status(now)),
        ("hashed as", info.hash_scheme),
    ]
    # A rotation's lineage: the key this one replaced, and the key that replaced it.
    if info.rotated_from:
        fields.append(("previous", info.rotated_from))
    if info.replaced_by:
        fields.append(("successor", info.replaced_by))
    for label, value in fields:
        print(f"{label:<10} {printable(str(value))}")
    return EXIT_OK


def cmd_revoke(session: Session) -> int:
    manager, info = resolve(session, session.args.ref)
    status = info.status(session.now)
    revoked = status == "active" and manager.revoke_by_id(info.key_id, actor=session.actor)
    if not revoked:
        if status == "active":
            status = "revoked"  # lost a race with another revoker
        raise CLIError(f"{info.key_id} ({info.hint}) is already {status}; nothing to revoke")
    if session.args.json:
        print_json({"revoked": True, "key_id": info.key_id, "hint": info.hint})
    else:
        print(f"Revoked {info.key_id} ({info.hint}) of user {printable(info.user_id)!r}.")
    return EXIT_OK


def cmd_rotate(session: Session) -> int:
    args = session.args
    manager, old = resolve(session, args.ref)
    try:
        key = manager.rotate_by_id(
            old.key_id, grace=args.grace, expires_in=args.expires, actor=session.actor
        )
    except InvalidKeyError as e:
        raise CLIError(f"cannot rotate {old.key_id} ({old.hint}): it is {e.reason}") from None
    except StoreError:
        raise
    except KeyguardError as e:  # already rotated, or changed during the rotation
        raise CLIError(str(e)) from None
    new = manager.store.get(manager.digest(key))
    after = manager.get_key_info(old.key_id)
    if new is None or after is None:
        raise CLIError("the store lost a key during rotation", EXIT_USAGE)
    if args.json:
        print_json(
            {
                "key": key,
                **key_info_json(new, session.now),
                "old": key_info_json(after, session.now),
            }
        )
        return EXIT_OK
    print(f"Rotated {old.key_id} into {new.key_id} for user {printable(new.user_id)!r}.")
    if after.revoked_at is not None:
        print(f"The old key {old.hint} is revoked.")
    else:
        print(f"The old key {old.hint} keeps working until {format_time(after.expires_at)}.")
    print_new_key(key)
    return EXIT_OK


def cmd_credits(session: Session) -> int:
    manager, info = resolve(session, session.args.ref)
    credits: int = session.args.credits
    try:
        left = manager.add_credits(info.key_id, credits, actor=session.actor)
    except ValueError as e:  # the key has no quota
        raise CLIError(str(e)) from None
    if session.args.json:
        print_json({"key_id": info.key_id, "added": credits, "remaining": left})
    else:
        print(f"Added {credits} credits to {info.key_id}; {left} left.")
    return EXIT_OK


def cmd_update(session: Session) -> int:
    args = session.args
    manager, old = resolve(session, args.ref)
    metadata: dict[str, Any] = {}
    for name, value in args.meta or ():
        if name in _RESERVED_META:
            raise CLIError(f"use {_RESERVED_META[name]} to set {name!r}, not --meta", EXIT_USAGE)
        metadata[name] = value
    for name in args.unset_meta or ():
        if name in _RESERVED_META:
            raise CLIError(f"{name!r} cannot be removed with --unset-meta", EXIT_USAGE)
        metadata[name] = None
    if args.email is not None:
        metadata["email"] = args.email or None
    changes: dict[str, Any] = {}
    if args.scope or args.no_scopes:
        changes["scopes"] = list(dict.fromkeys(args.scope or ()))
    if args.name is not None:
        changes["name"] = args.name
    if args.expires is not None:
        changes["expires_in"] = args.expires
    elif args.no_expiry:
        changes["expires_at"] = None
    if args.rate_limit or args.no_rate_limits:
        changes["rate_limits"] = args.rate_limit or None
    if args.quota is not None or args.no_quota:
        changes["quota"] = args.quota
    if args.allowed_ip or args.any_ip:
        changes["allowed_ips"] = args.allowed_ip or None
    try:
        new = manager.update_key(
            old.key_id,
            metadata=metadata or None,
            allow_widen=args.allow_widen,
            actor=session.actor,
            **changes,
        )
    except InvalidKeyError as e:
        raise CLIError(f"cannot update {old.key_id} ({old.hint}): it is {e.reason}") from None
    except StoreError:
        raise
    except KeyguardError as e:  # changed by others throughout
        raise CLIError(str(e)) from None
    except PermissionError as e:
        raise CLIError(str(e).replace("allow_widen=True", "--allow-widen")) from None
    except (ValueError, TypeError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if args.json:
        print_json(key_info_json(new, session.now))
    elif new is old:
        print(f"Nothing changed: {old.key_id} ({old.hint}) already has these values.")
    else:
        print(f"Updated {new.key_id} ({new.hint}); the key itself is unchanged.")
    return EXIT_OK


def cmd_verify(session: Session) -> int:
    args = session.args
    key = read_key(args.key)
    fmt = key_format(key)
    manager = session.manager(fmt.prefix if fmt else DEFAULT_PREFIX)
    result = manager.verify(key)
    if args.json:
        info = None if result.key is None else key_info_json(result.key, session.now)
        print_json({"ok": result.ok, "reason": result.reason.value, "key": info})
    elif result.key is None:
        print(result.reason.value)
    else:
        user = printable(result.key.user_id)
        print(f"{result.reason.value}: {result.key.key_id} ({result.key.hint}) of user {user!r}")
    return EXIT_OK if result.ok else EXIT_INVALID
