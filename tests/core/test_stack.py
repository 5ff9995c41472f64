"""Stack capture: the newest kept frame is the caller's line; library frames are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pgleak import _stack
from tests.helpers import assert_site

#: The walks a stack can come from: the C one (``pgleak._speedups``) where it was built, and
#: always the Python one it falls back to; every test here runs with each.
_WALKS = ["python"] + (["c"] if _stack._load_speedups() is not None else [])


@pytest.fixture(autouse=True, params=_WALKS)
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    walk: str = request.param
    monkeypatch.setattr(_stack, "_fast", _stack._load_speedups() if walk == "c" else None)
    return walk


def _recurse(depth: int, limit: int) -> _stack.RawStack:
    if depth == 0:
        return _stack.capture(limit)  # CAPTURED
    return _recurse(depth - 1, limit)


def test_capture_names_the_calling_line_and_keeps_order() -> None:
    stack = _stack.format_raw(_recurse(3, 10))
    assert_site(stack, "CAPTURED")
    assert [entry.rsplit(" in ", 1)[1] for entry in stack[-4:]] == ["_recurse"] * 4
    assert stack[-5].rsplit(" in ", 1)[1] == "test_capture_names_the_calling_line_and_keeps_order"


def test_capture_keeps_only_the_newest_frames_up_to_the_limit() -> None:
    stack = _stack.format_raw(_recurse(30, 5))
    assert len(stack) == 5
    assert_site(stack, "CAPTURED")


@contextlib.contextmanager
def _managed() -> Iterator[_stack.RawStack]:
    yield _stack.capture(10)


def test_contextlib_frames_are_dropped() -> None:
    with _managed() as raw:  # WITH-LINE
        pass
    stack = _stack.format_raw(raw)
    # contextlib's __enter__ is not shown; the generator's own line and the with line are.
    assert not any("contextlib.py" in entry for entry in stack)
    assert stack[-2].startswith(stack[-2].split(":")[0])
    assert any(entry.endswith("in test_contextlib_frames_are_dropped") for entry in stack)


def test_registered_library_frames_are_dropped(tmp_path: object) -> None:
    import importlib.util
    import pathlib

    libdir = pathlib.Path(str(tmp_path)) / "fakelib"
    libdir.mkdir()
    (libdir / "__init__.py").write_text(
        "from pgleak import _stack\n\ndef pool_checkout(limit):\n    return _stack.capture(limit)\n"
    )
    spec = importlib.util.spec_from_file_location("fakelib", libdir / "__init__.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = _stack.format_raw(module.pool_checkout(10))
    assert "fakelib" in before[-1]
    _stack.register_library(libdir)
    try:
        after = _stack.format_raw(module.pool_checkout(10))  # LIB-CALLER
        assert_site(after, "LIB-CALLER")
    finally:
        _stack._skip_prefixes.remove(str(libdir) + "/")
        _stack._skip_cache.clear()


def test_capture_keeps_no_frame_objects_alive() -> None:
    raw = _recurse(2, 10)
    assert not any(type(item).__name__ == "frame" for item in raw)


def test_greenlet_boundary_is_crossed_to_the_parent_stack_in_a_task() -> None:
    """As in SQLAlchemy's asyncio mode: pool code runs in a greenlet the task switched into."""
    greenlet = pytest.importorskip("greenlet")

    def in_child() -> _stack.RawStack:
        return _stack.capture(20, 1, asyncio.current_task())

    async def main() -> _stack.RawStack:
        result: _stack.RawStack = greenlet.greenlet(in_child).switch()  # SWITCH
        return result

    stack = _stack.format_raw(asyncio.run(main()))
    assert stack[-1].endswith("in in_child")
    assert_site(stack[:-1], "SWITCH")


def test_outside_asyncio_the_walk_stays_in_its_greenlet() -> None:
    """gevent-style greenlets are independent flows: their parent (a hub) is not a caller."""
    greenlet = pytest.importorskip("greenlet")

    def in_child() -> _stack.RawStack:
        return _stack.capture(20)

    stack = _stack.format_raw(greenlet.greenlet(in_child).switch())
    assert stack[-1].endswith("in in_child")
    assert not any("test_outside_asyncio" in entry for entry in stack)


def test_task_chain_fills_frames_lost_behind_a_c_level_send() -> None:
    """An ``__await__`` wrapper hides the awaiting coroutine from f_back; the task shows it."""

    class Awaitable:
        def __await__(self):  # type: ignore[no-untyped-def]
            return inner().__await__()

    async def inner() -> _stack.RawStack:
        await asyncio.sleep(0)
        return _stack.capture(20, 1, asyncio.current_task())

    async def outer() -> _stack.RawStack:
        result: _stack.RawStack = await Awaitable()  # AWAITED
        return result

    async def main() -> _stack.RawStack:
        result: _stack.RawStack = await outer()
        return result

    stack = _stack.format_raw(asyncio.run(main()))
    assert stack[-1].endswith("in inner")
    assert_site(stack[:-1], "AWAITED")
    assert stack[-3].endswith("in main")


def test_format_frames_of_a_live_thread_drops_pgleak_frames() -> None:
    frame = sys._getframe()
    stack = _stack.format_frames(_stack.walk(frame), 10, newest_first=True)
    assert stack[-1].endswith("in test_format_frames_of_a_live_thread_drops_pgleak_frames")


def _generated(module_name: str, filename: str) -> object:
    """A function compiled from source at run time, as a library's decorator factory does."""
    env: dict[str, object] = {"__name__": module_name, "_stack": _stack}
    code = compile("def generated(limit):\n    return _stack.capture(limit)\n", filename, "exec")
    exec(code, env)
    return env["generated"]


@pytest.mark.parametrize("filename", ["<sqlalchemy generated wrapper>", "<string>"])
def test_pseudo_file_code_counts_as_the_module_it_runs_in(filename: str) -> None:
    """SQLAlchemy 2.1 names its generated wrappers ``<sqlalchemy generated ...>``, 2.0 leaves
    them ``<string>``: either way they run in SQLAlchemy's module and are its frames."""
    import os

    import sqlalchemy.orm.session

    # As the SQLAlchemy adapter does at install (kept: it is what every install does anyway).
    _stack.register_library(os.path.dirname(sqlalchemy.__file__ or ""))
    library_made: Any = _generated(sqlalchemy.orm.session.__name__, filename)
    raw = library_made(10)  # CALLS-GENERATED
    stack = _stack.format_raw(raw)
    assert_site(stack, "CALLS-GENERATED")
    assert not any(entry.startswith("<") for entry in stack)
    assert _stack.site(raw) is not None


def test_pseudo_file_code_of_the_application_is_kept() -> None:
    """``python -c`` and the application's own ``exec`` run in its modules: kept."""
    user_made: Any = _generated("__main__", "<string>")
    stack = _stack.format_raw(user_made(10))
    assert stack[-1].startswith("<string>:2 in generated")


def test_neighbouring_pseudo_file_frames_are_judged_each_by_its_module() -> None:
    """Two pseudo-file frames side by side with one file name object (``exec`` of strings
    shares "<string>"): the application's is kept, the library's dropped, in a task too."""
    import os

    import sqlalchemy.orm.session

    _stack.register_library(os.path.dirname(sqlalchemy.__file__ or ""))
    filename = "<string>"
    library: dict[str, Any] = {"__name__": sqlalchemy.orm.session.__name__}
    exec(compile("def lib(fn, limit):\n    return fn(limit)\n", filename, "exec"), library)
    user: dict[str, Any] = {"__name__": "__main__", "_stack": _stack, "asyncio": asyncio}
    source = "def app(limit):\n    return _stack.capture(limit, 1, asyncio.current_task())\n"
    exec(compile(source, filename, "exec"), user)

    async def in_task() -> _stack.RawStack:
        # the library's frame calls the application's: both "<string>", one file name object
        raw: _stack.RawStack = library["lib"](user["app"], 10)
        return raw

    for _ in range(2):  # the second time, every verdict is cached
        raw = asyncio.run(in_task())
        assert raw[0] is user["app"].__code__
        assert library["lib"].__code__ not in raw[0::2]  # not recorded (nor shown)


def _both(limit: int, task: Any = None) -> tuple[_stack.RawStack, _stack.RawStack]:
    """The same frames captured by the C walk and by the Python walk, from the same line."""
    fast = _stack._fast
    try:
        # C first: after the caches are cleared, it meets frames only Python can judge.
        _stack._fast = _stack._load_speedups()
        c = _stack.capture(limit, 2, task)
        _stack._fast = None
        python = _stack.capture(limit, 2, task)
    finally:
        _stack._fast = fast
    return python, c


@pytest.mark.parametrize("walk", ["c"], indirect=True)
def test_c_walk_records_what_the_python_walk_records(walk: str) -> None:
    """Thread and task walks, a limit that cuts, frames of a pseudo-file and of a file seen
    for the first time (which the C walk hands back to Python): the same pairs."""
    generated: Any = _generated("__main__", "<string>")
    del generated  # compiled only so that a pseudo-file verdict is cached for "__main__"
    _stack._skip_cache.clear()
    for limit in (1, 5, 40):
        python, c = _both(limit)
        assert python == c
        assert len(c) == 2 * min(limit, len(_stack.walk(sys._getframe())))

    async def in_task() -> tuple[_stack.RawStack, _stack.RawStack]:
        return _both(40, asyncio.current_task())

    python, c = asyncio.run(in_task())
    assert python == c
    assert _stack.format_raw(c)[-1].endswith("in in_task")
    # The task walk reads interpreter frames (3.11+) and makes a frame object only for one it
    # hands back: after the caches are cleared, every file is such a frame once.
    _stack._skip_cache.clear()
    python, c = asyncio.run(in_task())
    assert python == c
    assert _stack.format_raw(c)[-1].endswith("in in_task")


@pytest.mark.parametrize("walk", ["c"], indirect=True)
def test_c_task_capture_matches_python_across_greenlets_and_c_level_sends(walk: str) -> None:
    """The C task capture crosses a greenlet boundary itself and asks Python to merge the
    task's chain only where a C-level ``send`` hid a frame: both give the Python walk's pairs."""
    greenlet = pytest.importorskip("greenlet")
    fast = _stack._fast
    if fast is None:
        pytest.skip(
            "pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: only "
            "the Python capture runs, which the other stack tests check"
        )
    pairs: dict[Any, tuple[_stack.RawStack, _stack.RawStack]] = {}
    direct: dict[str, Any] = {}

    def in_child() -> None:
        task = asyncio.current_task()
        for limit in (1, 3, 40):
            pairs["greenlet", limit] = _both(limit, task)
        direct["greenlet"] = fast.capture_task(sys._getframe(), 40, task)

    class Awaitable:
        def __await__(self):  # type: ignore[no-untyped-def]
            return inner().__await__()

    async def inner() -> None:
        await asyncio.sleep(0)
        task = asyncio.current_task()
        for limit in (1, 3, 40):
            pairs["send", limit] = _both(limit, task)
        direct["send"] = fast.capture_task(sys._getframe(), 40, task)

    async def main() -> None:
        greenlet.greenlet(in_child).switch()  # CROSSED
        await Awaitable()  # SENT

    asyncio.run(main())
    assert len(pairs) == 6
    for key, (python, c) in pairs.items():
        assert python == c, key
    # Not handed back to Python (None): the C code took both stacks itself.
    assert _stack.format_raw(direct["greenlet"])[-1].endswith("in in_child")
    assert_site(_stack.format_raw(direct["greenlet"])[:-1], "CROSSED")
    assert _stack.format_raw(direct["send"])[-1].endswith("in inner")
    assert_site(_stack.format_raw(direct["send"])[:-1], "SENT")


_SYNC_CHECKOUT_IN_A_TASK = """
import asyncio, sys
import pgleak
from pgleak._core import core

pgleak.install(leak_threshold=60)

class Pool: pass
class Conn: pass

handle = core.pool(Pool(), "toy")

async def body():
    conns = [Conn() for _ in range(2000)]
    names = set()
    for conn in conns:
        lease = core.checkout(handle, conn, True, None)
        names.add(lease.task[1])
        core.checkin(lease)
    return names

print(sorted(asyncio.run(body())))
"""


def test_a_checkout_straight_from_a_task_body_does_not_ask_a_running_coroutine(
    walk: str,
) -> None:
    """A sync checkout made from a task's coroutine body (a blocking pool used in async code):
    the chain walk must not ask the running coroutine for ``cr_await``. Up to 3.11 CPython's
    getter then reads the call's inline cache as the next instruction and, when its bytes
    read as a RESUME, takes the top of the value stack for the awaited object: the process
    died within 200 checkouts (the C walk's bytes hit it; the Python walk's did not, by
    luck). In a child process, so that a crash fails this test rather than the run."""
    import os
    import subprocess

    env = dict(os.environ)
    if walk == "python":
        env["PGLEAK_NO_SPEEDUPS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _SYNC_CHECKOUT_IN_A_TASK],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['Task-1']"
