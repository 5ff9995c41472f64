"""What every adapter shares: exact patching and un-patching, listeners, a version check.

An adapter's own module only says which of its library's events mean "checkout", "checkin",
"discarded", "exhausted" and "closed", and forwards them to the core. The bookkeeping that makes
``install()`` idempotent and ``uninstall()`` exact lives here, once:

* each patch is recorded as (owner, attribute, what was in the owner's ``__dict__``, wrapper);
  uninstall puts back exactly that object, or deletes the attribute if the owner had inherited
  it, and leaves alone (with a warning) an attribute someone re-wrapped after us;
* each listener is recorded with a callable that removes it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any, ClassVar

__all__ = ["Adapter", "AdapterUnavailable"]

_log = logging.getLogger("pgleak")
_MISSING = object()


class AdapterUnavailable(RuntimeError):
    """The adapter's library is not installed, or is a version pgleak does not support."""

    __module__ = "pgleak"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


class Adapter:
    """Base class of the per-library adapters; subclasses implement ``_install``.

    Attributes:
        name: The adapter's name in ``integrations=`` and in reports.
        module: The top-level module whose import makes the adapter installable.
        distribution: The PyPI distribution whose version is checked.
        min_version: The oldest supported version.
    """

    name: ClassVar[str]
    module: ClassVar[str]
    distribution: ClassVar[str]
    min_version: ClassVar[tuple[int, ...]] = ()

    def __init__(self) -> None:
        self._patches: list[tuple[Any, str, Any, Any]] = []
        self._undo: list[Callable[[], None]] = []
        self.installed = False

    def check_version(self) -> None:
        try:
            version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return  # vendored or renamed; trust the import
        if self.min_version and _version_tuple(version) < self.min_version:
            wanted = ".".join(map(str, self.min_version))
            raise AdapterUnavailable(
                f"{self.distribution} {version} is older than pgleak supports (>= {wanted})"
            )

    def install(self) -> None:
        if self.installed:
            return
        self.check_version()
        try:
            self._install()
        except BaseException:
            self.uninstall()
            raise
        self.installed = True

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # a library that refuses to remove a listener
                _log.warning("pgleak: could not remove a %s hook: %s", self.name, exc)
        self._undo.clear()
        for owner, attr, original, wrapper in reversed(self._patches):
            current = owner.__dict__.get(attr, _MISSING)
            if current is not wrapper:
                _log.warning(
                    "pgleak: %s.%s was replaced after pgleak patched it; leaving it as it is",
                    getattr(owner, "__qualname__", owner),
                    attr,
                )
                continue
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._patches.clear()
        self.installed = False

    # -- helpers for subclasses --------------------------------------------------------------

    def _install(self) -> None:
        raise NotImplementedError

    def patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        """Replace ``owner.attr`` with ``make(original)``, to be restored exactly later."""
        original = owner.__dict__.get(attr, _MISSING)
        current = getattr(owner, attr)
        inner = current.__func__ if isinstance(original, (classmethod, staticmethod)) else current
        wrapper = make(inner)
        functools.update_wrapper(wrapper, inner)
        wrapper.__pgleak_wrapped__ = True
        if isinstance(original, classmethod):
            wrapper = classmethod(wrapper)
        elif isinstance(original, staticmethod):
            wrapper = staticmethod(wrapper)
        setattr(owner, attr, wrapper)
        self._patches.append((owner, attr, original, wrapper))

    def on_uninstall(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def originals(self) -> list[tuple[Any, str, Any]]:
        """``(owner, attribute, original)`` for every patch in place; for tests."""
        return [(owner, attr, original) for owner, attr, original, _ in self._patches]
