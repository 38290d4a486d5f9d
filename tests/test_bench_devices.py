"""bench/devices.py builds its states with bulk SQL: they must be what the daemon itself would have written."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import devices  # noqa: E402  (bench/devices.py)

N = 2_000


def get(port: int, path: str, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def login(port: int) -> str:
    for path in ("/api/v1/admin/setup", "/api/v1/admin/login"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"password":"bench bench bench"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    return answer["token"]


async def test_the_bulk_built_state_is_what_the_daemon_would_have_written(
        request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> None:
    key, pub = devices.vendor_key(tmp_path / "vendor")
    lics = {lic: devices.license_file(key, lic, [devices.device_item(i, devices.QUANTITY) for i in items],
                                      org=devices.ORG) for lic, items in devices.LICENSES.items()}
    state = devices.State("test", tmp_path / "state", N)
    if backend == "postgresql":
        state.url = await request.getfixturevalue("pg_server").new_database()

    await devices.build(state, pub, lics)

    devices.start(state, pub)
    try:
        token = login(state.port)
        seats = {i["itemId"]: i["seats"]["used"] for i in get(state.port, "/api/v1/admin/items", token)["items"]}
        assert seats == {item: N // 4 for item in devices.ITEMS}
        for item in devices.ITEMS:
            stats = get(state.port, f"/api/v1/admin/stats/items/{item}?bucket=1d", token)
            assert stats["summary"]["all"] == {"granted": N // 4, "refused": 0, "units": 0, "devices": N // 4}
            assert stats["rollupLagEvents"] == 0
        code_stats = get(state.port, f"/api/v1/admin/stats/codes/{devices.CODE_OF['BDEV1-2']}?bucket=1d", token)
        assert code_stats["summary"]["all"]["devices"] == N // 2
        # A seated device refreshes its own seat: no new seat, and its row reads back as the daemon wrote it.
        device = devices.client_uuid(7)  # on item 7 % 4 = BDEV2-2
        assert devices.handshake(state.port, devices.CODE_OF["BDEV2-2"], device) == 200
        items = {i["itemId"]: i["seats"]["used"] for i in get(state.port, "/api/v1/admin/items", token)["items"]}
        assert items == seats
        # The built device marks count it once: it is no new device of the item, but new this month.
        deadline = time.monotonic() + 30
        while (stats := get(state.port, "/api/v1/admin/stats/items/BDEV2-2?bucket=1mo", token))["rollupLagEvents"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert stats["summary"]["all"] == {"granted": N // 4 + 1, "refused": 0, "units": 0, "devices": N // 4}
        assert stats["series"][-1]["devices"] == 1 and stats["series"][-1]["granted"] == 1
        devices_on = get(state.port, "/api/v1/admin/items/BDEV2-2/devices", token)["devices"]
        assert device in {d["clientUuid"] for d in devices_on}
    finally:
        devices.stop(state)
    # A bulk grant's events are those the ledger writes for a grant (ledger.py _seat_event, _handshake_event).
    rows = (await devices.run_sql(state, [
        "SELECT type, code, item_id, product, deployment_type, result, detail, units, instances FROM events"
        f" WHERE client_uuid = '{devices.client_uuid(3)}' ORDER BY seq"]))[0]
    expiry = devices.granted_s(3, N) + 365 * 86400
    assert [tuple(r) for r in rows] == [
        ("seat.granted", devices.CODE_OF["BDEV2-2"], "BDEV2-2", None, None, None,
         json.dumps({"expiresAt": datetime.fromtimestamp(expiry, UTC).isoformat()},
                    separators=(",", ":")), None, None),
        ("handshake", devices.CODE_OF["BDEV2-2"], "BDEV2-2", "barcode-reader", "browser", 0, None, None, None),
    ]
