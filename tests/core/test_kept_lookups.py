"""What the C wrappers keep between checkouts to skip a lookup (the pool's handle, the int a
connection is filed under, a slotted holder's attributes) changes no answer: many pools in
turn, a pool collected and another made, a handle whose ``ref`` was replaced, a pool that
cannot be weakly referenced, more connections out at once than the kept keys, and asyncpg's
holder read as ``getattr(holder, name, None)`` reads it."""

from __future__ import annotations

import asyncio
import gc
import types
from typing import Any

import pytest

pytest.importorskip("asyncpg")

import pgleak
from pgleak import _adapter, _guard, _stack
from pgleak._core import core
from pgleak.integrations import asyncpg as apg_adapter
from tests.core.test_c_wrappers import AsyncToy, AsyncToyPool, Conn, Timeout, Toy, ToyPool

pytestmark = pytest.mark.skipif(
    getattr(_stack._fast, "Tracked", None) is None,
    reason="pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off",
)


class NoRefPool:
    """``ToyPool`` without ``__weakref__``: its handle holds it (asyncpg's Pool is such)."""

    __slots__ = ("free", "lent", "timeout")

    __init__ = ToyPool.__init__
    getconn = ToyPool.getconn
    putconn = ToyPool.putconn


class NoRefToy(_adapter.Adapter):
    name = "noref_toy"
    distribution = "no-such-distribution-pgleak-toy"

    def _install(self) -> None:
        self.track_acquire(
            NoRefPool,
            "getconn",
            namer=lambda pool: "noref pool",
            is_timeout=lambda err: isinstance(err, Timeout),
            give_back="putconn",
        )
        self.track_release(NoRefPool, "putconn")


def _filed(lease: Any, pool: Any) -> tuple[bool, bool, bool]:
    """The lease's handle is the pool's, the one the core files it under, and the lease is
    filed under its connection."""
    conn = lease.ref()
    return (
        lease.pool.ref() is pool,
        core._pools.get(id(pool)) is lease.pool,
        core.by_conn.get(id(conn)) is lease,
    )


def _by_connection() -> dict[int, Any]:
    """The open leases by ``id()`` of their connection."""
    out: dict[int, Any] = {}
    for lease in core.leases.values():
        ref: Any = lease.ref
        out[id(ref())] = lease
    return out


def _scenario() -> list[Any]:
    out: list[Any] = []
    pools = [ToyPool(12) for _ in range(3)]
    norefs = [NoRefPool(4) for _ in range(2)]
    held: list[tuple[Any, Any]] = []
    # pools in turn, more connections out at once than the kept keys (8)
    for i in range(12):
        pool = pools[i % 3]
        conn = pool.getconn()
        held.append((pool, conn))
    for i in range(4):
        pool = norefs[i % 2]
        held.append((pool, pool.getconn()))
    leases = _by_connection()
    out.append([_filed(leases[id(conn)], pool) for pool, conn in held])
    for pool, conn in reversed(held):
        pool.putconn(conn)
    out.append(("after the checkins", len(core.leases), len(core.by_conn)))
    # a handle whose ref was replaced: the next checkout's pool gets a handle of its own
    old = core._pools[id(pools[0])]
    old.ref = lambda: None
    conn = pools[0].getconn()
    [lease] = core.leases.values()
    out.append(("replaced ref", lease.pool is not old, _filed(lease, pools[0])))
    pools[0].putconn(conn)
    # a pool collected, another made (perhaps at the same address)
    gone = ToyPool(1)
    conn = gone.getconn()
    gone.putconn(conn)
    del gone, conn
    gc.collect()
    fresh = ToyPool(1)
    conn = fresh.getconn()
    [lease] = core.leases.values()
    out.append(("fresh pool", _filed(lease, fresh)))
    fresh.putconn(conn)
    out.append(("at the end", len(core.leases), len(core.by_conn)))
    return out


@pytest.fixture
def leak_threshold() -> float:
    return 60.0


@pytest.fixture
def run(installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    def run(c: bool) -> list[Any]:
        monkeypatch.setattr(_adapter, "use_c_wrappers", c)
        toys = [Toy(), NoRefToy()]
        for toy in toys:
            toy.install()
        try:
            wanted = _stack._fast.Tracked if c else types.FunctionType
            assert type(ToyPool.__dict__["getconn"]) is wanted
            assert type(NoRefPool.__dict__["getconn"]) is wanted
            return _scenario()
        finally:
            for toy in toys:
                toy.uninstall()
            _guard.reset()
            core.leases.clear()
            core.by_conn.clear()

    return run


def test_kept_handles_and_keys_change_no_answer(run: Any) -> None:
    python, c = run(False), run(True)
    assert c == python
    assert all(all(filed) for filed in c[0])
    assert c[1] == ("after the checkins", 0, 0)
    assert c[2] == ("replaced ref", True, (True, True, True))
    assert c[3] == ("fresh pool", (True, True, True))


def test_kept_handles_on_the_asyncio_path(installed: pgleak.Settings) -> None:
    toy = AsyncToy()
    toy.install()
    try:
        assert type(AsyncToyPool.__dict__["getconn"]) is _stack._fast.Tracked

        async def main() -> list[Any]:
            pools = [AsyncToyPool(6) for _ in range(3)]
            held = [(pools[i % 3], await pools[i % 3].getconn()) for i in range(12)]
            leases = _by_connection()
            filed = [_filed(leases[id(conn)], pool) for pool, conn in held]
            for pool, conn in held:
                await pool.putconn(conn)
            return [filed, len(core.leases), len(core.by_conn)]

        filed, left, indexed = asyncio.run(main())
        assert all(all(f) for f in filed)
        assert (left, indexed) == (0, 0)
    finally:
        toy.uninstall()
        _guard.reset()
        core.leases.clear()
        core.by_conn.clear()


# -- asyncpg's holder, read as getattr(holder, name, None) -----------------------------------


class Holder:
    __slots__ = ("_con", "_in_use")


class LooseHolder(Holder):
    """An unset ``_in_use`` slot answered by ``__getattr__``, as the generic read does."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name == "_in_use":
            return True
        raise AttributeError(name)


class DictHolder:
    def __init__(self) -> None:
        self._con: Any = None


def _checked_in(make: Any, in_use: Any, con_set: bool) -> bool:
    released: list[Any] = []

    def _release(holder: Any) -> None:
        released.append(holder)

    wrapper = apg_adapter._wrap_release(_release)
    assert type(wrapper) is _stack._fast.Tracked
    conn = Conn()
    lease = core.checkout(core.pool(released, "toy"), conn, True)
    assert lease is not None
    holder = make()
    if con_set:
        holder._con = conn
    if in_use is not None:
        holder._in_use = in_use
    assert wrapper(holder) is None
    assert released == [holder]
    back = lease.id not in core.leases
    core.checkin(lease)
    return back


@pytest.mark.parametrize(
    ("make", "in_use", "con_set", "back"),
    [
        (Holder, object(), True, True),
        (Holder, None, True, False),  # the slot unset: getattr's default
        (Holder, object(), False, False),  # no connection in the slot
        (LooseHolder, None, True, True),  # unset, but __getattr__ answers
        (DictHolder, object(), True, True),  # not slotted: the generic read
        (DictHolder, None, True, False),
    ],
)
def test_the_holder_is_read_as_getattr_reads_it(
    installed: pgleak.Settings, make: Any, in_use: Any, con_set: bool, back: bool
) -> None:
    assert _checked_in(make, in_use, con_set) is back


def test_a_holder_class_changed_after_its_slots_were_kept_is_read_anew(
    installed: pgleak.Settings,
) -> None:
    """The holder's ``_in_use`` and ``_con`` slots are read there while its class is unchanged
    since they were found; a property put in the slot's place (or one taken away) is read as
    ``getattr`` reads it, as often, from the next checkin on."""

    class KeptHolder:
        __slots__ = ("_con", "_in_use")

    slot = KeptHolder.__dict__["_in_use"]
    assert _checked_in(KeptHolder, object(), True) is True
    assert _checked_in(KeptHolder, object(), True) is True  # the kept slots
    reads: list[str] = []

    def not_in_use(self: Any) -> Any:
        reads.append("_in_use")
        return None

    def in_use_in_the_slot() -> KeptHolder:
        holder = KeptHolder()
        slot.__set__(holder, object())  # what a read of the slot would find
        return holder

    setattr(KeptHolder, "_in_use", property(not_in_use))  # noqa: B010 - a slot's name
    assert _checked_in(in_use_in_the_slot, None, True) is False
    assert reads == ["_in_use"]
    setattr(KeptHolder, "_in_use", slot)  # noqa: B010
    assert _checked_in(KeptHolder, object(), True) is True
    assert _checked_in(KeptHolder, None, True) is False  # the slot unset: absent
