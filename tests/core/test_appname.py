"""``application_name`` tags without a server: sanitising, fitting into 63 bytes, settings."""

from __future__ import annotations

import os
import socket

import pytest

import pgleak
from pgleak._appname import LIMIT, ParsedTag, Tags, parse_tag, sanitize
from pgleak._settings import Settings, build_settings
from pgleak._stack import _lineno


def _tags(**settings: object) -> Tags:
    tags = Tags()
    tags.configure(build_settings(settings, environ={}))
    return tags


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain-service", "plain-service"),
        ('it\'s "quoted" \\ back\\slashed; --', 'it\'s "quoted" \\ back\\slashed; --'),
        ("café-Zürich", "cafe-Zurich"),
        ("日本語 api", "??? api"),
        ("tab\there\nnew\x00line", "tab here new?line"),
        ("  padded  ", "padded"),
        ("\U0001f600 emoji", "? emoji"),
    ],
)
def test_sanitize_keeps_printable_ascii_and_transliterates(raw: str, clean: str) -> None:
    assert sanitize(raw) == clean
    assert all(32 <= ord(ch) < 127 for ch in sanitize(raw))


def test_sanitize_cuts_a_kilobyte_to_what_postgres_keeps() -> None:
    value = sanitize("é" * 1024)
    assert value == "e" * LIMIT
    assert len(value.encode()) == LIMIT == 63


def test_base_tag_is_service_host_pid() -> None:
    tags = _tags(service_name="billing")
    host = socket.gethostname().split(".", 1)[0]
    assert tags.base == sanitize(f"billing@{host}:{os.getpid()}")


def test_a_long_host_is_shortened_before_the_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 200 + ".example.com")
    tags = _tags(service_name="svc-" + "s" * 80)
    base = tags.base
    assert len(base) <= LIMIT
    assert base.endswith(f":{os.getpid()}")
    assert base.startswith("svc-")
    assert "@hhhhhh" in base  # the host keeps its first characters


def test_service_falls_back_to_otel_service_name_then_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-otel")
    assert _tags().base.startswith("from-otel@")
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    program = _tags().base.split("@", 1)[0]
    assert program
    assert program != "from-otel"


def test_template_is_validated() -> None:
    with pytest.raises(pgleak.ConfigError, match="app_name_template"):
        build_settings({"app_name_template": "{service}-{nope}"}, environ={})
    with pytest.raises(pgleak.ConfigError, match="app_name_site_template"):
        build_settings({"app_name_site_template": "{service"}, environ={})
    settings = build_settings({"app_name_site_template": "{site} {pid}"}, environ={})
    assert settings.app_name_site_template == "{site} {pid}"


def test_template_from_env() -> None:
    settings = build_settings({}, environ={"PGLEAK_APP_NAME_TEMPLATE": "{service}/{pid}"})
    assert settings.app_name_template == "{service}/{pid}"


def test_user_value_is_kept_or_prefixed() -> None:
    tags = _tags(service_name="svc")
    assert tags.for_user_value(None) == tags.base
    assert tags.for_user_value("mine") is None
    prefixed = _tags(service_name="svc", app_name_prefix=True).for_user_value("mine")
    assert prefixed == f"{tags.base} mine"


def test_libpq_kwargs_use_the_fallback_and_respect_every_user_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGAPPNAME", raising=False)
    tags = _tags(service_name="svc")
    assert tags.libpq_kwargs("host=db", {}) == {"fallback_application_name": tags.base}
    assert tags.libpq_kwargs("host=db application_name=mine", {}) is None
    assert tags.libpq_kwargs("postgresql://db/x?application_name=mine", {}) is None
    assert tags.libpq_kwargs("host=db", {"application_name": "mine"}) is None
    assert tags.libpq_kwargs("host=db", {"fallback_application_name": "mine"}) is None
    monkeypatch.setenv("PGAPPNAME", "from-env")
    assert tags.libpq_kwargs("host=db", {}) is None
    prefixing = _tags(service_name="svc", app_name_prefix=True)
    assert prefixing.libpq_kwargs("host=db", {"x": 1}) == {
        "x": 1,
        "application_name": f"{tags.base} from-env",
    }


def test_asyncpg_kwargs_use_server_settings() -> None:
    tags = _tags(service_name="svc")
    assert tags.asyncpg_kwargs(None, {"server_settings": {"jit": "off"}}) == {
        "server_settings": {"jit": "off", "application_name": tags.base}
    }
    assert tags.asyncpg_kwargs(None, {"server_settings": {"application_name": "x"}}) is None
    assert tags.asyncpg_kwargs("postgresql://db/x?application_name=mine", {}) is None


def test_switched_off() -> None:
    tags = _tags(tag_connections=False)
    assert tags.libpq_kwargs("host=db", {}) is None
    assert tags.asyncpg_kwargs(None, {}) is None
    assert not tags.call_site
    off = Tags()
    off.configure(Settings(enabled=False))
    assert off.libpq_kwargs("host=db", {}) is None


def test_site_tag_keeps_the_line_when_too_long() -> None:
    tags = _tags(service_name="s" * 100, app_name_call_site=True)

    class FakeLease:
        raw = (test_site_tag_keeps_the_line_when_too_long.__code__, 0)
        task = None

    tag = tags.site_tag(FakeLease())
    assert tag is not None
    line = _lineno(test_site_tag_keeps_the_line_when_too_long.__code__, 0)
    assert tag.endswith(f"test_appname.py:{line}")
    assert len(tag) <= LIMIT


# -- reading tags back (pgleak doctor) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "service"),
    [
        ({"service_name": "checkout-api"}, "checkout-api"),
        ({"service_name": "a" * 80}, "a" * 80),  # shortened to fit: parses as what is left
        ({"service_name": "café with @ and : inside"}, None),
    ],
)
def test_the_process_tag_parses_back_into_its_fields(
    settings: dict[str, object], service: str | None
) -> None:
    tags = _tags(**settings)
    parsed = parse_tag(tags.base)
    assert parsed is not None
    assert parsed.pid == os.getpid()
    assert parsed.host is not None
    assert socket.gethostname().startswith(parsed.host)
    if service is not None:
        assert service.startswith(parsed.service or "")
    assert tags.base == f"{parsed.service}@{parsed.host}:{parsed.pid}"


def test_call_site_prefix_and_custom_templates_parse_back() -> None:
    assert parse_tag("checkout-api:views.py:42") == ParsedTag(
        service="checkout-api", call_site="views.py:42"
    )
    assert parse_tag("api@web-7:4242 my-own-name") == ParsedTag(
        service="api", host="web-7", pid=4242, user="my-own-name"
    )
    custom = "{host}/{service}/{pid}"
    tags = _tags(service_name="billing", app_name_template=custom)
    parsed = parse_tag(tags.base, template=custom)
    assert parsed is not None
    assert (parsed.service, parsed.pid) == ("billing", os.getpid())


@pytest.mark.parametrize("value", ["", "psql", "pgAdmin 4 - DB:postgres", "a@b", "x@y:z"])
def test_names_pgleak_did_not_write_do_not_parse(value: str) -> None:
    assert parse_tag(value) is None
