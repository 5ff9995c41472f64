"""``pgleak doctor`` pointed at a server with PgBouncer (transaction mode) in front of it.

The server sees PgBouncer as the client of every pooled backend; each backend carries the
application_name of the client whose transaction it last ran, so pgleak's tags still name the
process holding a transaction open. With ``application_name_add_host`` PgBouncer appends the
client's address, which the doctor strips (and takes as proof of a pooler).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pgleak.cli import main
from tests.bouncer import PgBouncer, require_pgbouncer
from tests.cli.clients import holders
from tests.conftest import Server


@pytest.fixture(scope="module")
def bouncer(pg: Server) -> Iterator[PgBouncer]:
    require_pgbouncer()
    with PgBouncer(
        pg.host,
        pg.port,
        user=pg.user,
        dbname=pg.dbname,
        max_client_conn=10,
        default_pool_size=4,
        settings={"application_name_add_host": "1"},
    ) as running:
        yield running


def test_doctor_at_the_server_attributes_clients_behind_the_bouncer(
    pg: Server, bouncer: PgBouncer, capsys: pytest.CaptureFixture[str]
) -> None:
    with holders(bouncer.dsn(), ("cart", 1, True), ("search", 1, True)) as (cart, search):
        code = main(["doctor", pg.dsn, "--json", "--idle-in-transaction-older-than", "0"])
        data = json.loads(capsys.readouterr().out)
    assert code == 1
    rows = {r["service"]: r for r in data["by_application"] if r["service"]}
    for holder, service in ((cart, "cart"), (search, "search")):
        row = rows[service]
        assert row["pid"] == holder.proc.pid
        assert row["states"] == {"idle in transaction": 1}
        assert row["backend_pids"] == holder.backend_pids
        assert row["application_name"].startswith(f"{service}@")
        assert " - 127.0.0.1:" in row["application_name"]  # PgBouncer's suffix, parsed off
    pooler = [f for f in data["findings"] if f["kind"] == "pooler_in_front"]
    assert pooler
    assert set(cart.backend_pids + search.backend_pids) <= set(pooler[0]["pids"])
    assert "application_name_add_host" in data["server"]["pooler"]
    in_txn = next(f for f in data["findings"] if f["kind"] == "idle_in_transaction")
    assert set(cart.backend_pids + search.backend_pids) <= set(in_txn["pids"])
