"""``redact_url``: hide passwords in store URLs and DSNs quoted by messages and reprs.

Its own module so that the stores and ``store_from_url`` (which imports the stores) can
both use it without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# The userinfo of a URL runs to the last '@' before the path, so a password holding an
# (unencoded) '@' or a space is masked whole.
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):[^/?#]*@")
# A password as a key=value pair (libpq's "host=… password=…") or a query parameter
# ("?password=…", "&sslpassword=…"), its value quoted or not.
_PASSWORD_PARAMETER = re.compile(
    r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]+)", re.IGNORECASE
)


def redact_url(text: str) -> str:
    """``text`` with the password of every URL or DSN in it replaced by ``***``.

    Works on malformed URLs, on ``key=value`` DSNs and on driver error messages that quote
    either, where ``urlsplit`` would give up. It may mask more than the password, never less.
    """
    return _PASSWORD_PARAMETER.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))
