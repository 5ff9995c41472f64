"""A real Django project for pgleak's Django tests, served over real HTTP by ``server.py``.

It is configured entirely from ``DJANGO_SITE_*`` environment variables (``settings.py``), so
each server subprocess runs its own mode: per-request connections (``CONN_MAX_AGE=0``),
persistent connections (``CONN_MAX_AGE>0`` or ``None``) or Django's native psycopg pool.
"""
