"""The alert rules as pure functions: levels, thresholds, once per level, clearing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lts_server.core import alerts as a
from lts_server.core.model import DeploymentType, Item, ItemStatus, LicenseType, Period

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
WINDOW = a.FailureWindow(minutes=60, min_requests=20)


def make_item(item_id: str = "L1-1", license_type: LicenseType = LicenseType.PER_DEVICE, quantity: int = 10,
              expires_in: timedelta = timedelta(days=365), period: Period | None = Period.YEARLY) -> Item:
    return Item(item_id=item_id, license_id="L1", organization_id="216998", product="barcode-reader",
                deployment_type=DeploymentType.BROWSER, license_type=license_type, quantity=quantity,
                starts_at=NOW - timedelta(days=1), expires_at=NOW + expires_in, period=period)


def levels_of(item: Item, status: ItemStatus) -> dict[str, int]:
    return {c.key: c.level for c in a.item_conditions(item, status, NOW)}


@pytest.mark.parametrize(("used", "level"), [(5, None), (6, 60), (7, 60), (8, 80), (9, 80), (10, 100), (11, 110)])
def test_seat_levels_follow_60_80_100_and_110_when_new_devices_are_refused(used: int, level: int | None) -> None:
    got = levels_of(make_item(quantity=10), ItemStatus(seats_used=used)).get("seats:L1-1")
    assert got == level


def test_daily_seat_items_alert_at_100_percent_only() -> None:
    item = make_item(quantity=10, period=Period.DAILY)
    assert "seats:L1-1" not in levels_of(item, ItemStatus(seats_used=9))
    assert levels_of(item, ItemStatus(seats_used=10))["seats:L1-1"] == 100
    assert levels_of(item, ItemStatus(seats_used=11))["seats:L1-1"] == 110


@pytest.mark.parametrize(("used", "level"), [(599, None), (600, 60), (800, 80), (1000, 100), (1049, 100),
                                              (1050, 105)])
def test_unit_levels_follow_60_80_100_and_105_when_every_device_is_refused(used: int, level: int | None) -> None:
    item = make_item(license_type=LicenseType.PER_SCAN, quantity=1000, period=None)
    assert levels_of(item, ItemStatus(units_used=used)).get("units:L1-1") == level


@pytest.mark.parametrize("license_type", [LicenseType.PER_CONCURRENT_DEVICE, LicenseType.PER_CONCURRENT_INSTANCE])
def test_concurrent_items_alert_on_the_overuse_allowance(license_type: LicenseType) -> None:
    item = make_item(license_type=license_type, quantity=2, period=None)  # allowance 2000 slices
    assert "overuse:L1-1" not in levels_of(item, ItemStatus(overuse_used=1199))
    assert levels_of(item, ItemStatus(overuse_used=1200))["overuse:L1-1"] == 60
    assert levels_of(item, ItemStatus(overuse_used=1600))["overuse:L1-1"] == 80
    assert levels_of(item, ItemStatus(overuse_used=2000, overused=True))["overuse:L1-1"] == 100


def test_expiry_alerts_at_30_and_7_days_and_when_expired() -> None:
    assert "expiry:L1-1" not in levels_of(make_item(expires_in=timedelta(days=31)), ItemStatus())
    assert levels_of(make_item(expires_in=timedelta(days=30)), ItemStatus())["expiry:L1-1"] == a.EXPIRES_30_DAYS
    assert levels_of(make_item(expires_in=timedelta(days=7)), ItemStatus())["expiry:L1-1"] == a.EXPIRES_7_DAYS
    assert levels_of(make_item(expires_in=timedelta(seconds=-1)), ItemStatus())["expiry:L1-1"] == a.EXPIRED


def test_a_revoked_item_raises_no_condition() -> None:
    assert levels_of(make_item(expires_in=timedelta(days=1)), ItemStatus(seats_used=10, revoked=True)) == {}


def test_an_expired_item_past_its_grace_raises_only_the_expiry_condition() -> None:
    item = make_item(expires_in=-timedelta(days=8))
    assert levels_of(item, ItemStatus(seats_used=10)) == {"expiry:L1-1": a.EXPIRED}


def test_failed_authorizations_need_the_minimum_number_of_requests() -> None:
    assert a.code_condition("216998-x", a.CodeRequests(granted=0, refused=1), WINDOW) is None
    assert a.code_condition("216998-x", a.CodeRequests(granted=0, refused=19), WINDOW) is None
    c = a.code_condition("216998-x", a.CodeRequests(granted=0, refused=20), WINDOW)
    assert c is not None and c.level == 100


@pytest.mark.parametrize(("refused", "level"), [(1, None), (2, 10), (4, 20), (8, 40), (12, 60), (16, 80),
                                                 (20, 100)])
def test_failure_levels_are_10_20_40_60_80_100_percent(refused: int, level: int | None) -> None:
    c = a.code_condition("216998-x", a.CodeRequests(granted=20 - refused, refused=refused), WINDOW)
    assert (c.level if c else None) == level


def test_failure_message_names_the_code_the_counts_and_the_window() -> None:
    c = a.code_condition("216998-x", a.CodeRequests(granted=16, refused=4), WINDOW)
    assert c is not None
    assert c.message == "Handshake code 216998-x: 4 of 20 authorizations failed in the last 60 minutes (20%)."
    assert c.link == "/portal/stats/code/216998-x"


def test_seat_message_is_exact() -> None:
    [c] = a.item_conditions(make_item(quantity=10), ItemStatus(seats_used=8), NOW)
    assert c.message == ("Item L1-1 (barcode-reader, per-device) has 8 of 10 seats in use (limit with grace 11): "
                         "80% of its 10 seats.")


def test_rejected_files_are_conditions_and_kinds_can_be_switched_off() -> None:
    facts = a.Facts(items={}, statuses={}, rejected_files=(a.RejectedFile("/imp/x.lic", "bad signature"),))
    [c] = a.conditions(facts, NOW, WINDOW)
    assert (c.key, c.message) == ("import:/imp/x.lic", "License file /imp/x.lic was rejected: bad signature")
    assert a.conditions(facts, NOW, WINDOW, enabled=frozenset({a.Kind.SEATS})) == []


def _seats(level: int) -> a.Condition:
    return a.Condition("seats:L1-1", a.Kind.SEATS, "L1-1", level, f"{level}%", "", "")


def test_a_condition_alerts_once_per_level() -> None:
    first = a.transition([_seats(60)], {})
    assert [c.level for c in first.new] == [60]
    again = a.transition([_seats(60)], first.levels)
    assert again.new == () and again.levels == {"seats:L1-1": 60}
    higher = a.transition([_seats(80)], again.levels)
    assert [c.level for c in higher.new] == [80]


def test_a_jump_over_several_levels_is_one_alert_at_the_highest() -> None:
    t = a.transition([_seats(100)], {})
    assert [c.level for c in t.new] == [100]


def test_a_level_alerts_again_only_after_it_has_cleared() -> None:
    t = a.transition([_seats(80)], {})
    down = a.transition([_seats(60)], t.levels)
    assert down.new == () and down.levels == {"seats:L1-1": 60}
    up = a.transition([_seats(80)], down.levels)
    assert [c.level for c in up.new] == [80]
    gone = a.transition([], up.levels)
    assert gone.cleared == ("seats:L1-1",) and gone.levels == {}
    assert [c.level for c in a.transition([_seats(60)], gone.levels).new] == [60]


def test_one_check_collects_every_new_condition() -> None:
    facts = a.Facts(items={"A": make_item("A", quantity=10), "B": make_item("B", expires_in=timedelta(days=3))},
                    statuses={"A": ItemStatus(seats_used=8)},
                    code_requests={"216998-x": a.CodeRequests(10, 10)})
    t = a.transition(a.conditions(facts, NOW, WINDOW), {})
    assert [c.key for c in t.new] == ["seats:A", "expiry:B", "failures:216998-x"]
    assert a.subject_line(t.new).startswith("[lts-server] 3 new alerts: seats A 80%, expiry B expires within 7 days")


def test_a_level_notified_moments_ago_neither_falls_nor_clears() -> None:
    t = a.transition([_seats(60)], {"seats:L1-1": 80}, settling=frozenset({"seats:L1-1"}))
    assert t.new == () and t.levels == {"seats:L1-1": 80} and t.cleared == ()
    gone = a.transition([], {"seats:L1-1": 80}, settling=frozenset({"seats:L1-1"}))
    assert gone.levels == {"seats:L1-1": 80} and gone.cleared == ()
    higher = a.transition([_seats(100)], {"seats:L1-1": 80}, settling=frozenset({"seats:L1-1"}))
    assert [c.level for c in higher.new] == [100]
