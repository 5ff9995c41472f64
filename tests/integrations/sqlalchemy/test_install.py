"""install() / uninstall() for SQLAlchemy: idempotent, exact, and polite about bad input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

import pgleak
from pgleak.integrations import sqlalchemy as sa_adapter
from tests.conftest import Server


@pytest.fixture
def clean() -> Iterator[None]:
    pgleak.uninstall()
    yield
    pgleak.uninstall()


def _patched_objects() -> dict[tuple[type, str], object]:
    return {
        (Pool, "connect"): Pool.__dict__["connect"],
        (Engine, "__init__"): Engine.__dict__["__init__"],
        (Engine, "dispose"): Engine.__dict__["dispose"],
    }


def _listening() -> list[bool]:
    return [
        event.contains(Pool, "checkout", sa_adapter._on_checkout),
        event.contains(Pool, "checkin", sa_adapter._on_checkin),
        event.contains(Pool, "detach", sa_adapter._on_detach),
        event.contains(Engine, "do_connect", sa_adapter._on_do_connect),
    ]


def test_install_three_times_uninstall_once_restores_the_originals(clean: None) -> None:
    originals = _patched_objects()
    for _ in range(3):
        pgleak.install()
    assert "sqlalchemy" in pgleak.installed()
    assert Pool.__dict__["connect"] is not originals[(Pool, "connect")]
    assert _listening() == [True, True, True, True]
    pgleak.uninstall()
    for (owner, attr), original in originals.items():
        assert owner.__dict__[attr] is original, f"{owner.__name__}.{attr} not restored"
    assert _listening() == [False, False, False, False]
    pgleak.uninstall()
    assert _patched_objects() == originals


def test_install_after_uninstall_tracks_again(clean: None, pg: Server) -> None:
    pgleak.install()
    pgleak.uninstall()
    pgleak.install()
    engine = sa.create_engine(pg.url("psycopg"))
    try:
        with engine.connect():
            assert len(pgleak.checked_out()) == 1
        pgleak.uninstall()
        with engine.connect():
            assert pgleak.checked_out() == []
    finally:
        engine.dispose()


def test_engines_created_before_install_are_tracked(clean: None, pg: Server) -> None:
    engine = sa.create_engine(pg.url("psycopg"))
    try:
        pgleak.install()
        with engine.connect():
            [checkout] = pgleak.checked_out()
        # Named from its URL like the engines created after install (password hidden).
        assert checkout.pool == engine.url.render_as_string(hide_password=True)
    finally:
        engine.dispose()


def test_second_install_applies_new_settings(clean: None) -> None:
    pgleak.install(leak_threshold=5)
    assert pgleak.settings().leak_threshold == 5
    pgleak.install(leak_threshold=7)
    assert pgleak.settings().leak_threshold == 7
    assert "sqlalchemy" in pgleak.installed()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"leak_threshold": -1}, "leak_threshold"),
        ({"leak_threshold": "soon"}, "'soon'"),
        ({"stack_depth": 0}, "stack_depth"),
        ({"capture_stack": "maybe"}, "capture_stack"),
        ({"leak_treshold": 3}, "leak_treshold"),
    ],
)
def test_bad_settings_raise_naming_knob_and_value(
    clean: None, kwargs: dict[str, object], needle: str
) -> None:
    with pytest.raises(pgleak.ConfigError, match=needle):
        pgleak.install(**kwargs)
    assert pgleak.installed() == []


def test_bad_env_setting_names_the_variable(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGLEAK_STACK_DEPTH", "deep")
    with pytest.raises(pgleak.ConfigError, match=r"PGLEAK_STACK_DEPTH.*'deep'"):
        pgleak.install()


def test_env_settings_apply_and_kwargs_win(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGLEAK_LEAK_THRESHOLD", "12.5")
    monkeypatch.setenv("PGLEAK_CAPTURE_STACK", "off")
    settings = pgleak.install(capture_stack=True)
    assert settings.leak_threshold == 12.5
    assert settings.capture_stack is True


def test_unknown_integration_is_refused(clean: None) -> None:
    with pytest.raises(pgleak.AdapterUnavailable, match="nosuchdb"):
        pgleak.install(integrations=["nosuchdb"])


def test_disabled_by_env_tracks_nothing(
    clean: None, monkeypatch: pytest.MonkeyPatch, pg: Server
) -> None:
    monkeypatch.setenv("PGLEAK_ENABLED", "0")
    pgleak.install()
    assert pgleak.installed() == []
    engine = sa.create_engine(pg.url("psycopg"))
    try:
        with engine.connect():
            assert pgleak.checked_out() == []
    finally:
        engine.dispose()


def test_import_of_pgleak_imports_no_database_library() -> None:
    code = (
        "import sys, pgleak\n"
        "heavy = {'sqlalchemy', 'psycopg', 'psycopg2', 'asyncpg', 'django', 'psycopg_pool'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
