"""ltsctl for issue 25: a code's borrowing limit and seat limits, borrowed seats in the device list."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Daemon, Vendor, item, license_spec, start_daemon, stop_daemon, write_config
from tests.test_ltsctl import ctl, ok


@pytest.fixture
def lending(tmp_path: Path, vendor: Vendor) -> Iterator[Daemon]:
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1", items=[
        item("L1-1", quantity=10, borrow_max_days=14)])))
    d = start_daemon(write_config(tmp_path, vendor), tmp_path)
    yield d
    assert stop_daemon(d) == 0


async def _borrow(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/v1/handshake", json={
                "handshakeCode": "216998-team", "clientUuid": "laptop", "product": "barcode-reader",
                "deploymentType": "browser", "borrowDays": 4}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def test_codes_take_borrowing_and_seat_limits_and_devices_show_borrows(lending: Daemon) -> None:
    ok(lending, "login", "--setup")
    ok(lending, "codes", "create", "216998", "team", "--items", "L1-1", "--borrow-max-days", "5",
       "--reserve", "L1-1=3", "--max-seats", "L1-1=6")
    code = json.loads(ok(lending, "--json", "codes", "show", "216998-team"))
    assert code["borrowMaxDays"] == 5
    assert code["itemLimits"] == {"L1-1": {"reservedSeats": 3, "maxSeats": 6, "held": 0}}
    shown = ok(lending, "codes", "show", "216998-team")  # for people: no Python repr of the limits
    assert "L1-1=(reservedSeats=3 maxSeats=6 held=0)" in shown and "{" not in shown, shown
    bad = ctl(lending, "codes", "edit", "216998-team", "--reserve", "L1-1=7")  # the cap of 6 stays
    assert bad.returncode == 1 and "maxSeats: 6 is below reservedSeats 7" in bad.stderr
    bad = ctl(lending, "codes", "edit", "216998-team", "--reserve", "L1-1=11", "--max-seats", "L1-1=none")
    assert bad.returncode == 1 and "more than its quantity of 10" in bad.stderr
    bad = ctl(lending, "codes", "edit", "216998-team", "--reserve", "L1-1")
    assert bad.returncode == 2 and "ITEM=NUMBER" in bad.stderr
    ok(lending, "codes", "edit", "216998-team", "--max-seats", "L1-1=8")  # changes the cap, keeps the reservation
    code = json.loads(ok(lending, "--json", "codes", "show", "216998-team"))
    assert code["itemLimits"] == {"L1-1": {"reservedSeats": 3, "maxSeats": 8, "held": 0}}
    ok(lending, "codes", "edit", "216998-team", "--reserve", "L1-1=none")
    code = json.loads(ok(lending, "--json", "codes", "show", "216998-team"))
    assert code["itemLimits"] == {"L1-1": {"reservedSeats": 0, "maxSeats": 8, "held": 0}}
    ok(lending, "codes", "edit", "216998-team", "--no-limits", "--reserve", "L1-1=2")  # only those given
    code = json.loads(ok(lending, "--json", "codes", "show", "216998-team"))
    assert code["itemLimits"] == {"L1-1": {"reservedSeats": 2, "maxSeats": None, "held": 0}}
    until = asyncio.run(_borrow(lending.url))["authorization"]["borrowedUntil"]
    listing = ok(lending, "devices", "list", "L1-1", "--borrowed")
    assert "laptop" in listing and "216998-team" in listing and until in listing
    released = ok(lending, "devices", "release", "L1-1", "laptop")
    assert "keeps working" in released
    ok(lending, "codes", "edit", "216998-team", "--no-limits", "--borrow-max-days", "none")
    code = json.loads(ok(lending, "--json", "codes", "show", "216998-team"))
    assert code["borrowMaxDays"] is None and code["itemLimits"] == {}
