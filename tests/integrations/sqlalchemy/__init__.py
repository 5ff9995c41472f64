import pytest

pytest.importorskip("sqlalchemy")
