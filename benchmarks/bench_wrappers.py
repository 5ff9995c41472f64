"""What one call through a wrapper costs: pgleak's plain functions against wrapt's proxies.

Usage::

    python benchmarks/bench_wrappers.py            # full run, about 20 seconds
    python benchmarks/bench_wrappers.py --quick    # smoke run, a few seconds

The question it answers (docs/design.md, "Co-existing with wrapt-based instrumentations"):
would making pgleak's patches wrapt ``FunctionWrapper``s, the ecosystem's convention, cost
anything on the hot path? Each wrapper does nothing but call what it wraps, so what is timed
is the wrapping alone, per call, minus the call of the bare callable: as a module function, as
an instance method (bound at each call, the way ``pool.getconn()`` is) and as a classmethod
(``Connection.connect``). wrapt is timed with its C extension and, for reference, with its
pure-Python implementation (what it falls back to where the extension cannot be built).

Method: ``timeit`` loops of ``--number`` calls, ``--repeat`` times, the configurations
interleaved round by round; the figure is the best round (the least disturbed by the machine),
in nanoseconds per call.
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable
from typing import Any

import wrapt
import wrapt.wrappers  # the pure-Python classes, next to the C extension's


def plain(make_inner: Callable[..., Any]) -> Any:
    """pgleak's shape: a closure that calls the original (``Adapter.patch``)."""

    @functools.wraps(make_inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return make_inner(*args, **kwargs)

    return wrapper


def passthrough(wrapped: Any, _instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def target(*_args: Any) -> int:
    return 1


def build() -> dict[str, dict[str, Callable[[], Any]]]:
    """Configuration -> shape -> a zero-argument callable making one such call."""

    def classes(wrap: Callable[[Any], Any] | None) -> tuple[Any, Any]:
        class Pool:
            getconn: Any = wrap(target) if wrap is not None else target

        class Conn:
            connect: Any = classmethod(target) if wrap is None else wrap(classmethod(target))

        return Pool(), Conn

    def classes_plain() -> tuple[Any, Any]:
        class Pool:
            getconn: Any = plain(target)

        class Conn:
            connect: Any = classmethod(plain(target))

        return Pool(), Conn

    made: dict[str, dict[str, Callable[[], Any]]] = {}
    configs: dict[str, tuple[Any, tuple[Any, Any]]] = {
        "bare": (target, classes(None)),
        "pgleak (plain function)": (plain(target), classes_plain()),
        "wrapt C FunctionWrapper": (
            wrapt.FunctionWrapper(target, passthrough),
            classes(lambda f: wrapt.FunctionWrapper(f, passthrough)),
        ),
        "wrapt pure-Python": (
            wrapt.wrappers.FunctionWrapper(target, passthrough),
            classes(lambda f: wrapt.wrappers.FunctionWrapper(f, passthrough)),
        ),
    }
    for name, (function, (pool, conn)) in configs.items():
        made[name] = {
            "function": functools.partial(function, 1),
            "method": functools.partial(lambda p: p.getconn(1), pool),
            "classmethod": functools.partial(lambda c: c.connect(1), conn),
        }
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--number", type=int, default=200_000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    args = parser.parse_args()
    number, repeat = (20_000, 3) if args.quick else (args.number, args.repeat)

    configs = build()
    best: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        for name, calls in configs.items():
            for shape, call in calls.items():
                seconds = timeit.timeit(call, number=number)
                key = (name, shape)
                best[key] = min(best.get(key, seconds), seconds)

    shapes = list(next(iter(configs.values())))
    version = getattr(wrapt, "__version__", "?")
    print(f"wrapt {version}; ns per call (best of {repeat} x {number}), and over bare")
    print(f"{'':26}" + "".join(f"{shape:>22}" for shape in shapes))
    for name in configs:
        cells = []
        for shape in shapes:
            ns = best[(name, shape)] / number * 1e9
            bare = best[("bare", shape)] / number * 1e9
            cells.append(f"{ns:8.0f} ({ns - bare:+6.0f})")
        print(f"{name:26}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
