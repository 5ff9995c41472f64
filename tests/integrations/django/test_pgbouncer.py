"""Django through a real PgBouncer (transaction pooling): tags kept, its limit retried.

PgBouncer keeps ``application_name`` per client and sets it on whichever server connection
it links the client to; beyond ``max_client_conn`` it refuses a client itself, with SQLSTATE
08P01 ``no more connections allowed (max_client_conn)``, which pgleak retries like 53300.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bouncer import PgBouncer
from tests.django_site.server import DjangoServer, Kind, serve
from tests.integrations.django.sites import (
    APP,
    HOSTILE_SERVICE,
    KINDS,
    OWN_NAME,
    PGLEAK,
    database,
    full,
    request_freeing_a_slot_when,
    tag_of,
)

RETRY = {"retry_deadline": 5.0, "retry_max_attempts": 100, "retry_max_delay": 0.2}


@pytest.fixture(params=KINDS)
def server(
    request: pytest.FixtureRequest, bouncer: PgBouncer, tmp_path: Path
) -> Iterator[DjangoServer]:
    kind: Kind = request.param
    env = {"DJANGO_SITE_NAMED_APPLICATION_NAME": OWN_NAME}
    with serve(
        kind, bouncer, extra_apps=(APP,), pgleak={**PGLEAK, **RETRY}, env=env, log_dir=tmp_path
    ) as running:
        yield running


def test_tags_and_the_bouncers_limit_retried(server: DjangoServer, bouncer: PgBouncer) -> None:
    tagged = server.get_json("/query/")
    assert tagged["application_name"] == tag_of(HOSTILE_SERVICE, tagged["process"])
    assert server.get_json("/query/?using=named")["application_name"] == OWN_NAME

    mark = server.mark()
    with full(bouncer.dsn(), bouncer.max_client_conn, r"\(max_client_conn\)") as conns:
        reply = request_freeing_a_slot_when(
            server, conns, lambda: server.events("connect.retry", since=mark)
        )
    assert reply.status == 200, server.log_tail()
    retries = server.events("connect.retry", since=mark)
    assert {e["sqlstate"] for e in retries} == {"08P01"}
    assert all(e["pool"].startswith(database("per-request")) for e in retries)
    assert not server.events("connect.gave_up", since=mark)
