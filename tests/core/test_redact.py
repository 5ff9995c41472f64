"""Pool names and DSNs carry no password into reports."""

from __future__ import annotations

import pytest

from pgleak._redact import redact_dsn


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/shop", "postgresql://app:***@db:5432/shop"),
        ("postgresql+psycopg://app:***@db/shop", "postgresql+psycopg://app:***@db/shop"),
        (
            "postgresql://app@db/shop?password=s3cret&sslmode=require",
            "postgresql://app@db/shop?password=***&sslmode=require",
        ),
        (
            "postgresql://db/shop?sslmode=require&sslpassword=k3y",
            "postgresql://db/shop?sslmode=require&sslpassword=***",
        ),
        (
            "host=db user=app password=s3cret dbname=shop",
            "host=db user=app password=*** dbname=shop",
        ),
        ("host=db password='s3 cr\\'et' dbname=shop", "host=db password=*** dbname=shop"),
        ("password = s3cret host=db", "password = *** host=db"),
        ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        ("host=db user=app", "host=db user=app"),
    ],
)
def test_passwords_are_hidden(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected
    assert "s3" not in redact_dsn(dsn)
    assert "k3y" not in redact_dsn(dsn)
