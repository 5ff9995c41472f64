"""Settings of the test project, read from ``DJANGO_SITE_*`` environment variables.

``server.py`` sets them for each server subprocess:

* ``DJANGO_SITE_DB_HOST``, ``_DB_PORT``, ``_DB_USER``, ``_DB_NAME``, ``_DB_PASSWORD``: the
  PostgreSQL server.
* ``DJANGO_SITE_CONN_MAX_AGE``: seconds, or ``none`` for unlimited persistent connections
  (default ``0``: a connection per request).
* ``DJANGO_SITE_CONN_HEALTH_CHECKS``: ``1`` to enable Django's health checks.
* ``DJANGO_SITE_ATOMIC_REQUESTS``: ``1`` to wrap each view in a transaction.
* ``DJANGO_SITE_POOL``: JSON of Django's ``OPTIONS["pool"]`` (``true`` or a dict of
  ``psycopg_pool.ConnectionPool`` arguments); unset or empty: no native pool.
* ``DJANGO_SITE_DB_OPTIONS``: JSON merged into ``OPTIONS`` (``application_name``, ...).
* ``DJANGO_SITE_NAMED_APPLICATION_NAME``: the ``application_name`` in the ``OPTIONS`` of the
  second alias, ``named`` (the same database; default ``my own name``).
* ``DJANGO_SITE_PGLEAK``: JSON of the ``PGLEAK`` setting; unset: no ``PGLEAK`` setting at all.
* ``DJANGO_SITE_MANUAL_GC``: ``1`` to switch the cyclic garbage collector off in the server,
  so that a dropped connection is collected exactly when a test asks (``/gc/``), not whenever
  the collector happens to run.
* ``DJANGO_SITE_EXTRA_APPS``, ``DJANGO_SITE_EXTRA_MIDDLEWARE``: comma-separated dotted paths
  added to ``INSTALLED_APPS`` (after the project's own app) and ``MIDDLEWARE``.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"DJANGO_SITE_{name}", default)


def _flag(name: str) -> bool:
    return _env(name).strip().lower() in {"1", "true", "yes", "on"}


def _list(name: str) -> list[str]:
    return [item.strip() for item in _env(name).split(",") if item.strip()]


def _conn_max_age(text: str) -> int | None:
    text = text.strip().lower()
    return None if text == "none" else int(text or "0")


if _flag("MANUAL_GC"):
    gc.disable()

SECRET_KEY = "pgleak-tests-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.django_site.urls"
WSGI_APPLICATION = "tests.django_site.wsgi.application"
INSTALLED_APPS = ["tests.django_site", *_list("EXTRA_APPS")]
MIDDLEWARE = _list("EXTRA_MIDDLEWARE")
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_options: dict[str, Any] = json.loads(_env("DB_OPTIONS") or "{}")
_pool = _env("POOL").strip()
if _pool:
    _options["pool"] = json.loads(_pool)

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": _env("DB_HOST", "127.0.0.1"),
        "PORT": _env("DB_PORT", "5432"),
        "USER": _env("DB_USER", "postgres"),
        "PASSWORD": _env("DB_PASSWORD"),
        "NAME": _env("DB_NAME", "postgres"),
        "CONN_MAX_AGE": _conn_max_age(_env("CONN_MAX_AGE", "0")),
        "CONN_HEALTH_CHECKS": _flag("CONN_HEALTH_CHECKS"),
        "ATOMIC_REQUESTS": _flag("ATOMIC_REQUESTS"),
        "OPTIONS": _options,
    }
}
# The same database under a second alias whose OPTIONS name the application itself, as a
# project that sets its own application_name does (views take ``?using=named``).
DATABASES["named"] = {
    **DATABASES["default"],
    "OPTIONS": {**_options, "application_name": _env("NAMED_APPLICATION_NAME", "my own name")},
}

if _env("PGLEAK"):
    PGLEAK: dict[str, Any] = json.loads(_env("PGLEAK"))

# pgleak's reports, and view errors, go to stderr, which server.py collects in a log file.
# Each pgleak record also prints its structured event as one JSON line (logfmt.py).
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"pgleak": {"()": "tests.django_site.logfmt.EventFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pgleak"}},
    "loggers": {
        "pgleak": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
    },
}
