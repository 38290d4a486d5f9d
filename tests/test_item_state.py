"""Item state everywhere: the API and ltsctl show the same state, problems first."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from tests.conftest import NOW, Running, item, license_spec


async def items_api(running: Running) -> list[dict]:
    async with running.session.get(running.url + "/api/v1/admin/items") as resp:
        return (await resp.json())["items"]


async def setup_states(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("a-fine", quantity=10),
        item("c-grace", expires_at=NOW - timedelta(days=2), starts_at=NOW - timedelta(days=30)),
        item("d-old", expires_at=NOW - timedelta(days=9), starts_at=NOW - timedelta(days=30)),
        item("e-later", starts_at=NOW + timedelta(days=3)),
        item("f-revoked"),
    ])))
    await running.drop("b.lic", running.vendor.issue(license_spec("L2", items=[item("b-full", quantity=2)])))
    for n in range(2):
        assert (await running.handshake(handshakeCode="216998-L2", clientUuid=f"d{n}"))[0] == 200
    async with running.session.post(running.url + "/api/v1/admin/items/f-revoked/revoke") as resp:
        assert resp.status == 200


async def test_items_api_gives_each_item_its_state_with_problems_first(running: Running) -> None:
    await setup_states(running)
    items = await items_api(running)
    assert [(i["itemId"], i["state"]) for i in items] == [
        ("d-old", "expired"), ("f-revoked", "revoked"), ("b-full", "over-quota"), ("c-grace", "in-grace"),
        ("e-later", "not-started"), ("a-fine", "active")]
    full = next(i for i in items if i["itemId"] == "b-full")
    assert full["stateDetail"] == "2 of 2 seats used: new devices are refused"


async def test_ltsctl_items_list_shows_the_same_states(running: Running) -> None:
    await setup_states(running)
    env = {**os.environ, "XDG_CONFIG_HOME": str(running.folder / "xdg"),
           "LTS_ADMIN_PASSWORD": "correct horse battery staple"}

    async def ctl(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lts_server.cli.ctl", "--server",
                                                    running.url, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()
    await ctl("login")
    lines = (await ctl("items", "list")).splitlines()
    assert lines[0].split()[:2] == ["itemId", "state"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["d-old", "expired"], ["f-revoked", "revoked"], ["b-full", "over-quota"], ["c-grace", "in-grace"],
        ["e-later", "not-started"], ["a-fine", "active"]]
