"""The adapters pgleak knows, by name, and the module whose import enables each.

Adding a driver is one module in this package and one line in :data:`ADAPTERS`.
"""

from __future__ import annotations

import importlib

from pgleak._adapter import Adapter

__all__ = ["ADAPTERS", "load"]

#: adapter name -> (module that must be imported, "module:Class" of the adapter)
ADAPTERS: dict[str, tuple[str, str]] = {
    "sqlalchemy": ("sqlalchemy", "pgleak.integrations.sqlalchemy:SQLAlchemyAdapter"),
    "psycopg_pool": ("psycopg_pool", "pgleak.integrations.psycopg_pool:PsycopgPoolAdapter"),
    "psycopg": ("psycopg", "pgleak.integrations.psycopg:PsycopgAdapter"),
    "psycopg2": ("psycopg2", "pgleak.integrations.psycopg2:Psycopg2Adapter"),
    "asyncpg": ("asyncpg", "pgleak.integrations.asyncpg:AsyncpgAdapter"),
    "django": ("django", "pgleak.integrations.django:DjangoAdapter"),
}


def load(name: str) -> type[Adapter]:
    """Import and return an adapter class; raises ``AdapterUnavailable`` if its library is not."""
    module_name, _, cls_name = ADAPTERS[name][1].partition(":")
    cls: type[Adapter] = getattr(importlib.import_module(module_name), cls_name)
    return cls
