"""install() / uninstall() for SQLAlchemy: idempotent, exact, and polite about bad input."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import _ConnectionFairy

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
        (Pool, "_return_conn"): Pool.__dict__["_return_conn"],
        (_ConnectionFairy, "_checkout"): _ConnectionFairy.__dict__["_checkout"],
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


@pytest.fixture(params=["direct", "events"])
def hooks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of hooking checkout and checkin: SQLAlchemy's private methods where they are
    what pgleak expects (2.0, 2.1), its pool events where they are not."""
    if request.param == "events":
        monkeypatch.setattr(sa_adapter, "_direct_hooks_fit", lambda: False)
    assert request.param == "events" or sa_adapter._direct_hooks_fit()
    return str(request.param)


def test_install_three_times_uninstall_once_restores_the_originals(clean: None, hooks: str) -> None:
    originals = _patched_objects()
    for _ in range(3):
        pgleak.install()
    assert "sqlalchemy" in pgleak.installed()
    direct = hooks == "direct"
    patched = {key for key, obj in _patched_objects().items() if obj is not originals[key]}
    if direct:
        assert patched == {
            (Pool, "_return_conn"),
            (_ConnectionFairy, "_checkout"),
            (Engine, "dispose"),
        }
    else:
        assert patched == {(Pool, "connect"), (Engine, "dispose")}
    assert _listening() == [not direct, not direct, True, True]
    pgleak.uninstall()
    for (owner, attr), original in originals.items():
        assert owner.__dict__[attr] is original, f"{owner.__name__}.{attr} not restored"
    assert _listening() == [False, False, False, False]
    pgleak.uninstall()
    assert _patched_objects() == originals


def test_a_changed_private_shape_falls_back_to_the_events(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sa_adapter._direct_hooks_fit()
    monkeypatch.setattr(sa, "__version__", "3.0.0")
    assert not sa_adapter._direct_hooks_fit()
    monkeypatch.undo()

    def changed(cls: type, pool: object, fairy: object = None) -> object:  # a new shape
        raise AssertionError("never called")

    monkeypatch.setattr(_ConnectionFairy, "_checkout", classmethod(changed))
    assert not sa_adapter._direct_hooks_fit()
    monkeypatch.undo()

    class OwnReturn(Pool):  # a pool class that returns connections its own way
        def _return_conn(self, record: object) -> None:
            raise AssertionError("never called")

    assert not sa_adapter._direct_hooks_fit()
    del OwnReturn
    gc.collect()  # a class leaves Pool.__subclasses__() only once collected
    assert sa_adapter._direct_hooks_fit()


def test_the_events_fallback_tracks_checkout_and_checkin(
    clean: None, pg: Server, hooks: str
) -> None:
    pgleak.install()
    engine = sa.create_engine(pg.url("psycopg"))
    try:
        with engine.connect():
            assert len(pgleak.checked_out()) == 1
        assert pgleak.checked_out() == []
    finally:
        engine.dispose()


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
