"""Stack capture: cheap at checkout, formatted only when a report is written.

A checkout happens thousands of times a second; a report almost never. So the hot path keeps
only ``(code object, f_lasti)`` pairs - no frame objects (which would keep every local alive),
no line numbers (``f_lineno`` costs a table walk per frame), no strings - and the line is
recovered from ``co_lines()`` at report time.

Frames are dropped when they belong to pgleak, to a pool library an adapter registered, or to
stdlib plumbing (``contextlib``, ``asyncio``, ``threading``), so the newest frame kept is the
user's own line: ``with engine.begin()`` goes through ``contextlib`` and a dozen SQLAlchemy
frames before it reaches the pool, and none of them answers "which line leaked?".

Servers' and frameworks' dispatch frames (socketserver, werkzeug, gunicorn, Django's handlers,
...) outside the user's code are recorded, but formatting folds each run of them into one
``... 13 frames of werkzeug, socketserver omitted`` line (``keep_framework_frames`` shows them):
which they are is judged at report time, from the directories of the frameworks imported, so
the checkout pays nothing for it.

Code a library generates at run time (SQLAlchemy's decorators: ``<sqlalchemy generated ...>``
on 2.1, ``<string>`` on 2.0) has a pseudo-file name that says nothing of who made it; such a
frame is judged by the module whose globals it runs in, so it counts as its library's frame.
The frame is only at hand during capture, so those verdicts are remembered per code object for
formatting later.

SQLAlchemy's asyncio mode runs pool code in a greenlet whose stack ends at the greenlet
boundary; the user's coroutine is on the other side, in the suspended parent greenlet. The walk
continues into the parent's frame (``gr_frame``) so async checkouts also name the user's line.

The walk itself runs in C when ``pgleak._speedups`` was built (a pointer walk instead of
~100 ns of bytecode per frame, the largest part of a checkout's cost). It only reads the
verdict caches kept here and hands any frame they do not know back to the Python code below,
which judges it: one definition of which frames count, and the same stacks either way.
``PGLEAK_NO_SPEEDUPS=1`` (read at import) runs everything in Python.
"""

from __future__ import annotations

import gc
import os
import sys
import sysconfig
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any

__all__ = [
    "RawStack",
    "capture",
    "format_frames",
    "format_raw",
    "keep_framework_frames",
    "register_library",
    "site",
    "task_frames",
]

#: ``(code, lasti, code, lasti, ...)``, newest frame first.
RawStack = tuple[Any, ...]

_EMPTY: RawStack = ()


def _load_speedups() -> Any:
    if os.environ.get("PGLEAK_NO_SPEEDUPS", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from pgleak import _speedups  # type: ignore[attr-defined]
    except ImportError:  # built without a compiler: the Python walk below does the same
        return None
    return _speedups


#: The C walk (``capture``, ``walk``), or ``None``.
_fast: Any = _load_speedups()

_skip_prefixes: list[str] = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
_stdlib = sysconfig.get_paths().get("stdlib", "")
_STDLIB_PLUMBING = tuple(
    os.path.join(_stdlib, name)
    for name in (
        "contextlib.py",
        "asyncio" + os.sep,
        "threading.py",
        "concurrent" + os.sep,
        "runpy.py",
        "selectors.py",
    )
)
# filename -> drop?  Grows with the number of distinct source files that check out, which is
# bounded by the program's size; a bool per file keeps the hot path at one dict lookup per frame.
_skip_cache: dict[str, int] = {}


def register_library(path: str | os.PathLike[str]) -> None:
    """Drop frames from files under ``path`` (a package directory) from every stack.

    Adapters call this with their library's directory: its frames say how the pool works, not
    who took the connection.
    """
    prefix = os.path.abspath(os.fspath(path))
    prefix = prefix if prefix.endswith(os.sep) else prefix + os.sep
    if prefix not in _skip_prefixes:
        _skip_prefixes.append(prefix)
        _skip_cache.clear()


#: Verdicts: keep the frame; drop it; drop it and stop (the event loop: what is below it is
#: not the task's); ask the frame's module (a pseudo-file: truthy, so the hot loop's "keep?"
#: test stays one truth test, and only dropped frames pay a second comparison).
_KEEP, _SKIP, _SKIP_LOOP, _BY_MODULE = 0, 1, 2, -1
_ASYNCIO_DIR = os.path.join(_stdlib, "asyncio") + os.sep
#: module name -> verdict, for frames of pseudo-files (bounded like ``_skip_cache``).
_module_cache: dict[str, int] = {}
#: id(code) -> (code, verdict) for pseudo-file code seen at capture, where the frame (and so
#: its module) was at hand; formatting has only the code. The code is kept to tell a reused id.
_pseudo_codes: dict[int, tuple[CodeType, int]] = {}


def _classify(filename: str) -> int:
    if filename.startswith("<"):
        verdict = _BY_MODULE
        if len(_skip_cache) < 100_000:
            _skip_cache[filename] = verdict
        return verdict
    absolute = os.path.abspath(filename) if filename else filename
    if absolute.startswith(_ASYNCIO_DIR):
        verdict = _SKIP_LOOP
    elif absolute.startswith(tuple(_skip_prefixes)) or absolute.startswith(_STDLIB_PLUMBING):
        verdict = _SKIP
    else:
        verdict = _KEEP
    if len(_skip_cache) < 100_000:
        _skip_cache[filename] = verdict
    return verdict


def _parent_greenlet_frame(state: list[Any]) -> FrameType | None:
    """The suspended frame of the greenlet that switched into the current one, if any."""
    greenlet_mod = sys.modules.get("greenlet")
    if greenlet_mod is None:
        return None
    current = state[0] if state else greenlet_mod.getcurrent()
    parent = getattr(current, "parent", None)
    if parent is None:
        return None
    if state:
        state[0] = parent
    else:
        state.append(parent)
    frame: FrameType | None = getattr(parent, "gr_frame", None)
    return frame


def _verdict(filename: str) -> int:
    verdict = _skip_cache.get(filename)
    return _classify(filename) if verdict is None else verdict


def _module_verdict(frame: FrameType) -> int:
    """The verdict for a pseudo-file frame: that of the file of the module it runs in.

    ``python -c`` and ``exec`` in the application run in ``__main__`` or the user's module and
    are kept; a library's generated wrappers run in the library's module and are dropped.
    """
    code = frame.f_code
    name = frame.f_globals.get("__name__")
    verdict = _module_cache.get(name) if isinstance(name, str) else _KEEP
    if verdict is None:
        filename = getattr(sys.modules.get(name), "__file__", None)  # type: ignore[arg-type]
        verdict = _KEEP
        if isinstance(filename, str) and not filename.startswith("<"):
            verdict = _SKIP if _verdict(filename) else _KEEP
        if len(_module_cache) < 10_000:
            _module_cache[name] = verdict  # type: ignore[index]
    if len(_pseudo_codes) < 100_000:
        _pseudo_codes[id(code)] = (code, verdict)
    return verdict


def _frame_verdict(frame: FrameType) -> int:
    verdict = _verdict(frame.f_code.co_filename)
    return _module_verdict(frame) if verdict == _BY_MODULE else verdict


def _code_verdict(code: CodeType) -> int:
    """A recorded frame's verdict; pseudo-file code by what capture learnt of its module."""
    verdict = _verdict(code.co_filename)
    if verdict == _BY_MODULE:
        seen = _pseudo_codes.get(id(code))
        return seen[1] if seen is not None and seen[0] is code else _KEEP
    return verdict


def capture(limit: int, start: int = 1, task: Any = None, thorough: bool = False) -> RawStack:
    """Up to ``limit`` frames from the user's checkout line outwards, as raw pairs.

    Library and pgleak frames *newer* than the user's line are skipped here; any met further
    out are kept raw and dropped by :func:`format_raw`, because classifying every frame costs
    as much again as recording it, and this runs on every checkout.

    Args:
        limit: How many frames to record, starting at the user's line.
        start: Frames to skip outright (the caller's own).
        task: The asyncio task running, if any. SQLAlchemy's asyncio mode runs pool code in a
            greenlet whose stack ends at the greenlet boundary, so the walk continues in the
            suspended parent greenlet. And a coroutine resumed through a C-level ``send`` (an
            ``__await__`` wrapper, an async generator's ``asend``) has no ``f_back`` link to the
            coroutine awaiting it; the task's coroutine chain fills that gap.
        thorough: Also follow the task's chain where Python 3.12+ hides it (see
            :func:`_awaited`); costs a few ``gc.get_referents`` calls, so only rare reports
            (a pool that ran dry) ask for it.
    """
    try:
        frame: FrameType | None = sys._getframe(start)
    except ValueError:
        return _EMPTY
    if task is not None:
        fast = _fast
        if fast is not None and not thorough:
            raw: RawStack | None = fast.capture_task(frame, limit, task)
            if raw is not None:
                return raw
        return _capture_in_task(frame, limit, task, thorough)
    return capture_from(frame, limit)


def capture_from(frame: FrameType | None, limit: int) -> RawStack:
    """:func:`capture` in a thread, from ``frame`` (the checkout's caller) outwards."""
    cache = _skip_cache
    fast = _fast
    if fast is not None and frame is not None:
        raw: RawStack | None = fast.capture(frame, limit, cache, _pseudo_codes)
        if raw is not None:
            return raw
    while frame is not None:
        verdict = cache.get(frame.f_code.co_filename)
        if verdict is None:
            verdict = _classify(frame.f_code.co_filename)
        if not verdict or (verdict < 0 and not _module_verdict(frame)):
            break
        frame = frame.f_back
    out: list[Any] = []
    append = out.append
    while frame is not None and limit > 0:
        append(frame.f_code)
        append(frame.f_lasti)
        limit -= 1
        frame = frame.f_back
    return tuple(out)


def _capture_in_task(frame: FrameType | None, limit: int, task: Any, thorough: bool) -> RawStack:
    out: list[Any] = []
    append = out.append
    loop_at = -1
    greenlets: list[Any] = []
    hops = 0
    cache = _skip_cache
    fast = _fast
    while frame is not None:
        if fast is not None:
            # As far as the caches know: stops at the loop, at the end, when full, or at a
            # frame to judge here (status 3), which the step below judges.
            status, frame = fast.walk(frame, limit, cache, _pseudo_codes, out)
            if status == 0:
                return tuple(out)
            if status == 2:
                loop_at = len(out)
                break
        if frame is not None:
            # _frame_verdict(), inlined: this runs for every frame of every asyncio checkout
            # (in Python: the C walk hands over only frames it has no verdict for).
            verdict = cache.get(frame.f_code.co_filename)
            if verdict is None:
                verdict = _classify(frame.f_code.co_filename)
            if verdict < 0:
                verdict = _module_verdict(frame)
            if not verdict:
                append(frame.f_code)
                append(frame.f_lasti)
                if len(out) >= 2 * limit:
                    return tuple(out)
            elif verdict == _SKIP_LOOP:
                # Below the loop are only asyncio.run() and its callers; the coroutines the
                # loop is running come from the task itself.
                loop_at = len(out)
                break
            frame = frame.f_back
        if frame is None:
            if len(out) >= 2 * limit:
                return tuple(out)
            if hops < 8:
                hops += 1
                frame = _parent_greenlet_frame(greenlets)
    _add_task_chain(out, task, loop_at, thorough)
    del out[2 * limit :]
    return tuple(out)


#: On 3.11 a running coroutine's ``cr_await`` is not asked. CPython's getter reads the
#: instruction after the running one, which after a call is the call's inline cache (3.11 is
#: the one version with inline caches that reads it while the frame runs); when its bytes read
#: as a RESUME it takes the top of the running value stack for the awaited object and can
#: crash the process (a sync checkout straight from a task's coroutine body did). At an
#: ``await`` (the only place a running 3.11 coroutine has something to answer) the next
#: instruction is a YIELD_VALUE and the answer is None anyway. 3.10 reads real instructions
#: (and answers for a coroutine running an ``await``, which the walk needs). 3.12 (3.12.1 at
#: least) reads the same cache when the running frame is at a ``SEND`` into a C awaitable
#: (pgleak's own, around an asyncpg block while an observer runs) and crashed there too; it
#: answers None for a running coroutine otherwise: not asked either. 3.13 reads only a
#: suspended frame.
_RUNNING_AWAIT_UNSAFE = sys.version_info[:2] in ((3, 11), (3, 12))


def _awaited(coro: Any, thorough: bool) -> Any:
    """What ``coro`` is awaiting, or ``None``.

    ``cr_await`` answers for a suspended coroutine. A coroutine that is running - as every
    coroutine in the current task's chain is, at a checkout - answers ``None`` on Python 3.12+,
    although the object it delegates to sits on its value stack, which ``gc.get_referents``
    shows: the running coroutine among them is the next link. Wrappers without a frame of their
    own (``__await__`` objects) are looked through the same way.
    """
    running = getattr(coro, "cr_running", False) or getattr(coro, "gi_running", False)
    if running and _RUNNING_AWAIT_UNSAFE:
        nxt = None  # not asked: see _RUNNING_AWAIT_UNSAFE
    else:
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if nxt is not None or not thorough:
        return nxt
    if not running:
        return None
    for _ in range(3):  # a coroutine, or up to two frameless wrappers around one
        found = None
        for ref in gc.get_referents(coro):
            if ref is coro:
                continue
            if getattr(ref, "cr_running", False) or getattr(ref, "gi_running", False):
                return ref
            if found is None and type(ref).__name__ in _WRAPPERS:
                found = ref
        if found is None:
            return None
        coro = found
    return None


_WRAPPERS = frozenset({"coroutine_wrapper", "async_generator_asend", "async_generator_athrow"})


def _add_task_chain(out: list[Any], task: Any, loop_at: int, thorough: bool = False) -> None:
    """Put the task's coroutine frames into ``out`` where the ``f_back`` walk lost them.

    The frames the walk did see are a subset of the chain, in the right order, and everything
    the walk saw newer than the newest of them was called by the chain's innermost coroutine.
    So the chain's frames are taken out of ``out`` and the whole chain is put back, newest
    first, where the newest of them stood (or where the walk met the event loop). Code objects
    are compared by identity: hashing or comparing them walks their bytecode.
    """
    try:
        coro = task.get_coro()
        fast = _fast
        if (
            not thorough
            and fast is not None
            and fast.chain_complete(out, coro, _skip_cache, _pseudo_codes)
        ):
            return  # the walk saw every frame of the chain: nearly always
        chain: list[Any] = []
        ids: set[int] = set()
        depth = 0
        while coro is not None and depth < 64:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is None:
                break
            code = frame.f_code
            if not _frame_verdict(frame):
                chain.append(code)
                chain.append(frame.f_lasti)
                ids.add(id(code))
            coro = _awaited(coro, thorough)
            depth += 1
        if not chain:
            return
        present = [i for i in range(0, len(out), 2) if id(out[i]) in ids]
        if 2 * len(present) >= len(chain):
            return
        at = present[0] if present else (loop_at if loop_at >= 0 else len(out))
        for i in reversed(present):
            del out[i : i + 2]
        flat: list[Any] = []
        for i in range(len(chain) - 2, -1, -2):
            flat.append(chain[i])
            flat.append(chain[i + 1])
        out[at:at] = flat
    except Exception:  # a best-effort completion; the walk's own frames stand
        return


def _lineno(code: CodeType, lasti: int) -> int:
    if lasti >= 0:
        for start, end, line in code.co_lines():
            if start <= lasti < end and line is not None:
                return line
    return code.co_firstlineno


def _entry(filename: str, lineno: int, name: str) -> str:
    return f"{filename}:{lineno} in {name}"


#: Servers' and frameworks' dispatch machinery: what runs a request or a job, not what it does.
#: A Flask dev-server request has ~13 of these frames outside the user's view function. Named by
#: module; a package covers its directory. Looked up in ``sys.modules`` only (a frame of a module
#: means it was imported), so nothing is imported for this.
_FRAMEWORKS = (
    "socketserver",
    "http.server",
    "wsgiref",
    "werkzeug",
    "flask",
    "gunicorn",
    "uvicorn",
    "starlette",
    "fastapi",
    "anyio",
    "asgiref",
    "hypercorn",
    "waitress",
    "gevent",
    "eventlet",
    "django.core.handlers",
    "django.core.servers",
    "django.utils.deprecation",
    "django.contrib.staticfiles.handlers",
    "celery.app.trace",
    "celery.worker",
    "celery.concurrency",
    "celery.bootsteps",
    "billiard",
    "kombu",
)
#: filename -> the framework it belongs to, or "" (bounded like ``_skip_cache``).
_framework_cache: dict[str, str] = {}
#: ((path prefix or file, label), ...) from the frameworks imported when it was built, and
#: ``len(sys.modules)`` then: rebuilt when modules have been imported since.
_framework_table: list[Any] = [(), -1]
#: ``keep_framework_frames``: show those frames instead of counting them.
_keep_frameworks = False


def keep_framework_frames(keep: bool) -> None:
    """Show (True) or count (False, the default) framework frames in formatted stacks."""
    global _keep_frameworks
    _keep_frameworks = keep


def _framework_prefixes() -> tuple[tuple[str, str], ...]:
    table, size = _framework_table
    if size == len(sys.modules):
        return table  # type: ignore[no-any-return]
    found: list[tuple[str, str]] = []
    for name in _FRAMEWORKS:
        filename = getattr(sys.modules.get(name), "__file__", None)
        if not isinstance(filename, str) or filename.startswith("<"):
            continue
        filename = os.path.abspath(filename)
        if os.path.basename(filename).startswith("__init__."):
            filename = os.path.dirname(filename) + os.sep
        found.append((filename, name if name == "http.server" else name.partition(".")[0]))
    _framework_table[:] = [tuple(found), len(sys.modules)]
    return tuple(found)


def _framework(filename: str) -> str:
    """The framework whose dispatch machinery ``filename`` is part of, or ""."""
    label = _framework_cache.get(filename)
    if label is None:
        label = ""
        absolute = os.path.abspath(filename) if filename and not filename.startswith("<") else ""
        for prefix, name in _framework_prefixes() if absolute else ():
            if absolute == prefix or (prefix.endswith(os.sep) and absolute.startswith(prefix)):
                label = name
                break
        if len(_framework_cache) < 100_000:
            _framework_cache[filename] = label
    return label


#: Of a stack of framework frames only, the newest frames shown.
_NEWEST_KEPT = 3


def _fold_frameworks(entries: list[tuple[str, str]]) -> list[str]:
    """Formatted entries, oldest first, with each run of framework frames as one line.

    ``entries`` are ``(framework or "", formatted frame)``. Only frames older than the newest
    frame that is not a framework's are folded: those ran the user's code. A stack of framework
    frames only (a holder blocked in the server's ``write``, between two of the user's
    generator steps) keeps its newest few: where it is stuck is the news.
    """
    if _keep_frameworks:
        return [text for _, text in entries]
    newest_own = max((i for i, (fw, _) in enumerate(entries) if not fw), default=-1)
    if newest_own < 0:
        newest_own = len(entries) - _NEWEST_KEPT if len(entries) > _NEWEST_KEPT + 1 else 0
    out: list[str] = []
    run: list[str] = []
    for i, (fw, text) in enumerate(entries):
        if fw and i < newest_own:
            run.append(fw)
            continue
        if run:
            out.append(_omitted(run))
            run = []
        out.append(text)
    return out


def _omitted(run: list[str]) -> str:
    names = ", ".join(dict.fromkeys(run))
    return f"... {len(run)} frame{'s' if len(run) > 1 else ''} of {names} omitted"


def format_raw(raw: RawStack) -> list[str]:
    """``"file:line in function"`` strings, oldest first (newest last, like a traceback).

    Library, pgleak and stdlib-plumbing frames recorded among the user's are dropped here;
    servers' and frameworks' dispatch frames outside the user's are counted in one line per run.
    """
    entries = [
        (
            _framework(raw[i].co_filename),
            _entry(raw[i].co_filename, _lineno(raw[i], raw[i + 1]), raw[i].co_name),
        )
        for i in range(0, len(raw) - 1, 2)
        if not _code_verdict(raw[i])
    ]
    entries.reverse()
    return _fold_frameworks(entries)


#: (id(code), lasti) -> (code, (file, line, function)); the code object is kept to tell a
#: reused id from the same code. Bounded: a program has only so many checkout lines.
_site_cache: dict[tuple[int, int], tuple[CodeType, tuple[str, int, str]]] = {}


def site(raw: RawStack) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the user's checkout line in ``raw``, or ``None``.

    Called for every traced checkout (its span's ``code.*`` attributes), so the answer is
    cached per (code, offset): finding a line walks the code's line table.
    """
    for i in range(0, len(raw) - 1, 2):
        code, lasti = raw[i], raw[i + 1]
        hit = _site_cache.get((id(code), lasti))
        if hit is not None and hit[0] is code:
            return hit[1]
        if _code_verdict(code):
            continue
        found = (code.co_filename, _lineno(code, lasti), getattr(code, "co_qualname", code.co_name))
        if len(_site_cache) < 10_000:
            _site_cache[(id(code), lasti)] = (code, found)
        return found
    return None


def format_frames(frames: Iterable[FrameType], limit: int, *, newest_first: bool) -> list[str]:
    """Format live frames (a holder's current position), dropping the same frames as capture."""
    kept: list[tuple[str, str]] = []
    for frame in frames:
        if not _frame_verdict(frame):
            code = frame.f_code
            kept.append(
                (
                    _framework(code.co_filename),
                    _entry(code.co_filename, frame.f_lineno, code.co_name),
                )
            )
    if newest_first:
        kept = kept[:limit]
        kept.reverse()
    else:
        kept = kept[-limit:]
    return _fold_frameworks(kept)


def task_frames(task: Any, limit: int = 200) -> list[FrameType]:
    """A suspended task's frames, oldest first: its coroutine and every one it awaits.

    ``Task.get_stack()`` gives only the outermost coroutine's frame on Python 3.11 (and its
    docs say as much): a connection held across ``await fetch_rates()`` would show the line of
    that call, not where inside the helper the task waits. The ``cr_await`` chain (and async
    generators' ``ag_await``) leads there.
    """
    frames: list[FrameType] = []
    coro = task.get_coro()
    for _ in range(2 * limit):  # frameless links (``__await__`` wrappers) count too
        if coro is None or len(frames) >= limit:
            break
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is not None:
            frames.append(frame)
        nxt = _awaited(coro, False) or getattr(coro, "ag_await", None)
        if nxt is None and frame is None:
            break
        coro = nxt
    return frames


def walk(frame: FrameType | None, limit: int = 200) -> list[FrameType]:
    """A thread's frames from ``frame`` outwards, newest first, bounded."""
    frames: list[FrameType] = []
    while frame is not None and len(frames) < limit:
        frames.append(frame)
        frame = frame.f_back
    return frames
