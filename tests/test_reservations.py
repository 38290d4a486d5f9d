"""Seat reservations and caps per handshake code, through the admin API and handshakes, on both stores."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Running, item, license_spec

DEFAULT = "216998-L1"
TEAM = "216998-team"


@pytest.fixture
async def pool(running: Running) -> Running:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("pool", quantity=10), item("scan", "per-scan", quantity=100, product="scanner")])))
    return running


async def make_team(r: Running, limits: dict[str, Any], **kw: Any) -> tuple[int, dict]:
    async with r.session.post(f"{r.url}/api/v1/admin/handshake-codes", json={
            "organizationId": "216998", "custom": "team", "items": ["pool", "scan"], "itemLimits": limits,
            **kw}) as resp:
        return resp.status, await resp.json()


async def patch(r: Running, name: str, body: dict[str, Any]) -> tuple[int, dict]:
    async with r.session.patch(f"{r.url}/api/v1/admin/handshake-codes/{name}", json=body) as resp:
        return resp.status, await resp.json()


async def item_shown(r: Running, item_id: str) -> dict:
    async with r.session.get(f"{r.url}/api/v1/admin/items") as resp:
        return next(i for i in (await resp.json())["items"] if i["itemId"] == item_id)


async def grant(r: Running, code: str, client: str) -> tuple[int, dict]:
    return await r.handshake(handshakeCode=code, clientUuid=client)


async def test_other_codes_see_the_item_smaller_by_the_unused_reservation(pool: Running) -> None:
    status, team = await make_team(pool, {"pool": {"reservedSeats": 4, "maxSeats": 6}})
    assert status == 201, team
    assert team["itemLimits"] == {"pool": {"reservedSeats": 4, "maxSeats": 6, "held": 0}}
    # 10 seats + 1 of grace; 4 reserved for the team: the default code gets 7.
    for i in range(7):
        assert (await grant(pool, DEFAULT, f"d{i}"))[0] == 200
    status, out = await grant(pool, DEFAULT, "d7")
    assert status == 403 and out["error"]["code"] == 120
    assert "4 reserved for other handshake codes" in out["error"]["message"]
    # The team takes its 4 even though the item looks full to everyone else.
    for i in range(4):
        status, out = await grant(pool, TEAM, f"t{i}")
        assert status == 200, out
    assert pool.ledger.status("pool").seats_used == 11
    assert (await grant(pool, TEAM, "t4"))[0] == 403  # the limit with grace is reached
    # A team seat given back is the team's again, not the default code's.
    async with pool.session.delete(f"{pool.url}/api/v1/admin/items/pool/devices/t0") as resp:
        assert resp.status == 200
    assert (await grant(pool, DEFAULT, "d8"))[0] == 403
    assert (await grant(pool, TEAM, "t5"))[0] == 200
    assert await pool.sql_value("SELECT seats_used FROM code_item_limits WHERE code_name = ?", TEAM) == 4
    assert await pool.sql_value("SELECT seats_reserved_unused FROM items WHERE item_id = 'pool'") == 0


async def test_a_code_never_takes_more_than_its_max(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"maxSeats": 3}}))[0] == 201
    for i in range(3):
        assert (await grant(pool, TEAM, f"t{i}"))[0] == 200
    status, out = await grant(pool, TEAM, "t3")
    assert status == 403 and out["error"]["code"] == 120 and "maximum of 3 seats" in out["error"]["message"]
    # The same device through the same code keeps its seat; other codes are not capped.
    assert (await grant(pool, TEAM, "t0"))[0] == 200
    assert (await grant(pool, DEFAULT, "d0"))[0] == 200
    async with pool.session.get(f"{pool.url}/api/v1/admin/handshake-codes/{TEAM}") as resp:
        assert (await resp.json())["itemLimits"]["pool"]["held"] == 3


@pytest.mark.parametrize("limits, field, words", [
    ({"pool": {"reservedSeats": 11}}, "itemLimits.pool.reservedSeats", "more than its quantity of 10"),
    ({"pool": {"reservedSeats": 5, "maxSeats": 4}}, "itemLimits.pool.maxSeats", "below reservedSeats 5"),
    ({"scan": {"maxSeats": 4}}, "itemLimits.scan", "per-scan"),
    ({"other": {"maxSeats": 4}}, "itemLimits.other", "not among the items"),
    ({"pool": {"reservedSeats": -1}}, "itemLimits.pool.reservedSeats", "0 or more"),
    ({"pool": {"maxSeats": 0}}, "itemLimits.pool.maxSeats", "1 or more"),
    # Past the database's INTEGER (PostgreSQL): a 400 naming the field, not "a value the database cannot store".
    ({"pool": {"maxSeats": 2**31}}, "itemLimits.pool.maxSeats", "at most 2,147,483,647"),
    ({"pool": {"reservedSeats": 10**12}}, "itemLimits.pool.reservedSeats", "more than its quantity of 10"),
])
async def test_bad_limits_are_refused_with_the_field(pool: Running, limits: dict, field: str, words: str) -> None:
    status, out = await make_team(pool, limits)
    assert status == 400, out
    assert out["error"]["field"] == field and words in out["error"]["message"]
    assert TEAM not in pool.ledger.codes


async def test_reservations_of_all_codes_stay_within_the_quantity(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"reservedSeats": 6}}))[0] == 201
    status, out = await patch(pool, DEFAULT, {"itemLimits": {"pool": {"reservedSeats": 5}}})
    assert status == 400
    assert out["error"]["message"].endswith(
        f"reservations on item pool would total 11 seats, more than its quantity of 10 ({DEFAULT} 5, {TEAM} 6)")
    assert (await patch(pool, DEFAULT, {"itemLimits": {"pool": {"reservedSeats": 4}}}))[0] == 200
    # Removing the team's reservation frees room for more elsewhere.
    assert (await patch(pool, TEAM, {"itemLimits": {}}))[0] == 200
    assert (await patch(pool, DEFAULT, {"itemLimits": {"pool": {"reservedSeats": 10}}}))[0] == 200


async def test_a_renewal_with_fewer_seats_than_reserved_is_shown_and_the_code_stays_editable(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"reservedSeats": 6}}))[0] == 201
    await pool.drop("a2.lic", pool.vendor.issue(license_spec("L1", revision=2, items=[
        item("pool", quantity=4), item("scan", "per-scan", quantity=100, product="scanner")])))
    shown = await item_shown(pool, "pool")
    assert shown["quantity"] == 4
    assert shown["limitsWarning"].startswith("reservations on item pool total 6 seats, more than its quantity of 4")
    # An edit that does not raise the reservation is not refused for it; lowering it ends the warning.
    assert (await patch(pool, TEAM, {"borrowMaxDays": 0}))[0] == 200
    assert (await patch(pool, TEAM, {"itemLimits": {"pool": {"reservedSeats": 5}}}))[0] == 200
    status, out = await patch(pool, TEAM, {"itemLimits": {"pool": {"reservedSeats": 7}}})
    assert status == 400 and "more than its quantity of 4" in out["error"]["message"]
    assert (await patch(pool, TEAM, {"itemLimits": {"pool": {"reservedSeats": 4}}}))[0] == 200
    assert "limitsWarning" not in await item_shown(pool, "pool")
    # Never more than the quantity and its grace, whatever the reservations said.
    granted = [(await grant(pool, TEAM, f"t{i}"))[0] for i in range(8)]
    limit = (await item_shown(pool, "pool"))["seats"]["limit"]  # the quantity and its grace
    assert granted.count(200) == limit and pool.ledger.status("pool").seats_used == limit


async def test_a_cap_set_below_the_seats_held_says_so(pool: Running) -> None:
    assert (await make_team(pool, {}))[0] == 201
    for i in range(3):
        assert (await grant(pool, TEAM, f"t{i}"))[0] == 200
    status, out = await patch(pool, TEAM, {"itemLimits": {"pool": {"maxSeats": 2}}})
    assert status == 200 and out["itemLimits"]["pool"]["held"] == 3
    assert out["limitsWarning"] == ("holds 3 seats of item pool, more than its maxSeats of 2: it takes none until "
                                    "it holds fewer (nothing is released)")
    assert (await grant(pool, TEAM, "t3"))[0] == 403


async def test_limits_set_later_count_the_seats_the_code_already_holds(pool: Running) -> None:
    assert (await make_team(pool, {}))[0] == 201
    for i in range(3):
        assert (await grant(pool, TEAM, f"t{i}"))[0] == 200
    status, out = await patch(pool, TEAM, {"itemLimits": {"pool": {"reservedSeats": 5, "maxSeats": 4}}})
    assert status == 400  # maxSeats below reservedSeats
    status, out = await patch(pool, TEAM, {"itemLimits": {"pool": {"reservedSeats": 2, "maxSeats": 4}}})
    assert status == 200 and out["itemLimits"]["pool"]["held"] == 3
    assert (await grant(pool, TEAM, "t3"))[0] == 200
    assert (await grant(pool, TEAM, "t4"))[0] == 403
    assert await pool.sql_value("SELECT seats_used FROM code_item_limits WHERE code_name = ?", TEAM) == 4
    # Dropping the item from the code ends its limits there.
    status, out = await patch(pool, TEAM, {"items": ["scan"]})
    assert status == 200 and out["itemLimits"] == {}
    assert await pool.sql_value("SELECT COUNT(*) FROM code_item_limits") == 0


async def test_a_code_with_limits_is_not_renamed(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"maxSeats": 2}}))[0] == 201
    status, out = await patch(pool, TEAM, {"custom": "renamed"})
    assert status == 409 and "seat limits" in out["error"]["message"]


async def test_limits_and_counts_survive_a_restart(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"reservedSeats": 3, "maxSeats": 5}}))[0] == 201
    assert (await grant(pool, TEAM, "t0"))[0] == 200
    snap = await pool.ledger.store.load()
    assert snap.codes[TEAM].seat_limits[0].reserved_seats == 3
    assert snap.code_seats == {(TEAM, "pool"): 1}


async def test_deleting_a_code_ends_its_reservation(pool: Running) -> None:
    assert (await make_team(pool, {"pool": {"reservedSeats": 10}}))[0] == 201
    assert (await grant(pool, DEFAULT, "d0"))[0] == 200  # the grace seat
    assert (await grant(pool, DEFAULT, "d1"))[0] == 403
    async with pool.session.delete(f"{pool.url}/api/v1/admin/handshake-codes/{TEAM}") as resp:
        assert resp.status == 200
    assert (await grant(pool, DEFAULT, "d1"))[0] == 200
    assert await pool.sql_value("SELECT seats_reserved_unused FROM items WHERE item_id = 'pool'") == 0
