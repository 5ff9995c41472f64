"""Fixtures of the Django tests: the project served for real, shared within a module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Server
from tests.integrations.django.sites import APP, ENV, PGLEAK, Sites, shared_sites


@pytest.fixture(scope="module")
def module_sites(pg: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    """Servers with the one line in ``INSTALLED_APPS`` and a ``PGLEAK`` setting."""
    with shared_sites(
        pg,
        tmp_path_factory.mktemp("django"),
        extra_apps=(APP,),
        pgleak=PGLEAK,
        env=ENV,
        threads=2,
    ) as sites:
        yield sites


@pytest.fixture
def sites(module_sites: Sites) -> Iterator[Sites]:
    module_sites.touched.clear()
    yield module_sites
    module_sites.collect()
