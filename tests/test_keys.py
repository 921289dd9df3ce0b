"""The pure key format: generating, checking the form of, digesting and masking keys."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from keyguard import (
    APIKeyManager,
    KeyFormat,
    RedactingFilter,
    digest_key,
    generate_key,
    is_well_formed,
    mask_key,
)
from keyguard.keys import redact_keys

BODY = "0123456789abcdef" * 2
KEY = "sk_" + BODY
LOWER_HEX_32 = re.compile(r"[0-9a-f]{32}")
ALLOWED_PREFIX_TEXT = "1-20 ASCII letters, digits, '_' or '-'"


# -- generate_key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("sk_", id="sk_"),
        pytest.param("pk_", id="pk_"),
        pytest.param("sk_live_", id="sk_live_"),
        pytest.param("sk-", id="sk-"),
        pytest.param("a", id="one char"),
        pytest.param("A1_b-" * 4, id="20 chars"),
    ],
)
def test_generate_key_is_prefix_plus_32_lowercase_hex(prefix: str) -> None:
    key = generate_key(prefix)

    assert key.startswith(prefix)
    assert LOWER_HEX_32.fullmatch(key[len(prefix) :])
    assert len(key) == len(prefix) + 32
    assert is_well_formed(key, prefix)


def test_generate_key_defaults_to_sk_and_35_chars() -> None:
    key = generate_key()

    assert key.startswith("sk_")
    assert len(key) == 35


def test_generated_keys_are_unique_and_use_every_hex_digit() -> None:
    keys = {generate_key() for _ in range(20_000)}

    assert len(keys) == 20_000
    # Every hex digit turns up in every position: the body is not stuck or biased to a subset.
    for position in range(3, 35):
        assert {key[position] for key in keys} == set("0123456789abcdef")


@pytest.mark.parametrize(
    ("prefix", "error", "message"),
    [
        pytest.param("", ValueError, ALLOWED_PREFIX_TEXT, id="empty"),
        pytest.param("a" * 21, ValueError, ALLOWED_PREFIX_TEXT, id="21 chars"),
        pytest.param("sk live_", ValueError, ALLOWED_PREFIX_TEXT, id="space"),
        pytest.param("sk_ ", ValueError, ALLOWED_PREFIX_TEXT, id="trailing space"),
        pytest.param("sk_\n", ValueError, ALLOWED_PREFIX_TEXT, id="trailing newline"),
        pytest.param("\u0441\u043a_", ValueError, ALLOWED_PREFIX_TEXT, id="non-ASCII"),
        pytest.param("sk_\u0661", ValueError, ALLOWED_PREFIX_TEXT, id="non-ASCII digit"),
        pytest.param("sk/", ValueError, ALLOWED_PREFIX_TEXT, id="slash"),
        pytest.param("sk.", ValueError, ALLOWED_PREFIX_TEXT, id="dot"),
        pytest.param(None, TypeError, "must be a str, not NoneType", id="None"),
        pytest.param(b"sk_", TypeError, "must be a str, not bytes", id="bytes"),
        pytest.param(3, TypeError, "must be a str, not int", id="int"),
    ],
)
def test_bad_prefix_is_refused_saying_what_is_allowed(
    prefix: Any, error: type[Exception], message: str
) -> None:
    uses_of_a_prefix: list[Callable[[Any], object]] = [
        generate_key,
        KeyFormat,
        lambda prefix: is_well_formed(KEY, prefix),
    ]
    for use in uses_of_a_prefix:
        with pytest.raises(error) as exc_info:
            use(prefix)
        assert message in str(exc_info.value)


def test_a_whole_key_given_as_a_prefix_is_not_echoed() -> None:
    key = generate_key()
    with pytest.raises(ValueError) as exc_info:
        APIKeyManager(prefix=key)

    assert key not in str(exc_info.value)
    assert key[3:] not in str(exc_info.value)
    assert mask_key(key) in str(exc_info.value)


# -- the form check ----------------------------------------------------------------------


MALFORMED_KEYS = [
    pytest.param("pk_" + BODY, id="wrong prefix"),
    pytest.param("SK_" + BODY, id="upper-case prefix"),
    pytest.param(BODY, id="no prefix"),
    pytest.param("sk_sk_" + BODY, id="prefix twice"),
    pytest.param("sk_" + BODY[:31], id="31 chars"),
    pytest.param("sk_" + BODY + "0", id="33 chars"),
    pytest.param("sk_", id="prefix only"),
    pytest.param("", id="empty string"),
    pytest.param("sk_" + BODY.upper(), id="upper-case hex"),
    pytest.param("sk_" + BODY[:-1] + "A", id="one upper-case hex char"),
    pytest.param("sk_" + "g" * 32, id="not hex"),
    pytest.param(" " + KEY, id="leading space"),
    pytest.param(KEY + " ", id="trailing space"),
    pytest.param(KEY + "\n", id="trailing newline"),
    pytest.param("\t" + KEY, id="leading tab"),
    pytest.param("Bearer " + KEY, id="scheme in front"),
    pytest.param("sk_" + "a" * 10_000, id="10 kB"),
    pytest.param(KEY * 300, id="10 kB of repeated keys"),
    pytest.param("sk_" + BODY[:-1] + "é", id="non-ASCII letter"),
    pytest.param("sk_" + "\u0663" * 32, id="Arabic-Indic digits"),
    pytest.param("sk_" + "\uff10" * 32, id="full-width digits"),
    pytest.param(KEY[:10] + "\x00" + KEY[11:], id="NUL inside"),
    pytest.param(None, id="None"),
    pytest.param(KEY.encode(), id="bytes"),
    pytest.param(bytearray(KEY.encode()), id="bytearray"),
    pytest.param(12345, id="int"),
    pytest.param(1.5, id="float"),
    pytest.param([KEY], id="list holding a key"),
    pytest.param({"key": KEY}, id="dict holding a key"),
]


def test_well_formed_key_matches() -> None:
    assert is_well_formed(KEY)
    assert KeyFormat().matches(KEY)
    assert KeyFormat("sk_").matches(KEY)


@pytest.mark.parametrize("key", MALFORMED_KEYS)
def test_malformed_key_does_not_match(key: object) -> None:
    assert is_well_formed(key) is False
    assert KeyFormat("sk_").matches(key) is False
    assert KeyFormat("sk_", checksum=True).matches(key) is False


def test_key_format_describes_its_keys() -> None:
    fmt = KeyFormat("sk_live_")
    key = fmt.generate()
    text = f"leaked in a log line: token={key}, and again ({key})."

    assert fmt.length == len(key) == 40
    assert re.findall(fmt.pattern, text) == [key, key]
    assert repr(fmt) == "KeyFormat(prefix='sk_live_', checksum=False)"
    assert fmt == KeyFormat("sk_live_")
    assert fmt != KeyFormat("sk_live_", checksum=True)
    assert fmt != "sk_live_"
    assert len({fmt, KeyFormat("sk_live_"), KeyFormat("sk_test_")}) == 2


def test_prefix_is_matched_literally_not_as_a_regex() -> None:
    fmt = KeyFormat("a-b_")

    assert fmt.matches("a-b_" + BODY)
    assert not fmt.matches("a_b_" + BODY)


# -- checksums ---------------------------------------------------------------------------


def test_checksum_key_matches_its_format() -> None:
    fmt = KeyFormat("sk_", checksum=True)

    for _ in range(100):
        key = fmt.generate()
        assert len(key) == 35
        assert fmt.matches(key)
        assert is_well_formed(key, "sk_", checksum=True)
        assert generate_key("sk_", checksum=True) != key


def test_checksum_rejects_every_one_char_change() -> None:
    fmt = KeyFormat("sk_", checksum=True)
    key = fmt.generate()

    for position in range(len("sk_"), len(key)):
        for char in "0123456789abcdef":
            if char != key[position]:
                changed = key[:position] + char + key[position + 1 :]
                assert not fmt.matches(changed), f"change at {position} went unnoticed"


def test_default_format_has_no_checksum() -> None:
    default = KeyFormat()
    # Fixed bodies whose last 8 hex are not their CRC32: fine without a checksum only.
    plain_keys = ["sk_" + "0" * 32, KEY, "sk_" + "f" * 32]

    assert default.checksum is False
    assert all(default.matches(key) for key in plain_keys)
    assert not any(KeyFormat(checksum=True).matches(key) for key in plain_keys)


# -- mask_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "prefix", "masked"),
    [
        pytest.param(KEY, "sk_", "sk_…cdef", id="own prefix given"),
        pytest.param(KEY, None, "sk_…cdef", id="prefix guessed"),
        pytest.param("sk_live_" + BODY, "sk_live_", "sk_live_…cdef", id="long prefix given"),
        pytest.param("sk_live_" + BODY, None, "sk_live_…cdef", id="long prefix guessed"),
        pytest.param("sk-" + BODY, None, "sk-…cdef", id="dash prefix guessed"),
        pytest.param("pk_" + BODY, "sk_", "pk_…cdef", id="other prefix than given"),
        pytest.param(BODY, None, "…cdef", id="no prefix"),
        pytest.param("sk_" + BODY.upper(), None, "…CDEF", id="upper-case body: not a key's shape"),
        pytest.param("sk_short", None, "…", id="too short to show anything"),
        pytest.param("", None, "…", id="empty"),
        pytest.param(KEY + "\n", None, "…", id="control char"),
        pytest.param("sk_" + BODY[:-1] + "é", None, "…", id="non-ASCII"),
        pytest.param(None, None, "…", id="None"),
        pytest.param(KEY.encode(), None, "…", id="bytes"),
        pytest.param(
            "abcdefghijklmnopqr-stuvwxyz0123456789", None, "…6789", id="dash late in a secret"
        ),
        pytest.param(
            "ab3xk_9QzL01mn-pR7wq_vU2yT8eK5dG", None, "…K5dG", id="prefix-like head of a secret"
        ),
        pytest.param("x" * 40 + "_" + BODY, None, "…cdef", id="head longer than a prefix"),
        pytest.param("my-super_secret_value_xx", None, "…e_xx", id="word-like secret"),
    ],
)
def test_mask_key(key: object, prefix: str | None, masked: str) -> None:
    assert mask_key(key, prefix) == masked


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(generate_key(), id="sk_ key"),
        pytest.param(generate_key("sk_live_"), id="sk_live_ key"),
        pytest.param(secrets.token_hex(32), id="bare hex secret"),
        pytest.param(secrets.token_urlsafe(32), id="url-safe secret"),
        pytest.param("-_" * 30, id="all separators"),
        pytest.param("a-b_c-d_e-f_g-h_i-j_k-l_m-n_o-p_q-r_s", id="many short segments"),
        pytest.param("ghp_" + "A1b2C3d4" * 5, id="foreign token"),
    ],
)
def test_mask_key_shows_at_most_a_prefix_and_the_last_4_chars(secret: str) -> None:
    head, sep, tail = mask_key(secret).partition("…")

    assert sep == "…"
    assert len(tail) <= 4
    assert secret.endswith(tail)
    # Whatever is shown in front is a key prefix (letters/digits ending in '_' or '-').
    assert secret.startswith(head)
    assert len(head) <= 20
    assert head == "" or head[-1] in "_-"
    assert len(secret) - len(head) - len(tail) >= 24


# -- digest_key --------------------------------------------------------------------------


def test_digest_is_sha256_of_the_whole_key() -> None:
    digest = digest_key(KEY)

    assert digest == hashlib.sha256(KEY.encode()).hexdigest()
    assert digest == digest_key(KEY)
    assert re.fullmatch("[0-9a-f]{64}", digest)


def test_peppered_digest_is_hmac_sha256() -> None:
    pepper = b"p" * 32

    digest = digest_key(KEY, pepper)

    assert digest == hmac.new(pepper, KEY.encode(), hashlib.sha256).hexdigest()
    assert digest == digest_key(KEY, pepper)
    assert digest != digest_key(KEY)
    assert digest != digest_key(KEY, b"q" * 32)


def test_different_keys_have_different_digests() -> None:
    keys = [generate_key() for _ in range(1000)]

    assert len({digest_key(key) for key in keys}) == 1000
    assert digest_key(KEY) != digest_key(KEY[:-1] + "e")


@pytest.mark.parametrize(
    ("template", "masked"),
    [
        pytest.param("{key}", "sk_…{last4}", id="alone"),
        pytest.param("{key!r}", "'sk_…{last4}'", id="quoted"),
        pytest.param("{key}\x00", "sk_…{last4}\x00", id="trailing NUL"),
        pytest.param("{key}é", "sk_…{last4}é", id="trailing e-acute"),
        pytest.param("\x1b[2J{key}", "\x1b[2Jsk_…{last4}", id="leading escape"),
        pytest.param("Bearer {key}, x", "Bearer sk_…{last4}, x", id="in a header"),
        pytest.param("x{key}y", "xsk_…{last4}y", id="inside a word"),
    ],
)
def test_redact_keys_masks_a_key_wherever_it_stands(template: str, masked: str) -> None:
    key = generate_key()
    text = template.format(key=key)

    assert redact_keys(text) == masked.format(last4=key[-4:])


def test_redact_keys_masks_long_hex_and_keeps_short_hex() -> None:
    digest = digest_key(generate_key())

    assert redact_keys(f"digest {digest}") == f"digest …{digest[-4:]}"
    assert redact_keys("key_0123456789abcdef") == "key_0123456789abcdef"


def test_the_redacting_filter_masks_messages_tracebacks_and_stacks() -> None:
    key = generate_key()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("tests.redaction")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("request with %s", key)
        try:
            raise ValueError(f"bad key {key!r}")
        except ValueError:
            log.exception("failed")
        log.warning("here", stack_info=True, extra={"k": key})
    finally:
        log.removeHandler(handler)

    out = stream.getvalue()
    assert key not in out
    assert key[3:] not in out
    assert f"request with sk_…{key[-4:]}" in out
    assert f"ValueError: bad key 'sk_…{key[-4:]}'" in out


def test_keyguards_logger_masks_keys_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    key = generate_key()
    logging.getLogger("keyguard").warning("saw %s", key)

    assert caplog.records[-1].getMessage() == f"saw sk_…{key[-4:]}"
