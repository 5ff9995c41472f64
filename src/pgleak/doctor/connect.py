"""Where the doctor connects, and what it says when it cannot.

A failed connection is the doctor's most important answer during an incident: "too many
clients" (53300) means the server is full, and a superuser can still get in through the
reserved slots. Every message here is one line, with the password redacted; nothing raises past
:func:`connect` but :class:`DoctorError`.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping
from typing import Any

from pgleak._redact import redact_dsn

__all__ = ["APPLICATION_NAME", "DoctorError", "connect", "resolve_dsn"]

#: How the doctor's own backend shows in ``pg_stat_activity``.
APPLICATION_NAME = "pgleak-doctor"

# postgresql+psycopg://, postgres+asyncpg:// (SQLAlchemy URLs): libpq knows only the scheme.
_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[A-Za-z0-9_]+://")


class DoctorError(Exception):
    """Cannot connect or bad input: the CLI prints the message and exits 2."""


def resolve_dsn(dsn: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The conninfo to use: the argument, else ``$DATABASE_URL``, else ``""`` (libpq's
    ``PGHOST``/``PGPORT``/``PGUSER``/... environment and defaults)."""
    env = os.environ if environ is None else environ
    chosen = dsn if dsn is not None else env.get("DATABASE_URL", "")
    return _DRIVER_SUFFIX.sub(r"\1://", chosen.strip())


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise DoctorError(
            "pgleak doctor needs psycopg 3: pip install 'pgleak[doctor]' (or 'psycopg[binary]')"
        ) from None
    return psycopg


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _os_user() -> str:
    """libpq's default user name: the operating system's."""
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container): libpq would fail the same way
        return ""


def describe_target(dsn: str) -> str:
    """``user@host:port/dbname`` as libpq will resolve it (from the DSN and the environment)."""
    psycopg = _psycopg()
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise DoctorError(f"invalid connection string: {redact_dsn(_one_line(str(exc)))}") from None
    host = info.get("host") or os.environ.get("PGHOST") or "localhost"
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    user = info.get("user") or os.environ.get("PGUSER") or _os_user()
    dbname = info.get("dbname") or os.environ.get("PGDATABASE") or user
    return redact_dsn(f"{user + '@' if user else ''}{host}:{port}/{dbname}")


def _explain(message: str) -> str:
    """What a connection failure means for someone diagnosing a full server."""
    lowered = message.lower()
    if "too many clients already" in lowered:
        return (
            "the server is full (53300 too many clients): every max_connections slot is taken, "
            "including the superuser_reserved_connections ones; end a client (restart the "
            "leaking service) or, from the server host, run pg_terminate_backend() in an "
            "existing superuser session"
        )
    if "remaining connection slots are reserved" in lowered:
        return (
            "the server is full for ordinary roles (53300): only the reserved slots "
            "(superuser_reserved_connections, and reserved_connections on PostgreSQL 16+) are "
            "left; run the doctor as a superuser (e.g. PGUSER=postgres), which uses one of them"
        )
    if "too many connections for role" in lowered:
        return (
            "this role is at its connection limit (53300, rolconnlimit): run the doctor as "
            "another role, or raise it with ALTER ROLE ... CONNECTION LIMIT"
        )
    if "too many connections for database" in lowered:
        return (
            "this database is at its connection limit (53300, datconnlimit): connect to "
            "another database (dbname=postgres) as a superuser, or ALTER DATABASE ... "
            "CONNECTION LIMIT"
        )
    return ""


def connect(dsn: str, *, timeout: float = 5.0) -> Any:
    """A psycopg connection in autocommit, read-only, with short timeouts of its own.

    Raises:
        DoctorError: a bad DSN or a failed connection, as one redacted line.
    """
    psycopg = _psycopg()
    target = describe_target(dsn)
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            application_name=APPLICATION_NAME,
        )
    except psycopg.Error as exc:
        reason = redact_dsn(_one_line(str(exc))) or type(exc).__name__
        why = _explain(reason)
        raise DoctorError(
            f"cannot connect to {target}: {reason}" + (f" -- {why}" if why else "")
        ) from None
    try:
        # Read-only for everything but pg_terminate_backend(), which reads nothing and writes no
        # table; a stuck catalog lock must not hang the doctor during an incident.
        conn.execute("SET default_transaction_read_only = on")
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("SET lock_timeout = '2s'")
    except psycopg.Error as exc:
        conn.close()
        raise DoctorError(f"cannot set up the session on {target}: {_one_line(str(exc))}") from None
    return conn
