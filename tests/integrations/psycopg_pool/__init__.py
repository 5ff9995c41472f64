import pytest

pytest.importorskip("psycopg_pool")
