"""An item's state at a glance (pure)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lts_server.core.model import ItemStatus, LicenseType, Period
from lts_server.core.state import SEVERITY, ItemState, item_state
from tests.test_core_alerts import NOW, make_item


@pytest.mark.parametrize(("kw", "status", "state"), [
    ({}, ItemStatus(), ItemState.ACTIVE),
    ({}, ItemStatus(seats_used=10), ItemState.ACTIVE),
    ({}, ItemStatus(seats_used=11), ItemState.OVER_QUOTA),  # 10 + 10% grace: new devices refused
    ({"quantity": 20}, ItemStatus(seats_used=21), ItemState.IN_GRACE),
    ({"expires_in": timedelta(days=-2)}, ItemStatus(), ItemState.IN_GRACE),
    ({"expires_in": timedelta(days=-8)}, ItemStatus(), ItemState.EXPIRED),
    ({}, ItemStatus(revoked=True), ItemState.REVOKED),
    ({"expires_in": timedelta(days=-8)}, ItemStatus(revoked=True), ItemState.EXPIRED),
    ({"license_type": LicenseType.PER_SCAN, "quantity": 100, "period": None}, ItemStatus(units_used=103),
     ItemState.IN_GRACE),
    ({"license_type": LicenseType.PER_SCAN, "quantity": 100, "period": None}, ItemStatus(units_used=105),
     ItemState.OVER_QUOTA),
    ({"license_type": LicenseType.PER_CONCURRENT_DEVICE, "quantity": 1, "period": None},
     ItemStatus(overuse_used=1000), ItemState.OVERUSED),
    ({"license_type": LicenseType.PER_CONCURRENT_INSTANCE, "quantity": 1, "period": None},
     ItemStatus(overused=True), ItemState.OVERUSED),
])
def test_item_state(kw: dict, status: ItemStatus, state: ItemState) -> None:
    assert item_state(make_item(**kw), status, NOW).state is state


def test_an_item_that_has_not_started_says_when_it_starts() -> None:
    item = make_item(period=Period.YEARLY)
    view = item_state(item, ItemStatus(), item.starts_at - timedelta(days=3))
    assert view.state is ItemState.NOT_STARTED and view.detail.startswith("starts on ")


def test_the_detail_says_why_in_one_phrase() -> None:
    view = item_state(make_item(quantity=10), ItemStatus(seats_used=11), NOW)
    assert view.detail == "11 of 10 seats and the grace used: new devices are refused"
    assert ItemState.NOT_STARTED.label == "not yet started" and ItemState.IN_GRACE.label == "in grace"


def test_problems_sort_before_active_items() -> None:
    assert max(SEVERITY, key=SEVERITY.__getitem__) is ItemState.ACTIVE
    assert SEVERITY[ItemState.EXPIRED] < SEVERITY[ItemState.IN_GRACE]
