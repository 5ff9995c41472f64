"""Wrappers compiled with their method's own parameters (pgleak._forward)."""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from pgleak import _forward, _stack

#: Calls on with what it was given and says how: what every shape must preserve.
_TEMPLATE = """
def {name}({params}):
    seen.append(({first}, {args}, {kwargs}))
    return original({call})
"""


def _wrap(fn: Any, reserved: frozenset[str] = frozenset()) -> tuple[Any, list[Any], Any]:
    seen: list[Any] = []
    shape = _forward.shape_of(fn, reserved | {"seen", "original"})
    wrapper = _forward.compile_wrapper(
        _TEMPLATE, fn.__name__, shape, {"seen": seen, "original": fn}
    )
    return wrapper, seen, shape


def test_plain_parameters_and_defaults_pass_through_as_given() -> None:
    marker = object()

    def getconn(self: Any, timeout: Any = marker, key: Any = None) -> Any:
        return (self, timeout, key)

    wrapper, seen, shape = _wrap(getconn)
    assert shape is not _forward.GENERIC
    assert shape.params.startswith("self, timeout=")
    assert wrapper("pool") == ("pool", marker, None)
    assert wrapper("pool", key=3) == ("pool", marker, 3)
    assert wrapper("pool", 1.5, 2) == ("pool", 1.5, 2)
    assert seen[-1] == ("pool", (1.5, 2), {})
    with pytest.raises(TypeError):
        wrapper("pool", 1, 2, 3)  # the same errors as the method itself


def test_every_kind_of_parameter() -> None:
    def method(self: Any, a: Any, /, b: Any, *rest: Any, c: Any = 1, **more: Any) -> Any:
        return (self, a, b, rest, c, more)

    wrapper, seen, _ = _wrap(method)
    assert wrapper(0, 1, 2, 3, 4, c=5, d=6) == (0, 1, 2, (3, 4), 5, {"d": 6})
    assert seen[-1] == (0, (1, 2, 3, 4), {"c": 5, "d": 6})
    with pytest.raises(TypeError):
        wrapper(0, a=1, b=2)  # ``a`` stays positional-only


def test_single_positional_after_the_first_is_a_tuple() -> None:
    def putconn(self: Any, conn: Any) -> Any:
        return conn

    wrapper, seen, _ = _wrap(putconn)
    assert wrapper("pool", "conn") == "conn"
    assert seen == [("pool", ("conn",), {})]


def test_keyword_only_without_star_args() -> None:
    def method(self: Any, *, timeout: Any = None) -> Any:
        return timeout

    wrapper, seen, _ = _wrap(method)
    assert wrapper("pool", timeout=2) == 2
    assert seen == [("pool", (), {"timeout": 2})]
    with pytest.raises(TypeError):
        wrapper("pool", 2)


@pytest.mark.parametrize(
    "fn",
    [
        getattr,  # a C function without a signature to copy
        lambda original, x: (original, x),  # a parameter named like the template's own
        lambda *args: args,  # no parameter to name the pool by
    ],
)
def test_generic_shape_when_the_parameters_cannot_be_used(fn: Any) -> None:
    assert _forward.shape_of(fn, frozenset({"original"})) is _forward.GENERIC


def test_generic_shape_forwards_everything() -> None:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return (self, args, kwargs)

    seen: list[Any] = []
    wrapper = _forward.compile_wrapper(
        _TEMPLATE, "method", _forward.GENERIC, {"seen": seen, "original": method}
    )
    assert wrapper(1, 2, k=3) == (1, (2,), {"k": 3})
    assert seen == [(1, (2,), {"k": 3})]


def test_tracebacks_show_the_wrapper_line_and_stacks_skip_its_frame() -> None:
    def boom(self: Any) -> Any:
        raise ValueError("no")

    wrapper, _, _ = _wrap(boom)
    try:
        wrapper("pool")
    except ValueError as err:
        frames = traceback.extract_tb(err.__traceback__)
    else:
        pytest.fail("the wrapper swallowed the error")
    mine = [f for f in frames if f.name == "boom" and "/pgleak/<wrapper #" in f.filename]
    assert mine
    assert mine[0].line == "return original(self)"
    code = wrapper.__code__
    assert _stack._code_verdict(code) == _stack._SKIP  # pgleak's own frame, never the user's


def test_pool_wrappers_take_their_methods_own_parameters(installed: Any) -> None:
    """Every checkout and checkin passes these: a generic ``(pool, *args, **kwargs)`` layer
    costs ~3,000 instructions more a call. ``putconn(self, conn)`` among them: the release
    template's own ``conn`` is the method's connection parameter, spelt the same."""
    psycopg_pool = pytest.importorskip("psycopg_pool")
    psycopg2_pool = pytest.importorskip("psycopg2.pool")
    expected = {
        psycopg_pool.ConnectionPool.getconn: ("self", "timeout"),
        psycopg_pool.ConnectionPool.putconn: ("self", "conn"),
        psycopg_pool.AsyncConnectionPool.getconn: ("self", "timeout"),
        psycopg_pool.AsyncConnectionPool.putconn: ("self", "conn"),
        psycopg2_pool.AbstractConnectionPool._getconn: ("self", "key"),
        psycopg2_pool.AbstractConnectionPool._putconn: ("self", "conn", "key", "close"),
    }
    for fn, params in expected.items():
        # A C wrapper (pgleak._speedups.Tracked) hands its rare cases to the same template.
        code = getattr(fn, "_pgleak_python", fn).__code__
        assert code.co_filename.startswith(_forward.__file__.rsplit("/", 1)[0]), fn
        assert code.co_varnames[: code.co_argcount] == params, fn
        assert not code.co_flags & 0x0C, fn  # no *args, **kwargs
