"""Put on PYTHONPATH by scripts/upstream-suites: pgleak installed at interpreter start.

This is how an application runs under pgleak when it cannot edit its entry point. Any
sitecustomize further down sys.path (a distribution's, a venv's) still runs first, so the
only difference between the plain run and this one is pgleak.
"""

from __future__ import annotations

import importlib
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_self = sys.modules.pop("sitecustomize", None)
try:
    importlib.import_module("sitecustomize")
except ModuleNotFoundError as exc:  # there is no other; an import error inside one is raised
    if exc.name != "sitecustomize":
        raise
finally:
    sys.path[:] = _saved
    if _self is not None:
        sys.modules["sitecustomize"] = _self

import pgleak  # noqa: E402

pgleak.install()

# Proof for the harness that pgleak was in effect: which adapters each process had at its end.
_proof = os.environ.get("PGLEAK_UPSTREAM_PROOF")
if _proof:
    import atexit
    import json

    def _record(path: str = _proof) -> None:
        with open(path, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "installed": pgleak.installed()}) + "\n")

    atexit.register(_record)
