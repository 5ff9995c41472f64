"""Wrappers that take the wrapped method's own parameters, so that calling through them is cheap.

A wrapper written ``def wrapper(pool, *args, **kwargs): ... original(pool, *args, **kwargs)``
costs, on CPython 3.11+, several times the work of the call it wraps: the library's call into
it packs a tuple and a dict, and the call on (``CALL_FUNCTION_EX``) leaves the interpreter's
inlined call path for a new C-level evaluation loop. On a pool's checkout and checkin, which are
a few microseconds each, that was a third of pgleak's cost. A wrapper with the same parameters
as the method (``def getconn(self, timeout=None): ... original(self, timeout)``) is called and
calls on like any Python function.

So the hottest wrappers (:meth:`pgleak._adapter.Adapter.track_acquire` and ``track_release``)
are written once as source templates and compiled per method, the way :mod:`dataclasses`
writes ``__init__``. Where the parameters cannot be read (a C function, a signature with a
parameter named like one of the template's own names), the same template is compiled with
``*args, **kwargs``: one body either way.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import os
from collections.abc import Callable
from typing import Any

__all__ = ["Shape", "compile_wrapper", "shape_of"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class Shape:
    """How a wrapper takes and passes on its method's arguments, as source fragments.

    ``params``: the wrapper's parameter list; ``first``: the name of the first (the pool);
    ``call``: the arguments to call the method with; ``args`` / ``kwargs``: expressions for
    the arguments after the first, as a tuple and a dict (read only on rare paths: a failed
    checkout's timeout, a release's connection passed by keyword).
    """

    __slots__ = ("args", "call", "defaults", "first", "kwargs", "names", "params")

    def __init__(
        self,
        params: str,
        first: str,
        call: str,
        args: str,
        kwargs: str,
        defaults: dict[str, Any],
        names: tuple[str, ...] = (),
    ) -> None:
        self.params = params
        self.first = first
        self.call = call
        self.args = args
        self.kwargs = kwargs
        self.defaults = defaults
        #: The parameters' names (empty for the generic shape).
        self.names = names


GENERIC = Shape("pool, *args, **kwargs", "pool", "pool, *args, **kwargs", "args", "kwargs", {})


def shape_of(fn: Callable[..., Any], reserved: frozenset[str]) -> Shape:
    """``fn``'s own parameters as a :class:`Shape`; :data:`GENERIC` when they cannot be used."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return GENERIC
    params: list[str] = []
    call: list[str] = []
    positional: list[str] = []
    keywords: list[str] = []
    star = double = ""
    defaults: dict[str, Any] = {}
    kinds = inspect.Parameter
    last_positional_only = -1
    for index, param in enumerate(signature.parameters.values()):
        name = param.name
        if name in reserved or name.startswith("_pgleak_") or not name.isidentifier():
            return GENERIC
        text = name
        if param.default is not kinds.empty:
            key = f"_pgleak_default_{index}"
            defaults[key] = param.default
            text = f"{name}={key}"
        if param.kind is kinds.POSITIONAL_ONLY:
            last_positional_only = len(params)
            params.append(text)
            call.append(name)
            positional.append(name)
        elif param.kind is kinds.POSITIONAL_OR_KEYWORD:
            params.append(text)
            call.append(name)
            positional.append(name)
        elif param.kind is kinds.VAR_POSITIONAL:
            star = name
            params.append(f"*{name}")
            call.append(f"*{name}")
        elif param.kind is kinds.KEYWORD_ONLY:
            if not star and "*" not in params:
                params.append("*")
            params.append(text)
            call.append(f"{name}={name}")
            keywords.append(name)
        else:
            double = name
            params.append(f"**{name}")
            call.append(f"**{name}")
    if not positional:
        return GENERIC  # no pool parameter to name: not a method this can wrap
    if last_positional_only >= 0:
        params.insert(last_positional_only + 1, "/")
    rest = positional[1:]
    args = f"({', '.join(rest)}{',' if len(rest) == 1 else ''})"
    if star:
        args = f"({args} + {star})"
    kwargs = "{" + ", ".join(f"{k!r}: {k}" for k in keywords) + "}"
    if double:
        kwargs = f"{{**{kwargs}, **{double}}}"
    names = tuple(signature.parameters)
    return Shape(", ".join(params), positional[0], ", ".join(call), args, kwargs, defaults, names)


_compiled = itertools.count(1)


def compile_wrapper(
    template: str,
    name: str,
    shape: Shape,
    namespace: dict[str, Any],
    role: str = "wrapper",
    **fields: str,
) -> Callable[..., Any]:
    """The function ``template`` defines, for ``shape``, with ``namespace`` as its globals.

    ``template`` is formatted with the shape's fragments (``{name}``, ``{params}``, ``{first}``,
    ``{call}``, ``{args}``, ``{kwargs}``) and ``fields``.

    The source is registered with :mod:`linecache` under a file name in pgleak's own package
    directory (``<role #n>``), so a traceback through the wrapper shows its line and stack
    capture classifies its frame as pgleak's (skipped, like every other frame of pgleak's).
    """
    source = template.format(
        name=name,
        params=shape.params,
        first=shape.first,
        call=shape.call,
        args=shape.args,
        kwargs=shape.kwargs,
        **fields,
    )
    # e.g. ".../pgleak/<acquire #3>": what a traceback through it shows, unique per wrapper.
    filename = os.path.join(_HERE, f"<{role} #{next(_compiled)}>")
    glob = dict(namespace)
    glob.update(shape.defaults)
    exec(compile(source, filename, "exec"), glob)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    fn: Callable[..., Any] = glob[name]
    return fn
