import pytest

pytest.importorskip("psycopg2")
