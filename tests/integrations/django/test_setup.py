"""Setting pgleak up in a Django project: the app and ``PGLEAK``, or ``pgleak.install()``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import pgleak
from tests.conftest import Server
from tests.django_site.server import Kind, ServerFailed, manage, serve
from tests.integrations.django.sites import APP, KINDS, MODES, PGLEAK, database, names, site

PATCHED = (
    ("django.core.handlers.base", "BaseHandler", "get_response"),
    ("django.core.handlers.base", "BaseHandler", "get_response_async"),
    ("django.core.handlers.base", "BaseHandler", "resolve_request"),
    ("django.core.management.base", "BaseCommand", "execute"),
    ("django.db.backends.postgresql.base", "DatabaseWrapper", "ensure_connection"),
    ("django.db.backends.postgresql.base", "DatabaseWrapper", "close"),
    ("django.db.backends.postgresql.base", "DatabaseWrapper", "close_if_unusable_or_obsolete"),
    ("django.db.backends.postgresql.base", "DatabaseWrapper", "get_new_connection"),
    ("django.db.backends.postgresql.base", "DatabaseWrapper", "get_connection_params"),
)


@pytest.mark.parametrize("kind", KINDS)
def test_install_in_the_entry_point_tracks_django_and_the_app_keeps_it(
    pg: Server, tmp_path: Path, kind: Kind
) -> None:
    """``pgleak.install()`` in ``wsgi.py``/``asgi.py`` alone installs the Django adapter; with
    the app also in ``INSTALLED_APPS`` but no ``PGLEAK`` setting, that install is kept (its
    threshold is not reset to the default 30 s)."""
    apps = (APP,) if kind == "asgi" else ()
    install = {"leak_threshold": 0.3, "report_interval": 0.01}
    with serve(kind, pg, install=install, extra_apps=apps, log_dir=tmp_path) as server:
        server.get_json("/idle-in-transaction/?seconds=0.7")
        (suspected,) = server.wait_for_event("leak.suspected")
    assert names(suspected, "idle-in-transaction")
    assert suspected["context"] == (
        "GET /idle-in-transaction/ (tests.django_site.views.idle_in_transaction)"
    )
    assert suspected["state"].startswith("idle in transaction")
    assert suspected["threshold_s"] == pytest.approx(0.3)


def test_native_pool_without_the_psycopg_pool_adapter_is_tracked_by_django_alone(
    pg: Server, tmp_path: Path
) -> None:
    setting = {**PGLEAK, "integrations": ["django"]}
    with serve(
        "wsgi",
        pg,
        pool=MODES["native-pool"]["pool"],
        extra_apps=(APP,),
        pgleak=setting,
        log_dir=tmp_path,
    ) as server:
        assert server.get_json("/query/")["pooled"] is True
        server.get_json("/idle-in-transaction/?seconds=0.7")
        (suspected,) = server.wait_for_event("leak.suspected")
        (returned,) = server.wait_for_event("leak.returned")
    assert names(suspected, "idle-in-transaction")
    assert suspected["state"] == "idle in transaction, inside transaction.atomic()"
    assert suspected["pool"].startswith(database("per-request"))  # the alias: no pool handle
    assert returned["checkout_id"] == suspected["checkout_id"]


def test_bad_pgleak_setting_stops_the_server_naming_the_knob(pg: Server, tmp_path: Path) -> None:
    with (
        pytest.raises(ServerFailed) as failed,
        serve("wsgi", pg, extra_apps=(APP,), pgleak={"leak_treshold": 3}, log_dir=tmp_path),
    ):
        pass  # pragma: no cover - the server never starts
    assert "pgleak.ConfigError: settings.PGLEAK: unknown pgleak setting(s): leak_treshold" in (
        str(failed.value)
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ([1, 2], "settings.PGLEAK: expected a dict of pgleak.install() keyword arguments"),
        ({"leak_threshold": -1}, "settings.PGLEAK: invalid value for leak_threshold"),
    ],
)
def test_bad_pgleak_setting_fails_a_command_at_startup(
    pg: Server, setting: Any, message: str
) -> None:
    env = {"DJANGO_SITE_PGLEAK": json.dumps(setting)}
    result = manage(pg, "check", extra_apps=(APP,), env=env)
    assert result.returncode != 0
    assert message in result.stderr


def test_call_site_tags_name_the_line_in_pg_stat_activity(pg: Server, tmp_path: Path) -> None:
    pgleak_setting = {"service_name": "shop", "app_name_call_site": True}
    with serve(
        "wsgi", pg, conn_max_age=60, extra_apps=(APP,), pgleak=pgleak_setting, log_dir=tmp_path
    ) as server:
        seen = server.get_json("/query/")["application_name"]
    path, line = site("query").rsplit(":", 1)
    assert seen == f"shop:{os.path.basename(path)}:{line}"


def test_uninstall_restores_every_patched_attribute_exactly() -> None:
    import importlib

    owners = [getattr(importlib.import_module(module), owner) for module, owner, _ in PATCHED]
    before = {
        (owner, attr): owner.__dict__.get(attr)
        for owner, (_, _, attr) in zip(owners, PATCHED, strict=True)
    }
    pgleak.uninstall()
    try:
        for _ in range(3):
            pgleak.install(integrations=["django"])
        assert pgleak.installed() == ["django"]
        for owner, (_, _, attr) in zip(owners, PATCHED, strict=True):
            assert getattr(owner.__dict__[attr], "__pgleak_wrapped__", False), attr
    finally:
        pgleak.uninstall()
    after = {
        (owner, attr): owner.__dict__.get(attr)
        for owner, (_, _, attr) in zip(owners, PATCHED, strict=True)
    }
    assert after == before
    # Inherited methods patched on the postgresql wrapper are inherited again.
    assert before[(owners[4], "ensure_connection")] is None
