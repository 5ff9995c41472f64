"""Installed, pgleak changes nothing a library or its users can observe of the patched API.

Libraries read their own functions back (SQLAlchemy's ``create_engine()`` takes the keywords it
accepts from the code object of ``Engine.__init__``; frameworks check whether a method is a
coroutine function). A wrapper must look like what it wraps.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import pgleak
from pgleak import _stack
from pgleak.integrations import ADAPTERS
from tests.conftest import Server


@pytest.fixture
def installed() -> Iterator[None]:
    # Import every library first, so that every adapter (and SQLAlchemy's asyncio part) patches.
    for module, _ in ADAPTERS.values():
        pytest.importorskip(module)
    import psycopg_pool  # noqa: F401
    import sqlalchemy.ext.asyncio  # noqa: F401

    pgleak.install()
    try:
        yield
    finally:
        pgleak.uninstall()


#: pgleak's C wrapper type, when the extension is loaded.
_TRACKED = getattr(_stack._fast, "Tracked", None)


def _unwrapped(obj: Any) -> Any:
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _is_async(fn: Any) -> bool:
    # Before 3.12 a plain function can only be marked for asyncio's own check.
    if sys.version_info >= (3, 12):
        return inspect.iscoroutinefunction(fn)
    return asyncio.iscoroutinefunction(fn)


def test_every_patched_callable_keeps_its_signature_and_kind(installed: None) -> None:
    checked = 0
    for name in pgleak.installed():
        for owner, attr, original in pgleak._adapters[name].originals():
            owner_name = getattr(owner, "__qualname__", None) or owner.__name__  # or a module
            where = f"{name}: {owner_name}.{attr}"
            if original is pgleak._adapter._MISSING:  # inherited: compare with the base's
                original = next(  # noqa: PLW2901
                    base.__dict__[attr] for base in owner.__mro__[1:] if attr in base.__dict__
                )
            before = _unwrapped(original)
            after = _unwrapped(owner.__dict__[attr])
            assert after is not before, where
            assert inspect.signature(after) == inspect.signature(before), where
            assert _is_async(after) == _is_async(before), where
            assert after.__name__ == before.__name__, where
            assert after.__doc__ == before.__doc__, where
            if type(after) is _TRACKED or type(before) is _TRACKED:
                # A C checkout/checkin wrapper (pgleak._speedups.Tracked) of a function, or a
                # wrapper over one: it binds and reads as the function (test below).
                assert type(after) in (_TRACKED, types.FunctionType), where
            elif isinstance(original, types.MethodType):
                # ``psycopg.connect`` is ``Connection.connect`` bound at import; its wrapper is
                # a function that takes the same arguments (``Adapter.patch`` makes functions).
                assert type(owner.__dict__[attr]) is types.FunctionType, where
            else:
                assert type(owner.__dict__[attr]) is type(original), where
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"execution_options": {"isolation_level": "AUTOCOMMIT"}},
        {"hide_parameters": True},
        {"logging_name": "shop"},
        {"query_cache_size": 10},
        {"echo": False},
        {"pool_size": 2, "max_overflow": 1, "pool_timeout": 5, "pool_pre_ping": True},
    ],
    ids=",".join,
)
def test_create_engine_takes_every_keyword_it_takes_without_pgleak(
    installed: None, pg: Server, kwargs: dict[str, Any]
) -> None:
    engine = sa.create_engine(pg.url("psycopg"), **kwargs)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        # ...and pgleak still names the pool after the engine's URL.
        from pgleak._core import core

        assert core.pool(engine.pool, "sqlalchemy", str).name == engine.url.render_as_string()
    finally:
        engine.dispose()


def test_create_engine_refuses_what_it_refuses_without_pgleak(installed: None) -> None:
    with pytest.raises(TypeError, match="no_such_argument"):
        sa.create_engine("sqlite://", no_such_argument=1)


def test_a_wrapper_on_a_subclass_sees_later_swaps_of_the_base_method() -> None:
    """pytest-django swaps ``BaseDatabaseWrapper.ensure_connection`` (its database blocker)
    around each test; pgleak's wrapper on the postgresql subclass must call the one in place."""

    class Base:
        def ensure(self, x: int) -> str:
            return f"base {x}"

    class Child(Base):
        pass

    class Toy(pgleak._adapter.Adapter):
        name = "toy"

        def _install(self) -> None:
            self.patch(Child, "ensure", lambda original: lambda s, x: f"wrapped {original(s, x)}")

    toy = Toy()
    toy._install()
    try:
        assert Child().ensure(1) == "wrapped base 1"
        Base.ensure = lambda self, x: f"swapped {x}"  # type: ignore[method-assign]
        assert Child().ensure(2) == "wrapped swapped 2"
    finally:
        toy.uninstall()
    assert "ensure" not in Child.__dict__


def test_sqlalchemy_connection_info_holds_only_what_the_user_put_there(
    installed: None, pg: Server
) -> None:
    # Connection.info is the user's dictionary on the pooled connection; SQLAlchemy's own
    # test_engine.py::test_connection_info compares it whole. pgleak's lease lives elsewhere.
    engine = sa.create_engine(pg.url("psycopg"), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            assert len(pgleak.checked_out()) == 1
            assert conn.info == {}
            conn.info["foo"] = "bar"
        assert pgleak.checked_out() == []  # the checkin still found the lease
        with engine.connect() as conn:  # the same pooled connection, its info kept
            assert conn.info == {"foo": "bar"}
            assert len(pgleak.checked_out()) == 1
        assert pgleak.checked_out() == []
    finally:
        engine.dispose()


def test_a_c_wrapper_binds_and_reads_as_the_function_it_wraps(installed: None) -> None:
    """The sync checkout and checkin wrappers are C objects (pgleak._speedups.Tracked) where
    the extension is loaded: as a method they bind like a function, and ``inspect`` sees the
    method they wrap."""
    if _TRACKED is None:
        pytest.skip(
            "pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
            "wrappers are Python functions, which the test above checks"
        )
    from psycopg_pool import ConnectionPool

    wrapper = ConnectionPool.__dict__["getconn"]
    assert type(wrapper) is _TRACKED
    original = wrapper.__wrapped__
    assert type(original) is types.FunctionType
    assert ConnectionPool.getconn is wrapper  # through the class: itself, as a function is
    pool = ConnectionPool("", open=False)
    bound = pool.getconn
    assert isinstance(bound, types.MethodType)
    assert bound.__func__ is wrapper
    assert bound.__self__ is pool
    assert inspect.signature(bound) == inspect.signature(original.__get__(pool))
    assert inspect.signature(wrapper) == inspect.signature(original)
    for name in ("__name__", "__qualname__", "__doc__", "__module__"):
        assert getattr(wrapper, name) == getattr(original, name), name
    assert inspect.ismethod(bound)
    assert inspect.isroutine(wrapper)
    assert not inspect.iscoroutinefunction(wrapper)


def test_the_asyncio_c_wrappers_bind_and_read_as_the_functions_they_wrap(installed: None) -> None:
    """The asyncio checkout and checkin wrappers (psycopg_pool's ``AsyncConnectionPool``,
    asyncpg's ``Pool._acquire`` and ``PoolConnectionHolder._release``) are C objects too: they
    bind like a function, ``inspect`` sees the method they wrap, and a coroutine method's
    wrapper still says it is a coroutine function."""
    if _TRACKED is None:
        pytest.skip(
            "pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
            "wrappers are Python functions, which the first test checks"
        )
    from asyncpg.pool import Pool, PoolConnectionHolder
    from psycopg_pool import AsyncConnectionPool

    for owner, attr in (
        (AsyncConnectionPool, "getconn"),
        (AsyncConnectionPool, "putconn"),
        (Pool, "_acquire"),
        (PoolConnectionHolder, "_release"),
    ):
        where = f"{owner.__qualname__}.{attr}"
        wrapper = owner.__dict__[attr]
        assert type(wrapper) is _TRACKED, where
        original = wrapper.__wrapped__
        assert type(original) is types.FunctionType, where
        assert getattr(owner, attr) is wrapper, where
        instance = object.__new__(owner)
        bound = getattr(instance, attr)
        assert isinstance(bound, types.MethodType), where
        assert bound.__func__ is wrapper, where
        assert bound.__self__ is instance, where
        assert inspect.signature(bound) == inspect.signature(original.__get__(instance)), where
        assert inspect.signature(wrapper) == inspect.signature(original), where
        for name in ("__name__", "__qualname__", "__doc__", "__module__"):
            assert getattr(wrapper, name) == getattr(original, name), (where, name)
        assert _is_async(wrapper) == _is_async(original), where
        assert _is_async(bound) == _is_async(original.__get__(instance)), where
        assert inspect.isroutine(wrapper), where
