"""The one line of set-up for Django: ``INSTALLED_APPS = [..., "pgleak.integrations.django"]``.

Django finds :class:`PgleakConfig` here by itself (an ``apps`` submodule with one
``default = True`` config). Its ``ready()`` runs inside ``django.setup()``, before the first
request and the first query, in every process that loads the project: web workers,
``manage.py`` commands, Celery workers that call ``django.setup()``.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.apps import AppConfig
from django.conf import settings as django_settings

import pgleak

__all__ = ["PgleakConfig", "install_from_settings"]


def install_from_settings() -> pgleak.Settings:
    """``pgleak.install(**settings.PGLEAK)``; without ``PGLEAK``, keep an earlier install.

    ``PGLEAK`` takes the keyword arguments of :func:`pgleak.install` (``{"leak_threshold":
    10}``); ``PGLEAK_*`` environment variables apply to the knobs it leaves out, as they do for
    ``install()``. Without a ``PGLEAK`` setting, an ``install()`` the project already made
    (in ``wsgi.py``, say) is left as it is, since a second call would reset its knobs.

    Raises:
        pgleak.ConfigError: ``PGLEAK`` is not a dict, or names an unknown knob or an invalid
            value (the message says which), so that the deploy fails, not the first report.
    """
    configured = getattr(django_settings, "PGLEAK", None)
    if configured is None:
        current = pgleak.settings()
        return current if current.enabled else pgleak.install()
    if not isinstance(configured, Mapping):
        raise pgleak.ConfigError(
            "settings.PGLEAK: expected a dict of pgleak.install() keyword arguments, "
            f"got {type(configured).__name__}"
        )
    unnamed = [key for key in configured if not isinstance(key, str)]
    if unnamed:
        raise pgleak.ConfigError(f"settings.PGLEAK: keys must be setting names, got {unnamed!r}")
    try:
        return pgleak.install(**configured)
    except pgleak.ConfigError as exc:
        raise pgleak.ConfigError(f"settings.PGLEAK: {exc}") from None


class PgleakConfig(AppConfig):
    """Installs pgleak from ``settings.PGLEAK`` when Django loads its apps."""

    name = "pgleak.integrations.django"
    label = "pgleak"
    verbose_name = "pgleak"
    default = True

    def ready(self) -> None:
        install_from_settings()
