"""Settings of the example shop. The database is the throwaway one ``app.py`` starts."""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "pgleak-example-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "shop.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
EMAIL_BACKEND = "shop.mail.SlowRelayBackend"

INSTALLED_APPS = [
    "shop",
    "pgleak.integrations.django",  # <- the one line of set-up
]
# pgleak's settings: install()'s keyword arguments. Report connections held over 1 s (default
# 30 s); give up retrying a refused connection after 2 s (default 10 s).
PGLEAK = {"leak_threshold": 1, "retry_deadline": 2}

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["SHOP_DB_HOST"],
        "PORT": os.environ["SHOP_DB_PORT"],
        "USER": os.environ["SHOP_DB_USER"],
        "NAME": os.environ["SHOP_DB_NAME"],
        "CONN_MAX_AGE": 0,  # Django's default: each request closes its connection at the end
    }
}

# app.py configures logging itself (pgleak's reports to stdout).
LOGGING_CONFIG = None
