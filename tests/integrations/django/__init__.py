import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn")
