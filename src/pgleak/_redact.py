"""Passwords never leave the process: pool names and DSNs are redacted before any report.

Handles both forms a PostgreSQL connection string takes: URLs (``postgresql://user:pw@host/db
?sslpassword=...``) and libpq ``key=value`` conninfo (``host=db password='s3 cret'``).
"""

from __future__ import annotations

import re

__all__ = ["redact_dsn"]

_SECRET_KEYS = "password|sslpassword|passfile|sslkey|pass|pwd"
# user:password@ in a URL's authority.
_URL_USERINFO = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/?#@\s]*):(?P<secret>[^@/?#\s]*)@")
# ?password=... or &password=... in a URL's query.
_URL_QUERY = re.compile(rf"(?P<head>[?&](?:{_SECRET_KEYS})=)(?P<secret>[^&#\s]*)", re.IGNORECASE)
# password=value or password='quoted value' in key=value conninfo.
_CONNINFO = re.compile(
    rf"(?P<head>(?:^|\s)(?:{_SECRET_KEYS})\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|[^\s']+)",
    re.IGNORECASE,
)


def redact_dsn(text: str) -> str:
    """``text`` with every password in it replaced by ``***``."""
    text = _URL_USERINFO.sub(r"\g<head>:***@", text)
    text = _URL_QUERY.sub(r"\g<head>***", text)
    return _CONNINFO.sub(r"\g<head>***", text)
