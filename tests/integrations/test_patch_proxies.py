"""``Adapter.patch`` / ``Adapter.uninstall`` with wrapt proxies on the same attribute, for every
kind of callable an adapter patches, with wrapt's C proxies and its pure-Python ones (standing
in for the copies of wrapt that ddtrace and New Relic vendor: other classes, same names).

``tests/otel/test_coexist.py`` runs the real instrumentations; this file runs what they do
(``wrap_function_wrapper`` on, OpenTelemetry's ``unwrap`` off) on each shape, and checks what
runs, in which order, with which ``instance``, and that every object is put back exactly.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("opentelemetry.instrumentation.utils", reason="OpenTelemetry test extras")

import wrapt
import wrapt.patches
import wrapt.wrappers  # the pure-Python proxies
from opentelemetry.instrumentation import utils

from pgleak._adapter import Adapter

KINDS = ["function", "method", "classmethod", "staticmethod", "coroutine", "bound method"]


def make_owner(kind: str) -> tuple[Any, Callable[[Any], Any], Any]:
    """A fresh owner with ``target`` of ``kind``; a call of it; the instance a hook must see."""

    def target(*args: Any) -> Any:
        return args[-1]

    async def atarget(*args: Any) -> Any:
        return args[-1]

    class Owner:
        pass

    if kind == "function":
        owner: Any = types.ModuleType("owner")
        owner.target = target
        return owner, lambda o: o.target(1), None
    if kind == "bound method":  # psycopg.connect is Connection.connect, bound at import
        owner = types.ModuleType("owner")
        owner.target = classmethod(target).__get__(None, Owner)
        return owner, lambda o: o.target(1), Owner
    if kind == "method":
        setattr(Owner, "target", target)  # noqa: B010
        obj: Any = Owner()
        return Owner, lambda _o: obj.target(1), obj
    if kind == "classmethod":
        setattr(Owner, "target", classmethod(target))  # noqa: B010
        return Owner, lambda o: o.target(1), Owner
    if kind == "staticmethod":
        setattr(Owner, "target", staticmethod(target))  # noqa: B010
        return Owner, lambda o: o.target(1), None
    setattr(Owner, "target", atarget)  # noqa: B010
    aobj: Any = Owner()
    return Owner, lambda _o: asyncio.run(aobj.target(1)), aobj


class Layer(Adapter):
    """pgleak's side: one patch of ``owner.target`` that logs that it ran."""

    name = module = distribution = "pgleak"

    def __init__(self, owner: Any, log: list[Any]) -> None:
        super().__init__()
        self.owner = owner
        self.log = log

    def _install(self) -> None:
        log = self.log

        def make(original: Any) -> Any:
            if asyncio.iscoroutinefunction(original):

                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    log.append("pgleak")
                    return await original(*args, **kwargs)

                return awrapper

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                log.append("pgleak")
                return original(*args, **kwargs)

            return wrapper

        self.patch(self.owner, "target", make)


def hook(name: str, log: list[Any]) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        log.append((name, instance))
        return wrapped(*args, **kwargs)

    return wrapper


def unwrap_pure_python(owner: Any, attr: str) -> None:
    """``opentelemetry.instrumentation.utils.unwrap`` (and ddtrace's), for the pure-Python
    classes: it recognises the proxies of its own copy of wrapt only."""
    func = getattr(owner, attr, None)
    if isinstance(func, wrapt.wrappers.ObjectProxy) and hasattr(func, "__wrapped__"):
        setattr(owner, attr, func.__wrapped__)


#: A proxy class, and the unwrap() that goes with it.
PROXIES = {
    "wrapt": (wrapt.FunctionWrapper, utils.unwrap),
    "pure-Python wrapt": (wrapt.wrappers.FunctionWrapper, unwrap_pure_python),
}

#: Every order of pgleak's install/uninstall and one instrumentation's wrap/unwrap.
ORDERS = [
    ("install", "wrap", "unwrap", "uninstall"),
    ("install", "wrap", "uninstall", "unwrap"),
    ("wrap", "install", "unwrap", "uninstall"),
    ("wrap", "install", "uninstall", "unwrap"),
]


@pytest.mark.parametrize("agent", [False, True], ids=["alone", "over an agent"])
@pytest.mark.parametrize("proxy", PROXIES)
@pytest.mark.parametrize("order", ORDERS, ids=",".join)
@pytest.mark.parametrize("kind", KINDS)
def test_each_side_removes_its_own_layer(
    kind: str, order: tuple[str, ...], proxy: str, agent: bool
) -> None:
    """``agent``: another agent's proxy was there first, and stays (two agents, one method)."""
    owner, call, instance = make_owner(kind)
    original = owner.__dict__["target"]
    log: list[Any] = []
    layer = Layer(owner, log)
    if agent:
        agent_proxy = wrapt.wrap_function_wrapper(owner, "target", hook("agent", log))
    proxy_class, unwrap = PROXIES[proxy]
    on = set()
    for step in order:
        if step == "install":
            layer.install()
            on.add("pgleak")
        elif step == "uninstall":
            layer.uninstall()
            on.discard("pgleak")
        elif step == "wrap":
            wrapt.patches.wrap_object(owner, "target", proxy_class, (hook("instrumentation", log),))
            on.add("instrumentation")
        else:
            unwrap(owner, "target")
            on.discard("instrumentation")
        log.clear()
        assert call(owner) == 1
        # The proxies are always outermost, whichever came first.
        expected: list[Any] = []
        if "instrumentation" in on:
            expected.append(("instrumentation", instance))
        if agent:
            expected.append(("agent", instance))
        if "pgleak" in on:
            expected.append("pgleak")
        assert log == expected, f"after {step}"
    if agent:  # unwrap() may leave the agent's proxy bound (its getattr binds), without pgleak too
        assert agent_proxy.__wrapped__ is original
    elif order[-1] == "uninstall" or not isinstance(original, (classmethod, staticmethod)):
        assert owner.__dict__["target"] is original
    else:  # unwrap() leaves what getattr() gives (a bound method), with or without pgleak
        assert owner.__dict__["target"] == original.__get__(None, owner)


@pytest.mark.parametrize("kind", KINDS)
def test_beneath_two_agents_proxies(kind: str) -> None:
    """Two agents' proxies (other copies of wrapt) on one attribute: pgleak goes beneath both
    and leaves both as they were."""
    owner, call, instance = make_owner(kind)
    original = owner.__dict__["target"]
    log: list[Any] = []
    wrapt.patches.wrap_object(
        owner, "target", wrapt.wrappers.FunctionWrapper, (hook("inner agent", log),)
    )
    inner = owner.__dict__["target"]
    wrapt.wrap_function_wrapper(owner, "target", hook("outer agent", log))
    outer = owner.__dict__["target"]
    layer = Layer(owner, log)
    layer.install()
    assert call(owner) == 1
    assert log == [("outer agent", instance), ("inner agent", instance), "pgleak"]
    layer.uninstall()
    assert owner.__dict__["target"] is outer
    assert outer.__wrapped__ is inner
    assert inner.__wrapped__ is original


@pytest.mark.parametrize("kind", KINDS)
def test_unwrapped_beneath_pgleak_restores_the_original_exactly(kind: str) -> None:
    """OpenTelemetry's ``unwrap`` of a classmethod leaves the method bound to the class, of a
    staticmethod the bare function (its ``getattr`` binds); with pgleak beneath,
    ``uninstall()`` still puts back the original."""
    owner, call, _ = make_owner(kind)
    original = owner.__dict__["target"]
    log: list[Any] = []
    wrapt.wrap_function_wrapper(owner, "target", hook("instrumentation", log))
    layer = Layer(owner, log)
    layer.install()
    utils.unwrap(owner, "target")
    assert call(owner) == 1
    assert log == ["pgleak"]
    layer.uninstall()
    assert owner.__dict__["target"] is original


def test_a_plain_wrapper_on_top_is_left_alone_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner, call, _ = make_owner("function")
    log: list[Any] = []
    layer = Layer(owner, log)
    layer.install()
    theirs = owner.__dict__["target"]

    def on_top(*args: Any) -> Any:
        log.append("theirs")
        return theirs(*args)

    owner.target = on_top
    with caplog.at_level(logging.WARNING, logger="pgleak"):
        layer.uninstall()
    assert "replaced after pgleak patched it" in caplog.text
    assert owner.__dict__["target"] is on_top
    assert call(owner) == 1
    assert log == ["theirs", "pgleak"]


def test_inherited_from_a_proxied_base() -> None:
    """An attribute the owner inherits from a base an agent wrapped: pgleak's wrapper on the
    owner calls through the agent's (bound) proxy, and uninstall removes the owner's slot."""
    owner, _, _ = make_owner("method")
    log: list[Any] = []
    wrapt.wrap_function_wrapper(owner, "target", hook("agent", log))
    sub = type("Sub", (owner,), {})
    layer = Layer(sub, log)
    layer.install()
    obj = sub()
    assert obj.target(1) == 1
    assert log == ["pgleak", ("agent", obj)]
    layer.uninstall()
    assert "target" not in sub.__dict__
