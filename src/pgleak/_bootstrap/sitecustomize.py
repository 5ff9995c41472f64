"""pgleak's zero-code bootstrap: ``pgleak run -- CMD`` puts this directory first on PYTHONPATH.

Python imports ``sitecustomize`` at start-up, before the program's first line, in every
interpreter the command starts (``python app.py``, ``python -m``, gunicorn, uvicorn, celery, and
the children they fork or spawn, which inherit PYTHONPATH). This module installs pgleak there,
with its settings from ``PGLEAK_*`` variables, then runs the ``sitecustomize`` it shadows (a
distribution's or a virtualenv's own), so nothing the interpreter did before is lost.

Nothing here may stop the program: an interpreter without pgleak importable (another Python
on PATH), a bad setting, a failure of the shadowed module's own is written to stderr in one
line, and start-up goes on.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    """Run the ``sitecustomize`` this one hides, if any, under its own name."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _install() -> None:
    if os.environ.get("PGLEAK_RUN_ACTIVE") != "1":
        return  # on PYTHONPATH by accident, not through `pgleak run`: do nothing
    try:
        import pgleak
    except ImportError:
        return  # an interpreter without pgleak (another Python the command started)
    pgleak.install()


try:
    _chain()
except Exception as exc:  # the shadowed module's failure is its own; pgleak goes on
    sys.stderr.write(
        f"pgleak run: the original sitecustomize failed: {type(exc).__name__}: {exc}\n"
    )
try:
    _install()
except Exception as exc:
    sys.stderr.write(f"pgleak run: pgleak not installed in this process: {exc}\n")
