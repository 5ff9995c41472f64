"""The doctor's read-only SQL: server facts and one row per client backend.

Written for PostgreSQL 13 to 17: ``reserved_connections`` exists from 16 and
``idle_session_timeout`` from 14, so both are read with ``current_setting(name, true)`` (NULL
when the server does not know the name). Only ``backend_type = 'client backend'`` rows count:
autovacuum, WAL senders and background workers have slots of their own, outside
``max_connections``. Without superuser or ``pg_read_all_stats``, other roles' rows come back
with ``state`` and ``query`` hidden; the rules say so rather than guess.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pgleak._appname import ParsedTag, parse_tag

__all__ = ["TIMEOUT_SETTINGS", "Backend", "Server", "Snapshot", "take_snapshot"]

#: The settings whose absence lets a forgotten transaction or session hold a slot forever.
TIMEOUT_SETTINGS = (
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "idle_session_timeout",
)
#: How much of each backend's last query to read: enough to recognise it, little to ship.
QUERY_CHARS = 200

_SERVER_SQL = """
SELECT current_setting('server_version'),
       current_setting('server_version_num')::int,
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       current_user::text,
       r.rolsuper,
       r.rolconnlimit,
       current_database()::text,
       d.datconnlimit,
       pg_backend_pid(),
       r.rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER'),
       (SELECT reset_val FROM pg_catalog.pg_settings
        WHERE name = 'idle_in_transaction_session_timeout'),
       (SELECT reset_val FROM pg_catalog.pg_settings WHERE name = 'statement_timeout'),
       coalesce((SELECT reset_val FROM pg_catalog.pg_settings
                 WHERE name = 'idle_session_timeout'), '')
FROM pg_catalog.pg_roles r, pg_catalog.pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""

_ACTIVITY_SQL = """
SELECT a.pid,
       a.datname::text,
       a.usename::text,
       coalesce(a.application_name, ''),
       host(a.client_addr),
       a.client_port,
       a.state,
       a.backend_start,
       extract(epoch FROM now() - a.backend_start)::float8,
       extract(epoch FROM now() - a.xact_start)::float8,
       extract(epoch FROM now() - a.state_change)::float8,
       left(a.query, %s),
       a.wait_event_type,
       a.wait_event
FROM pg_catalog.pg_stat_activity a
WHERE a.backend_type = 'client backend'
ORDER BY a.pid
"""

# Per-role and per-database overrides (ALTER ROLE/DATABASE ... SET) of the timeout settings.
_OVERRIDES_SQL = """
SELECT coalesce(r.rolname::text, ''), coalesce(d.datname::text, ''), cfg
FROM pg_catalog.pg_db_role_setting s
LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase,
LATERAL unnest(s.setconfig) AS cfg
"""

# PgBouncer's application_name_add_host appends " - <client ip>:<port>".
_ADD_HOST = re.compile(r"^(?P<name>.*?) - (?P<addr>[0-9A-Fa-f:.]+):(?P<port>\d+)$")
_POOLER_NAMES = ("pgbouncer", "pgpool", "odyssey", "pgcat", "supavisor", "rds proxy")


@dataclasses.dataclass(frozen=True)
class Server:
    """What the server says about itself and about the doctor's own session."""

    version: str
    version_num: int
    max_connections: int
    superuser_reserved: int
    reserved_connections: int
    role: str
    superuser: bool
    role_limit: int | None
    database: str
    database_limit: int | None
    self_pid: int
    sees_all: bool
    #: The timeout settings a new session of the doctor's role gets ("0" is off): the
    #: ``reset_val``, not the doctor's own short statement_timeout.
    timeouts: dict[str, str]
    #: ``{setting: {role-or-database: value}}`` from ALTER ROLE / DATABASE ... SET.
    overrides: dict[str, dict[str, str]]

    @property
    def reserved(self) -> int:
        return self.superuser_reserved + self.reserved_connections

    @property
    def usable(self) -> int:
        """The slots an ordinary role can take."""
        return max(0, self.max_connections - self.reserved)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One client backend, with pgleak's tag parsed back when it has one."""

    pid: int
    database: str | None
    role: str | None
    application_name: str
    client_addr: str | None
    client_port: int | None
    #: None when the doctor may not see it (another role's backend, no pg_read_all_stats).
    state: str | None
    backend_start: Any
    backend_age: float | None
    xact_age: float | None
    state_age: float | None
    query: str | None
    wait_event: str | None
    is_self: bool
    tag: ParsedTag | None
    #: The client behind a pooler that appends it (PgBouncer's application_name_add_host).
    pooled_client: str | None

    @property
    def client(self) -> str:
        if self.client_addr is None:
            return "local socket" if self.client_port == -1 else "(hidden)"
        return self.client_addr


@dataclasses.dataclass(frozen=True)
class Snapshot:
    server: Server
    backends: list[Backend]

    @property
    def used(self) -> int:
        return len(self.backends)

    @property
    def others(self) -> list[Backend]:
        """Every backend but the doctor's own."""
        return [b for b in self.backends if not b.is_self]


def split_pooler_suffix(name: str) -> tuple[str, str | None]:
    """``("svc@web-1:42", "10.0.0.7:50312")`` from ``"svc@web-1:42 - 10.0.0.7:50312"``."""
    match = _ADD_HOST.match(name)
    if match is None:
        return name, None
    return match.group("name"), f"{match.group('addr')}:{match.group('port')}"


def looks_like_pooler(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _POOLER_NAMES)


def take_snapshot(
    conn: Any,
    *,
    template: str | None = None,
    site_template: str | None = None,
) -> Snapshot:
    """Read the server facts and every client backend, in two statements."""
    row = conn.execute(_SERVER_SQL).fetchone()
    timeouts = dict(zip(TIMEOUT_SETTINGS, row[12:15], strict=True))
    overrides: dict[str, dict[str, str]] = {}
    for rolname, datname, cfg in conn.execute(_OVERRIDES_SQL).fetchall():
        name, _, value = str(cfg).partition("=")
        if name in TIMEOUT_SETTINGS:
            where = f"role {rolname}" if rolname else f"database {datname}"
            overrides.setdefault(name, {})[where] = value
    server = Server(
        version=row[0],
        version_num=row[1],
        max_connections=row[2],
        superuser_reserved=row[3],
        reserved_connections=row[4],
        role=row[5],
        superuser=bool(row[6]),
        role_limit=None if row[7] is None or row[7] < 0 else row[7],
        database=row[8],
        database_limit=None if row[9] is None or row[9] < 0 else row[9],
        self_pid=row[10],
        sees_all=bool(row[11]),
        timeouts={k: v for k, v in timeouts.items() if v != ""},
        overrides=overrides,
    )
    parse_args = {
        key: value
        for key, value in (("template", template), ("site_template", site_template))
        if value
    }
    backends = []
    for r in conn.execute(_ACTIVITY_SQL, (QUERY_CHARS,)).fetchall():
        name = r[3]
        bare, pooled = split_pooler_suffix(name)
        backends.append(
            Backend(
                pid=r[0],
                database=r[1],
                role=r[2],
                application_name=name,
                client_addr=r[4],
                client_port=r[5],
                state=r[6],
                backend_start=r[7],
                backend_age=r[8],
                xact_age=r[9],
                state_age=r[10],
                query=r[11],
                wait_event=f"{r[12]}:{r[13]}" if r[12] else None,
                is_self=r[0] == server.self_pid,
                tag=parse_tag(bare, **parse_args),
                pooled_client=pooled,
            )
        )
    return Snapshot(server, backends)
