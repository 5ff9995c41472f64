"""``application_name`` tags: who holds each backend, as ``pg_stat_activity`` shows it.

When the server is full, the DBA's first query is ``SELECT application_name, count(*) FROM
pg_stat_activity GROUP BY 1``. With every connection named ``checkout-api@web-7:4242`` that
query answers "which service, host and process", and with call-site tags
(``checkout-api:views.py:42``) "which line".

Three rules shape this module:

* **Set as a connection parameter, never as SQL text.** The tag goes into the startup packet
  (libpq's ``fallback_application_name``, asyncpg's ``server_settings``); the per-checkout tag
  is a bound parameter of ``set_config()``. A service name with a quote in it is data, always.
* **Sanitised here, not by the server.** PostgreSQL keeps at most 63 bytes and replaces
  non-printable-ASCII bytes (``?`` up to 15, ``\\xNN`` from 16), possibly cutting a multi-byte
  character in half. pgleak produces 63 bytes of printable ASCII itself: accents are dropped
  (``é`` -> ``e``), other characters become ``?``, and when the result is too long the host is
  shortened first, then the service, so the pid and the line survive.
* **The application's own value wins.** libpq drivers get ``fallback_application_name``, which
  libpq uses only when nothing else (the DSN, a keyword, ``PGAPPNAME``, a service file) names
  the application; asyncpg's ``server_settings`` are filled only when the application left
  ``application_name`` out. ``app_name_prefix`` keeps the application's value behind pgleak's
  tag instead. Call-site tags only ever replace a tag pgleak itself set.

Per-checkout tags cost a round trip, so they are only sent when the connection's current value
(which the server reports by itself in ``ParameterStatus``, free to read) differs from the tag:
a code path that checks out again and again from the same line pays once per connection.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import socket
import sys
import unicodedata
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pgleak import _stack
from pgleak._settings import Settings

__all__ = ["ParsedTag", "Tags", "parse_tag", "sanitize", "tags", "untagged"]

#: PostgreSQL's NAMEDATALEN - 1: the longest ``application_name`` it keeps.
LIMIT = 63

_SQL_FORMAT = "SELECT pg_catalog.set_config('application_name', %s, false)"
_SQL_DOLLAR = "SELECT pg_catalog.set_config('application_name', $1, false)"


def sanitize(text: str, limit: int = LIMIT) -> str:
    """``text`` as at most ``limit`` characters of printable ASCII, readable where possible."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", text):
        code = ord(ch)
        if 32 <= code < 127:
            out.append(ch)
        elif unicodedata.combining(ch):
            continue  # the accent of a decomposed letter: "é" -> "e"
        elif ch.isspace():
            out.append(" ")
        else:
            out.append("?")
        if len(out) >= limit:
            break
    return "".join(out).strip()


def _program_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name:  # python -m package.module: the module says more than "__main__.py"
        return str(name).removesuffix(".__main__")
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    base = os.path.basename(argv0)
    base = base.removesuffix(".py")
    return base if base and base != "-c" else "python"


def _short_host() -> str:
    host = socket.gethostname() or "localhost"
    if host.replace(".", "").isdigit():  # an IPv4 address: the dots are the point
        return host
    return host.split(".", 1)[0]


def _render(
    template: str, fields: dict[str, str], shrink: tuple[str, ...], from_left: frozenset[str]
) -> str:
    """Fill ``template`` and fit it into :data:`LIMIT`, shortening ``shrink`` fields in order."""
    clean = {key: sanitize(value, 1024) for key, value in fields.items()}
    text = sanitize(template.format(**clean), 4096)
    for key in shrink:
        over = len(text) - LIMIT
        if over <= 0:
            break
        value = clean.get(key, "")
        keep = max(len(value) - over, min(len(value), 6))
        clean[key] = value[len(value) - keep :] if key in from_left else value[:keep]
        text = sanitize(template.format(**clean), 4096)
    return text[:LIMIT].strip()


class Tags:
    """The tags of this process, from the settings in force; one instance, :data:`tags`."""

    def __init__(self) -> None:
        self.configure(Settings(enabled=False))

    def configure(self, settings: Settings) -> None:
        self.enabled = settings.enabled and settings.tag_connections
        #: Read on every checkout, so a plain attribute.
        self.call_site = self.enabled and settings.app_name_call_site
        self._settings = settings
        self._pid = -1
        self._base = ""
        # (code, lasti) -> tag; bounded by the number of lines that check out.
        self._sites: dict[tuple[CodeType, int], str] = {}
        self._ours: set[str] = set()

    # -- the process tag -----------------------------------------------------------------------

    def _fields(self) -> dict[str, str]:
        service = (
            self._settings.service_name
            or os.environ.get("OTEL_SERVICE_NAME", "").strip()
            or _program_name()
        )
        return {"service": service, "host": _short_host(), "pid": str(os.getpid())}

    @property
    def base(self) -> str:
        """``service@host:pid`` (by ``app_name_template``); recomputed in a forked child."""
        self._refresh()
        return self._base

    def _refresh(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            self._base = _render(
                self._settings.app_name_template,
                self._fields(),
                ("host", "service"),
                frozenset(),
            )
            self._pid = pid
            self._sites.clear()
            self._ours = {self._base}

    def for_user_value(self, user: str | None) -> str | None:
        """The name to connect with, given the application's own (``None``: leave it be)."""
        if not self.enabled:
            return None
        if not user:
            return self.base
        if self._settings.app_name_prefix:
            return sanitize(f"{self.base} {user}")
        return None

    # -- connection parameters, per driver family ----------------------------------------------

    def libpq_kwargs(self, dsn: Any, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        """``kwargs`` for ``connect(dsn, **kwargs)`` of psycopg / psycopg2, tagged.

        ``None`` when nothing changes. Untagged by the application, the tag goes in as
        ``fallback_application_name``, so that anything libpq itself would take a name from
        (``PGAPPNAME``, a ``service=`` file) still wins.
        """
        if not self.enabled:
            return None
        # Both keys looked for contain "application_name": a DSN without it needs no parsing.
        named = isinstance(dsn, str) and "application_name" in dsn
        parsed = _parse_conninfo(dsn) if named else {}
        user = (
            kwargs.get("application_name")
            or parsed.get("application_name")
            or os.environ.get("PGAPPNAME")
        )
        if user:
            value = self.for_user_value(str(user))
            return None if value is None else {**kwargs, "application_name": value}
        if kwargs.get("fallback_application_name") or parsed.get("fallback_application_name"):
            return None  # the application chose its own fallback
        return {**kwargs, "fallback_application_name": self.base}

    def asyncpg_kwargs(self, dsn: Any, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        """``kwargs`` for ``asyncpg.connect(dsn, **kwargs)``, tagged through ``server_settings``.

        asyncpg reads ``application_name`` from ``server_settings`` or the DSN's query string
        (``server_settings`` winning); it ignores ``PGAPPNAME``, and so does pgleak here.
        """
        if not self.enabled:
            return None
        settings = dict(kwargs.get("server_settings") or {})
        user = settings.get("application_name")
        if not user and isinstance(dsn, str) and "application_name" in dsn:
            found = parse_qs(urlsplit(dsn).query).get("application_name")
            user = found[0] if found else None
        value = self.for_user_value(user)
        if value is None:
            return None
        settings["application_name"] = value
        return {**kwargs, "server_settings": settings}

    # -- call-site tags ------------------------------------------------------------------------

    def site_tag(self, lease: Any) -> str | None:
        """The per-checkout tag for ``lease`` (its first user frame), or ``None``."""
        raw = lease.raw if lease is not None else ()
        if not raw:
            task = lease.task[0]() if lease is not None and lease.task is not None else None
            raw = _stack.capture(1, 3, task)
            if not raw:
                return None
        key = (raw[0], raw[1])
        tag = self._sites.get(key)
        if tag is None:
            code: CodeType = raw[0]
            site = f"{os.path.basename(code.co_filename)}:{_stack._lineno(code, raw[1])}"
            self._refresh()
            fields = {**self._fields(), "site": site}
            tag = _render(
                self._settings.app_name_site_template,
                fields,
                ("host", "service", "site"),
                frozenset({"site"}),
            )
            if len(self._sites) >= 4096:
                self._sites.clear()
            self._sites[key] = tag
            self._ours.add(tag)
        return tag

    # -- pools that keep their connect arguments -----------------------------------------------

    def tag_pool_kwargs(
        self, pool: Any, attr: str, dsn: Any, family: Callable[..., dict[str, Any] | None]
    ) -> None:
        """Tag the connect keyword arguments a pool keeps in ``pool.attr``, once per process.

        Called before each new server connection. The pool keeps the tagged arguments (so the
        work is done once), remembering the application's own to start again from after a
        fork, when the pid in the tag changes. A callable (psycopg_pool 3.3's ``kwargs=``) is
        wrapped so each call's result is tagged.
        """
        if not self.enabled:
            return
        current = getattr(pool, attr, None)
        base = self.base
        if isinstance(current, (_TaggedKwargs, _TaggedCallable)):
            if current.base == base:
                return
            current = current.original
        if callable(current):
            setattr(pool, attr, _TaggedCallable(current, base, lambda kw: family(dsn, kw)))
            return
        original = dict(current or {})
        tagged = family(dsn, original)
        setattr(pool, attr, _TaggedKwargs(original if tagged is None else tagged, original, base))

    def _wanted(self, current: str | None, tag: str) -> bool:
        """Whether to send ``tag``: it differs, and the current value is one of pgleak's."""
        return current != tag and (current is None or current in self._ours)

    def tag_checkout(self, conn: Any, lease: Any) -> None:
        """Tag a sync driver connection with its checkout's line (one round trip, if needed)."""
        tag = self.site_tag(lease)
        if tag is None:
            return
        driver = _driver(conn)
        if driver is not None:
            driver.set_sync(conn, tag, self._wanted)

    async def atag_checkout(self, conn: Any, lease: Any) -> None:
        """Tag an asyncio driver connection with its checkout's line."""
        tag = self.site_tag(lease)
        if tag is None:
            return
        driver = _driver(conn)
        if driver is not None:
            await driver.set_async(conn, tag, self._wanted)


# -- reading tags back: what ``pgleak doctor`` does with pg_stat_activity ------------------------


@dataclasses.dataclass(frozen=True)
class ParsedTag:
    """The fields of one ``application_name`` pgleak wrote; ``None`` where the tag has none."""

    service: str | None = None
    host: str | None = None
    pid: int | None = None
    call_site: str | None = None
    #: The application's own name, kept behind pgleak's tag by ``app_name_prefix``.
    user: str | None = None


# What each field may look like once written: the builder above sanitises and shortens them, so
# these patterns match what _render produces, not what the application passed in.
_FIELD_PATTERNS = {
    "service": r"(?P<service>.+?)",
    "host": r"(?P<host>[^\s@:]+?)",
    "pid": r"(?P<pid>\d+)",
    "site": r"(?P<site>[^\s:]+:\d+)",
}
_FIELD = re.compile(r"\{(service|host|pid|site)\}")


@functools.lru_cache(maxsize=16)
def _tag_pattern(template: str) -> re.Pattern[str] | None:
    """A regex for the tags ``template`` produces; ``None`` if it has no field at all."""
    parts: list[str] = []
    seen: set[str] = set()
    last = 0
    for match in _FIELD.finditer(template):
        parts.append(re.escape(template[last : match.start()]))
        name = match.group(1)
        # A field used twice is matched the second time by a backreference.
        parts.append(f"(?P={name})" if name in seen else _FIELD_PATTERNS[name])
        seen.add(name)
        last = match.end()
    parts.append(re.escape(template[last:]))
    if not seen:
        return None
    # `app_name_prefix` appends " <the application's own name>".
    return re.compile("^" + "".join(parts) + r"(?: (?P<user>.+))?$")


def parse_tag(
    value: str | None,
    template: str = Settings.app_name_template,
    site_template: str = Settings.app_name_site_template,
) -> ParsedTag | None:
    """The pgleak tag in an ``application_name``, or ``None`` if pgleak did not write it.

    The inverse of :class:`Tags` for the templates in force (the defaults unless the caller
    passes the ones its services use): the process tag is tried first, then the call-site tag.
    A shortened host or service parses as what is left of it.
    """
    if not value:
        return None
    for candidate in (template, site_template):
        pattern = _tag_pattern(candidate)
        match = pattern.match(value) if pattern is not None else None
        if match is None:
            continue
        fields = match.groupdict()
        pid = fields.get("pid")
        return ParsedTag(
            service=fields.get("service"),
            host=fields.get("host"),
            pid=int(pid) if pid else None,
            call_site=fields.get("site"),
            user=fields.get("user"),
        )
    return None


class _TaggedKwargs(dict[str, Any]):
    """A pool's connect arguments with the tag added; ``original`` is what the pool had."""

    def __init__(self, tagged: Mapping[str, Any], original: Any, base: str) -> None:
        super().__init__(tagged)
        self.original = original
        self.base = base


class _TaggedCallable:
    """A pool's ``kwargs`` callable (sync or async) whose results get the tag added."""

    def __init__(
        self,
        original: Callable[[], Any],
        base: str,
        tag: Callable[[Mapping[str, Any]], dict[str, Any] | None],
    ) -> None:
        self.original = original
        self.base = base
        self._tag = tag

    def __call__(self) -> Any:
        result = self.original()
        if inspect.isawaitable(result):
            return self._tag_later(result)
        return self._tag(result) or result

    async def _tag_later(self, result: Any) -> Any:
        kwargs = await result
        return self._tag(kwargs) or kwargs


def untagged(value: Any) -> Any:
    """What a pool's connect arguments were before :meth:`Tags.tag_pool_kwargs` tagged them."""
    return value.original if isinstance(value, (_TaggedKwargs, _TaggedCallable)) else value


def _parse_conninfo(dsn: str) -> dict[str, Any]:
    """A libpq DSN (``key=value`` or URI) as a dict, by libpq itself; ``{}`` if unparsable."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        return dict(conninfo_to_dict(dsn))
    except ImportError:
        pass
    except Exception:
        return {}
    try:
        from psycopg2.extensions import parse_dsn

        return dict(parse_dsn(dsn))
    except Exception:
        return {}


# -- drivers: read the current value for free, set a new one with a bound parameter ------------

_Want = Callable[[str | None, str], bool]


class _Driver:
    """How one driver family reads and sets ``application_name``.

    A family without a sync (asyncpg) or an asyncio (psycopg2) API leaves that side a no-op:
    such a connection cannot reach it, and if it ever did, no tag is better than an error.
    """

    def set_sync(self, conn: Any, tag: str, want: _Want) -> None:
        return None

    async def set_async(self, conn: Any, tag: str, want: _Want) -> None:
        return None


class _Psycopg2(_Driver):
    def set_sync(self, conn: Any, tag: str, want: _Want) -> None:
        # Only an idle connection: a transaction left open is the application's to end.
        if conn.closed or conn.get_transaction_status() != 0:
            return
        if not want(conn.get_parameter_status("application_name"), tag):
            return
        try:
            with conn.cursor() as cur:
                cur.execute(_SQL_FORMAT, (tag,))
            if not conn.autocommit:
                conn.commit()
        except BaseException:
            if not conn.closed and not conn.autocommit:
                conn.rollback()
            raise


def _psycopg_current(conn: Any) -> tuple[bool, str | None]:
    """(idle?, current application_name) from libpq's own state: no round trip."""
    pgconn = conn.pgconn
    if conn.closed or pgconn.transaction_status != 0:
        return False, None
    value = pgconn.parameter_status(b"application_name")
    return True, None if value is None else value.decode("utf-8", "replace")


class _Psycopg(_Driver):
    def set_sync(self, conn: Any, tag: str, want: _Want) -> None:
        idle, current = _psycopg_current(conn)
        if not idle or not want(current, tag):
            return
        try:
            conn.execute(_SQL_FORMAT, (tag,))
            if not conn.autocommit:
                conn.commit()
        except BaseException:
            if not conn.closed and not conn.autocommit:
                conn.rollback()
            raise

    async def set_async(self, conn: Any, tag: str, want: _Want) -> None:
        idle, current = _psycopg_current(conn)
        if not idle or not want(current, tag):
            return
        try:
            await conn.execute(_SQL_FORMAT, (tag,))
            if not conn.autocommit:
                await conn.commit()
        except BaseException:
            if not conn.closed and not conn.autocommit:
                await conn.rollback()
            raise


class _Asyncpg(_Driver):
    async def set_async(self, conn: Any, tag: str, want: _Want) -> None:
        if conn.is_closed() or conn.is_in_transaction():
            return
        current = getattr(conn.get_settings(), "application_name", None)
        if want(current, tag):
            await conn.execute(_SQL_DOLLAR, tag)


_DRIVERS: dict[str, _Driver] = {
    "psycopg2": _Psycopg2(),
    "psycopg": _Psycopg(),
    "asyncpg": _Asyncpg(),
}
# Connection classes are few and live as long as their modules: a plain dict is cheapest.
_driver_of_class: dict[type, _Driver | None] = {}


def _driver(conn: Any) -> _Driver | None:
    """The driver family of a connection object, by its class's modules (subclasses too)."""
    cls = type(conn)
    try:
        return _driver_of_class[cls]
    except KeyError:
        pass
    found: _Driver | None = None
    for klass in cls.__mro__:
        top = (getattr(klass, "__module__", "") or "").split(".", 1)[0]
        if top in _DRIVERS:
            found = _DRIVERS[top]
            break
    _driver_of_class[cls] = found
    return found


#: The one instance, configured by ``install()``.
tags = Tags()
