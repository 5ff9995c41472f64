"""``python -m pgleak``: the same as the ``pgleak`` command."""

import sys

from pgleak.cli import main

sys.exit(main())
