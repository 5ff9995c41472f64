"""One frozen settings object, built from ``install()`` kwargs over ``PGLEAK_*`` env vars.

Every knob has one name, used as the kwarg, as the env var (upper-cased, ``PGLEAK_`` prefix) and,
later, as a key in Django's ``PGLEAK`` dict, so that a team can move a value between code and
deployment config without renaming it. Values are validated when ``install()`` runs, never at the
first checkout: a typo in production config should fail the deploy, not hide until 3 a.m.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ConfigError", "Settings", "build_settings", "env_typos"]


class ConfigError(ValueError):
    """A setting has a value pgleak cannot use; the message names the knob and the value."""

    __module__ = "pgleak"


@dataclasses.dataclass(frozen=True)
class Settings:
    """pgleak's configuration. Build it with :func:`pgleak.install`, not directly.

    Attributes:
        enabled: Master switch; ``PGLEAK_ENABLED=0`` turns pgleak off without a code change.
        leak_threshold: Seconds a connection may be held before it is reported as
            ``leak.suspected``. HikariCP users pick 2-60 s; 30 s keeps a slow report query quiet.
        capture_stack: Record the checkout stack. Off, reports still name pool, holder and times.
        stack_depth: How many frames to record per checkout, from the user's checkout line
            outwards (pgleak's and the pool library's frames newer than that line are skipped
            first; any met further out are recorded but not shown).
        keep_framework_frames: Show servers' and frameworks' dispatch frames (socketserver,
            werkzeug, gunicorn, uvicorn, Django's handlers, ...) in reported stacks. Off (the
            default), each run of them outside the user's code is one line with its count: a
            Flask dev-server request carries ~13 of them, none of which says who leaked.
        report_interval: Seconds during which repeated reports from one call site are counted
            instead of logged again in full; the count is logged when the interval ends.
        max_tracked: Upper bound on checkouts tracked at once, so a runaway leak cannot make
            pgleak itself exhaust memory. Checkouts beyond it are counted, not tracked.
        integrations: Which adapters to install (``None``: every library that is installed).
        retry_connect: Retry opening a server connection refused because the server (or
            PgBouncer) is full or starting up, with backoff; never a statement.
        retry_deadline: Seconds, from the first attempt, after which no retry starts.
        retry_max_attempts: Attempts in all, the first included.
        retry_base_delay: Backoff base: attempt n sleeps U(0, min(max_delay, base * 2**n)).
        retry_max_delay: Backoff cap, seconds.
        retry_budget: Tokens of the process-wide retry budget (gRPC retry throttling's
            ``maxTokens``): each refused attempt spends one, each success refunds
            ``retry_budget_ratio``; below half, nothing is retried, so that many processes
            facing a full server fail fast instead of hammering it. 300: 150 refused attempts
            beyond the successes before retries stop - what 30 requests at once against a full
            5-slot server spend riding it out (``benchmarks/bench_retry_storm.py``); an outage
            costs the server at most that many extra attempts per process before fail-fast.
        retry_budget_ratio: Tokens a successful connection gives back. 1.0: the budget drains
            only while refused attempts outnumber successful connections, i.e. when *most*
            attempts fail. (gRPC's 0.1 suits per-RPC counting; connections are opened rarely
            in a pooled application, so refills would take far too long.)
        tag_connections: Give every server connection pgleak sees an ``application_name``
            naming this process, so that a DBA reading ``pg_stat_activity`` knows who holds
            each backend.
        service_name: The service in that tag; unset: ``OTEL_SERVICE_NAME``, else the program
            name (``sys.argv[0]``'s base name, or the ``-m`` module).
        app_name_template: The tag, with fields ``{service}``, ``{host}`` (the short host
            name) and ``{pid}``. Sanitised to what PostgreSQL stores (at most 63 bytes of
            printable ASCII); when too long, the host is shortened first, then the service.
        app_name_prefix: When the application sets its own ``application_name``, keep it but
            put pgleak's tag in front (``tag user-value``). Off: the application's value is
            used as it is.
        app_name_call_site: Also tag each checkout with the line of code that made it, by
            ``app_name_site_template``, so ``pg_stat_activity`` shows which line holds each
            backend. Costs a round trip on a checkout whose line differs from the one the
            connection was last tagged with (``docs/performance.md``); off by default.
        app_name_site_template: The per-checkout tag: fields as ``app_name_template``, plus
            ``{site}`` (``views.py:42``).
        track_direct: Track connections opened with the driver's own ``connect()``
            (``psycopg2.connect()``, ``psycopg.connect()``, ``asyncpg.connect()``) outside any
            pool, each like a checkout of a pool named after its DSN: one dropped without
            ``close()`` is ``leak.collected``, one open at exit ``leak.at_exit``.
        direct_threshold: Seconds a direct connection may stay open before it is reported as
            ``leak.suspected``. ``None`` (the default): never, as long-lived direct
            connections (a worker's, a ``LISTEN`` loop's) are often meant to be.
        summary_interval: Seconds between two ``leak.summary`` records (the leaks by call
            site, worst first; :func:`pgleak.summary`), logged only when something happened
            since the last one; also logged at exit.
        reclaim: Close and give back to its pool a connection whose holder has ended (its
            thread or task is done), once it is older than ``reclaim_after`` and while the pool
            is under pressure (``reclaim_when_used`` of it out, or callers waiting); reported
            as ``leak.reclaimed``. Off by default: see docs/production.md.
        reclaim_after: Seconds a checkout must be old before it can be reclaimed.
        reclaim_when_used: The share of a pool's connections out that counts as pressure.
        dump_signal: A signal (``SIGUSR2``) on which the process logs every connection checked
            out right now, with its line and where its holder is (``pool.checked_out``); unset:
            none. Opt-in, since servers use some signals themselves (gunicorn's master takes
            SIGUSR2 for its binary upgrade).
        otel: OpenTelemetry spans (one per checkout, leak events on it) and pool metrics
            (``docs/otel.md``). ``None`` (the default): on when ``opentelemetry-api`` is
            importable, which costs nothing until the application sets up an SDK; ``True``
            insists (``install()`` fails without the API); ``False``: off.
    """

    enabled: bool = True
    leak_threshold: float = 30.0
    capture_stack: bool = True
    stack_depth: int = 16
    keep_framework_frames: bool = False
    report_interval: float = 60.0
    max_tracked: int = 10_000
    integrations: tuple[str, ...] | None = None
    retry_connect: bool = True
    retry_deadline: float = 10.0
    retry_max_attempts: int = 8
    retry_base_delay: float = 0.2
    retry_max_delay: float = 2.0
    retry_budget: float = 300.0
    retry_budget_ratio: float = 1.0
    tag_connections: bool = True
    service_name: str | None = None
    app_name_template: str = "{service}@{host}:{pid}"
    app_name_prefix: bool = False
    app_name_call_site: bool = False
    app_name_site_template: str = "{service}:{site}"
    track_direct: bool = True
    direct_threshold: float | None = None
    summary_interval: float = 900.0
    reclaim: bool = False
    reclaim_after: float = 300.0
    reclaim_when_used: float = 0.9
    dump_signal: str | None = None
    otel: bool | None = None


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
    raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off)")


def _auto_bool(value: Any) -> bool | None:
    """A boolean, or ``None`` (``auto``) for "decide from what is installed"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "auto"}):
        return None
    try:
        return _parse_bool(value)
    except ValueError:
        raise ValueError("expected a boolean (true/false, 1/0, yes/no, on/off) or auto") from None


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("expected a positive, finite number of seconds")
    return number


def _fraction(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a fraction (0 < x <= 1)")
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError("expected a fraction (0 < x <= 1)")
    return number


def _optional_seconds(value: Any) -> float | None:
    """A positive number of seconds, or ``None`` (also ``""``, ``off``, ``none``): never."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "off", "none"}):
        return None
    return _positive_float(value)


def _signal_name(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "off", "none"}):
        return None
    import signal

    name = str(value).strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not isinstance(getattr(signal, name, None), int) or name in {"SIGKILL", "SIGSTOP"}:
        raise ValueError("expected a signal this platform can handle, e.g. SIGUSR2")
    return name


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected a positive whole number")
    number = int(value)
    if number < 1:
        raise ValueError("expected a positive whole number")
    return number


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if isinstance(value, str) and value.strip().lower() in {"", "all", "auto"}:
        return None
    return names


_TEMPLATE_FIELDS = ("service", "host", "pid")


def _template(*extra: str) -> Callable[[Any], str]:
    fields = _TEMPLATE_FIELDS + extra

    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a non-empty template string")
        try:
            value.format(**{name: name for name in fields})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"not a template of the fields {', '.join('{' + f + '}' for f in fields)}: {exc}"
            ) from None
        return value

    return parse


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value.strip() or None


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "enabled": _parse_bool,
    "leak_threshold": _positive_float,
    "capture_stack": _parse_bool,
    "stack_depth": _positive_int,
    "keep_framework_frames": _parse_bool,
    "report_interval": _positive_float,
    "max_tracked": _positive_int,
    "integrations": _names,
    "retry_connect": _parse_bool,
    "retry_deadline": _positive_float,
    "retry_max_attempts": _positive_int,
    "retry_base_delay": _positive_float,
    "retry_max_delay": _positive_float,
    "retry_budget": _positive_float,
    "retry_budget_ratio": _positive_float,
    "tag_connections": _parse_bool,
    "service_name": _optional_text,
    "app_name_template": _template(),
    "app_name_prefix": _parse_bool,
    "app_name_call_site": _parse_bool,
    "app_name_site_template": _template("site"),
    "track_direct": _parse_bool,
    "direct_threshold": _optional_seconds,
    "summary_interval": _positive_float,
    "reclaim": _parse_bool,
    "reclaim_after": _positive_float,
    "reclaim_when_used": _fraction,
    "dump_signal": _signal_name,
    "otel": _auto_bool,
}


def _closest(name: str) -> str | None:
    found = difflib.get_close_matches(name.lower(), list(_PARSERS), n=1, cutoff=0.8)
    return found[0] if found else None


def env_typos(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``PGLEAK_*`` variables that name no setting but nearly name one: ``(variable, the
    setting's variable)``. A misspelt variable would otherwise be ignored in silence; those
    that resemble no setting (a tool's own ``PGLEAK_*``) are left alone."""
    env = os.environ if environ is None else environ
    typos = []
    for variable in sorted(env):
        if not variable.startswith("PGLEAK_"):
            continue
        knob = variable[len("PGLEAK_") :].lower()
        if knob in _PARSERS:
            continue
        close = _closest(knob)
        if close is not None:
            typos.append((variable, env_name(close)))
    return typos


def env_name(knob: str) -> str:
    """The environment variable that sets ``knob``."""
    return "PGLEAK_" + knob.upper()


def build_settings(
    overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge defaults, ``PGLEAK_*`` env vars and explicit overrides (which win), and validate.

    Raises:
        ConfigError: an unknown knob, or a value that does not parse; the message says which
            knob, which source (kwarg or env var) and what was wrong.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(set(overrides) - set(_PARSERS))
    if unknown:
        named = ", ".join(
            name + (f" (did you mean {close}?)" if (close := _closest(name)) else "")
            for name in unknown
        )
        raise ConfigError(f"unknown pgleak setting(s): {named}; known: {', '.join(_PARSERS)}")
    values: dict[str, Any] = {}
    for knob, parse in _PARSERS.items():
        if knob in overrides:
            source, raw = f"install({knob}=...)", overrides[knob]
        elif env_name(knob) in env:
            source, raw = env_name(knob), env[env_name(knob)]
        else:
            continue
        try:
            values[knob] = parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid value for {knob} ({source}): {raw!r}: {exc}") from None
    return Settings(**values)
