"""Usage alerts on a PostgreSQL cluster: two nodes check and send at once, and every alert arrives once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import Clock, Vendor, item, license_spec, wait_for
from tests.test_alerts import Mailbox, Receiver, mailbox, receiver  # noqa: F401 (fixtures)
from tests.test_postgres import Node, pg_config, stop_node


async def start(folder: Path, vendor: Vendor, url: str, smtp_port: int, clock: Clock) -> Node:
    path = pg_config(folder, vendor, url, alerts={"deliver_seconds": 0.1},
                     **{"alerts.smtp": {"host": "127.0.0.1", "port": smtp_port}})
    server = Server(config_mod.load(path, environ={}), clock=clock)
    await server.start()
    return Node(server, aiohttp.ClientSession())


async def test_two_nodes_raise_each_alert_once_and_send_it_once(tmp_path: Path, vendor: Vendor, pg_url: str,
                                                                 mailbox: tuple[Mailbox, int],
                                                                 receiver: Receiver) -> None:
    box, smtp_port = mailbox
    clock = Clock()
    (tmp_path / "a" / "import").mkdir(parents=True)
    (tmp_path / "a" / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=10)])))
    a = await start(tmp_path / "a", vendor, pg_url, smtp_port, clock)
    b = await start(tmp_path / "b", vendor, pg_url, smtp_port, clock)
    try:
        await wait_for(lambda: "216998-P" in b.ledger.codes)
        store = a.server.services.store
        # Both nodes have followed the import (a check it asks for finds no seat taken yet): a check that
        # runs while the grants below are under way would raise the levels on the way, legitimately.
        end = await store.log_position()
        await wait_for(lambda: a.server._followed >= end and b.server._followed >= end)
        await store.set_alert_recipients("ops@example.com")
        await store.add_webhook(receiver.url, "cluster-secret-0123456789", 0)
        for n in range(8):
            assert (await (a if n % 2 else b).handshake(f"dev-{n}"))[0] == 200
        await wait_for(lambda: a.ledger.status("p1").seats_used == 8 and b.ledger.status("p1").seats_used == 8)
        outcomes = await asyncio.gather(*(node.server.services.alerts.check() for node in (a, b, a, b)))
        raised = [o.alert_id for o in outcomes if o.alert_id is not None]
        assert len(raised) == 1
        await wait_for(lambda: box.to("ops@example.com") and receiver.posts)
        # Both nodes' outboxes run; give them a few more rounds to send anything twice.
        await asyncio.sleep(0.5)
        assert [m["Subject"] for m in box.to("ops@example.com")] == ["[lts-server] alert: seats p1 80%"]
        assert len(receiver.posts) == 1
        history = await b.server.services.store.alert_history(5)
        assert [d.state for d in history[0].deliveries] == ["sent", "sent"]
    finally:
        for node in (a, b):
            await stop_node(node)
