"""djangorestframework-api-key's key form and hash, as keyguard checks imported keys.

drf-api-key (3.x) issues ``<prefix>.<secret>``: 8 then 32 characters drawn from Django's
``get_random_string`` alphabet (ASCII letters and digits, about 190 random bits in all),
by default; a ``KeyGenerator(secret_key_length=...)`` makes longer or shorter secrets,
which the stored hash does not reveal, so any secret of 1 to 128 such characters is
accepted (the model's ``prefix`` column holds at most 8, and a prefix of another length
is skipped at import). drf-api-key stores ``sha512$$<hex>``, the unsalted SHA-512 of the
whole key. Unsalted means keyguard can find an imported key by digest: it keeps the digest
of that stored hash under its own scheme (SHA-256, or HMAC-SHA-256 with the pepper), and a
check hashes a presented key as drf did, then digests that. Older drf-api-key versions
stored salted password hashes (PBKDF2 and the like); those cannot be found by digest and
are not imported.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["KEY_FORM", "PREFIX_FORM", "SCHEME_TAG", "SOURCE", "STORED_HASH", "stored_hash"]

#: The name of the source, as ``accept_imported`` and ``keyguard import --from`` spell it.
SOURCE = "drf-api-key"
#: The form of a key drf-api-key's ``KeyGenerator`` issues, with any secret length.
KEY_FORM = re.compile(r"[A-Za-z0-9]{8}\.[A-Za-z0-9]{1,128}")
PREFIX_FORM = re.compile(r"[A-Za-z0-9]{8}")
#: What drf-api-key 3 stores in ``hashed_key`` (its ``Sha512ApiKeyHasher``).
STORED_HASH = re.compile(r"sha512\$\$[0-9a-f]{128}")
#: Put before the manager's scheme in an imported record's ``hash_scheme``:
#: ``drf-sha512+sha256`` or ``drf-sha512+hmac-sha256:<pepper id>``.
SCHEME_TAG = "drf-sha512+"


def stored_hash(key: str) -> str:
    """What drf-api-key stores for ``key``: ``sha512$$`` and the hex SHA-512 of the key."""
    return "sha512$$" + hashlib.sha512(key.encode("ascii")).hexdigest()
