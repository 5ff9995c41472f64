"""Run a callback right after a module is imported, for libraries imported after ``install()``.

``pgleak.install()`` is meant to be the first line of an app, before SQLAlchemy or asyncpg are
imported. A finder on ``sys.meta_path`` watches for the named top-level modules; when one of
them has finished executing, the adapter is installed. The finder never loads anything itself:
it asks the other finders, and only wraps the loader's ``exec_module``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from pgleak._guard import internal_error

__all__ = ["PostImportFinder"]


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, callback: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # Undo our substitution so that the module looks as if we had never been there.
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        with contextlib.suppress(AttributeError):
            module.__loader__ = self._inner
        self._inner.exec_module(module)
        try:
            self._callback(module)
        except Exception as exc:
            internal_error(f"post-import hook for {module.__name__}", exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Calls ``hooks[name](module)`` once the top-level module ``name`` has been executed."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[ModuleType], None]] = {}
        self._busy = threading.local()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        callback = self.hooks.get(fullname)
        if callback is None or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    if hasattr(spec.loader, "exec_module"):
                        spec.loader = _Loader(spec.loader, callback)
                    return spec
            return None
        finally:
            self._busy.name = None

    def register(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def unregister(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)
