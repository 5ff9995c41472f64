"""What ``wsgi.py`` and ``asgi.py`` do before Django loads: settings module, ``pgleak.install()``.

``DJANGO_SITE_INSTALL``, when set, is the JSON of ``pgleak.install()`` keyword arguments, called
here the way a user puts ``pgleak.install()`` at the top of their own ``wsgi.py``.
"""

from __future__ import annotations

import json
import os


def boot() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_site.settings")
    kwargs = os.environ.get("DJANGO_SITE_INSTALL")
    if kwargs is not None:
        import pgleak

        pgleak.install(**json.loads(kwargs or "{}"))
