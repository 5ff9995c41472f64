import pytest

pytest.importorskip("asyncpg")
