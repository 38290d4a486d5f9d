"""The handshake decision and usage order, as pure functions: no database, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from lts_server.core import handshake as hs
from lts_server.core.model import (
    DeploymentType,
    HandshakeCode,
    Item,
    ItemStatus,
    LicenseType,
    Period,
    grace_allowance,
)
from lts_server.core.ordering import usage_order
from lts_server.core.reservations import Share, limits_by_item, share_of
from lts_server.errors import Code

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def mk(item_id: str, license_type: LicenseType = LicenseType.PER_DEVICE, days: int = 365, **kw) -> Item:
    base = dict(
        item_id=item_id, license_id="L", organization_id="216998", product="reader",
        deployment_type=DeploymentType.BROWSER, license_type=license_type, quantity=10,
        starts_at=NOW - timedelta(days=30), expires_at=NOW + timedelta(days=days),
        period=Period.YEARLY if license_type in (LicenseType.PER_DEVICE, LicenseType.PER_SERVER) else None,
    )
    base.update(kw)
    return Item(**base)


@dataclass
class FakeView:
    items: dict[str, Item]
    codes: dict[str, HandshakeCode] = field(default_factory=dict)
    statuses: dict[str, ItemStatus] = field(default_factory=dict)
    seats: dict[tuple[str, str], datetime] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    elsewhere: dict[str, int] = field(default_factory=dict)
    code_seats: dict[tuple[str, str], int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)

    def default_codes(self, organization_id: str) -> list[str]:
        return [self.defaults[organization_id]] if organization_id in self.defaults else []

    def organization_known(self, organization_id: str) -> bool:
        return any(c.organization_id == organization_id for c in self.codes.values())

    def status(self, item_id: str) -> ItemStatus:
        return self.statuses.get(item_id, ItemStatus())

    def seat_expiry(self, item_id: str, client_uuid: str) -> datetime | None:
        return self.seats.get((item_id, client_uuid))

    def instances_elsewhere(self, item_id: str, client_uuid: str, now: datetime) -> int:
        return self.elsewhere.get(item_id, 0)

    def share(self, item_id: str, code: HandshakeCode) -> Share:
        return share_of(code, item_id, limits_by_item(self.codes.values()).get(item_id, {}),
                        {c: n for (c, i), n in self.code_seats.items() if i == item_id}, self.waiting.get(item_id, 0))


def view_with(*items: Item, **code_kw) -> FakeView:
    code = HandshakeCode(name="216998-c", organization_id="216998", items=tuple(i.item_id for i in items), **code_kw)
    return FakeView({i.item_id: i for i in items}, {code.name: code}, defaults={"216998": code.name})


def req(**kw) -> hs.Request:
    base = dict(client_uuid="dev", product="reader", deployment_type=DeploymentType.BROWSER, handshake_code="216998-c")
    base.update(kw)
    return hs.Request(**base)


def decide(view: FakeView, r: hs.Request | None = None, now: datetime = NOW, password_ok: bool = True) -> hs.Decision:
    return hs.decide(r or req(), view, now, lambda code, given: password_ok)


def refused_code(decision: hs.Decision) -> Code:
    assert isinstance(decision, hs.Refused), decision
    return decision.refusal.code


# -- grace arithmetic -----------------------------------------------------------

@pytest.mark.parametrize("license_type, quantity, grace", [
    (LicenseType.PER_DEVICE, 100, 10), (LicenseType.PER_DEVICE, 5, 1), (LicenseType.PER_DEVICE, 4, 0),
    (LicenseType.PER_DEVICE, 15, 2), (LicenseType.PER_SCAN, 1000, 50), (LicenseType.PER_SCAN, 10, 1),
    (LicenseType.PER_PAGE, 9, 0), (LicenseType.PER_CONCURRENT_DEVICE, 100, 0),
])
def test_grace_is_rounded_half_up(license_type: LicenseType, quantity: int, grace: int) -> None:
    assert grace_allowance(license_type, quantity) == grace


# -- usage order ----------------------------------------------------------------

def test_default_order_closest_expiry_first() -> None:
    items = {i.item_id: i for i in (mk("late", days=300), mk("soon", days=30), mk("mid", days=100))}
    assert usage_order(["late", "soon", "mid"], items, custom=False) == ["soon", "mid", "late"]


def test_default_order_most_specific_then_least_restrictive() -> None:
    items = {i.item_id: i for i in (
        mk("device", days=100),
        mk("edition", days=100, edition="pro"),
        mk("concurrent", LicenseType.PER_CONCURRENT_DEVICE, days=100),
        mk("scan", LicenseType.PER_SCAN, days=100),
    )}
    assert usage_order(list(items), items, custom=False) == ["edition", "concurrent", "scan", "device"]


def test_custom_order_is_kept_and_missing_items_go_last_in_default() -> None:
    items = {i.item_id: i for i in (mk("a", days=10), mk("b", days=20))}
    assert usage_order(["b", "a"], items, custom=True) == ["b", "a"]
    assert usage_order(["gone", "b", "a"], items, custom=False) == ["a", "b", "gone"]


# -- resolving the code -----------------------------------------------------------

def test_code_resolution_errors() -> None:
    v = view_with(mk("a"))
    assert refused_code(decide(v, req(handshake_code="216998-nope"))) is Code.UNKNOWN_CODE
    assert refused_code(decide(v, req(handshake_code=None, organization_id="999"))) is Code.UNKNOWN_ORGANIZATION
    assert refused_code(decide(v, req(organization_id="999"))) is Code.CODE_ORG_MISMATCH
    assert refused_code(decide(v, req(handshake_code=None))) is Code.NO_CODE_NOR_ORG
    assert isinstance(decide(v, req(handshake_code=None, organization_id="216998")), hs.Grant)


def test_password_and_validation_fields() -> None:
    v = view_with(mk("a"), password_hash="x")
    assert refused_code(decide(v, password_ok=False)) is Code.WRONG_PASSWORD
    v = view_with(mk("a"), domains=("*.example.com",))
    assert isinstance(decide(v, req(domain="shop.example.com")), hs.Grant)
    assert isinstance(decide(v, req(domain="example.com")), hs.Grant)
    assert refused_code(decide(v, req(domain="example.org"))) is Code.DOMAIN_MISMATCH
    assert refused_code(decide(v, req(domain=None))) is Code.DOMAIN_MISMATCH
    mobile = mk("m", deployment_type=DeploymentType.MOBILE)
    v = view_with(mobile, app_ids=("com.acme.app",))
    assert refused_code(decide(v, req(deployment_type=DeploymentType.MOBILE, app_id="com.evil"))) \
        is Code.VALIDATION_FIELD_MISMATCH
    desktop = mk("d", deployment_type=DeploymentType.DESKTOP)
    v = view_with(desktop, process_names=("scanner.exe",))
    assert isinstance(decide(v, req(deployment_type=DeploymentType.DESKTOP, process_name="scanner.exe")), hs.Grant)
    assert refused_code(decide(v, req(deployment_type=DeploymentType.DESKTOP, process_name="x.exe"))) \
        is Code.VALIDATION_FIELD_MISMATCH


# -- item checks, one code each ---------------------------------------------------------

@pytest.mark.parametrize("item, request_kw, status, code", [
    (mk("a", product="other"), {}, ItemStatus(), Code.PRODUCT_MISMATCH),
    (mk("a", deployment_type=DeploymentType.DESKTOP), {}, ItemStatus(), Code.DEPLOYMENT_MISMATCH),
    (mk("a", edition="pro"), {"edition": "lite"}, ItemStatus(), Code.EDITION_MISMATCH),
    (mk("a", starts_at=NOW + timedelta(days=1)), {}, ItemStatus(), Code.NOT_YET_EFFECTIVE),
    (mk("a", days=-8), {}, ItemStatus(), Code.EXPIRED),
    (mk("a"), {}, ItemStatus(revoked=True), Code.REVOKED),
    (mk("a", LicenseType.PER_DOMAIN, domain="*.example.com", quantity=1), {}, ItemStatus(), Code.TYPE_INCOMPATIBLE),
    (mk("a", LicenseType.PER_DOMAIN, domain="*.example.com", quantity=1), {"domain": "x.org"}, ItemStatus(),
     Code.DOMAIN_MISMATCH),
    (mk("a", LicenseType.PER_CONCURRENT_INSTANCE, deployment_type=DeploymentType.SERVER, quantity=4),
     {"deployment_type": DeploymentType.SERVER, "instances": 5}, ItemStatus(), Code.QUOTA_EXCEEDED_BY_REQUEST),
    (mk("a", quantity=10), {}, ItemStatus(seats_used=11), Code.LIMIT_EXCEEDED),
    (mk("a", LicenseType.PER_SCAN, quantity=1000), {}, ItemStatus(units_used=1050), Code.LIMIT_EXCEEDED),
])
def test_each_item_check(item: Item, request_kw: dict, status: ItemStatus, code: Code) -> None:
    v = view_with(item)
    v.statuses[item.item_id] = status
    decision = decide(v, req(**request_kw))
    assert refused_code(decision) is code
    assert decision.item_id == item.item_id


def test_in_grace_after_expiry_and_authorization_capped() -> None:
    item = mk("a", days=-3)
    grant = decide(view_with(item))
    assert isinstance(grant, hs.Grant)
    assert grant.fit.expires_at == item.expires_at + timedelta(days=7)


def test_per_device_authorization_lasts_the_period_capped_at_expiry() -> None:
    item = mk("a", days=20, period=Period.MONTHLY)
    grant = decide(view_with(item))
    assert isinstance(grant, hs.Grant) and grant.fit.expires_at == item.expires_at
    item = mk("a", days=200, period=Period.MONTHLY)
    grant = decide(view_with(item))
    assert isinstance(grant, hs.Grant) and grant.fit.expires_at == NOW + timedelta(days=30)


def test_seats_grace_new_devices_refused_holders_keep_working() -> None:
    item = mk("a", quantity=10)
    v = view_with(item)
    v.statuses["a"] = ItemStatus(seats_used=10)
    assert decide(v).fit.seat is hs.SeatAction.CLAIM  # within round(10% x 10) = 1 extra
    v.statuses["a"] = ItemStatus(seats_used=11)
    assert refused_code(decide(v)) is Code.LIMIT_EXCEEDED
    v.seats[("a", "dev")] = NOW + timedelta(days=10)
    assert decide(v).fit.seat is hs.SeatAction.REFRESH


def test_walks_usage_order_and_falls_through_full_items() -> None:
    soon, late = mk("soon", days=30, quantity=1), mk("late", days=300)
    v = view_with(late, soon)
    assert decide(v).item.item_id == "soon"
    v.statuses["soon"] = ItemStatus(seats_used=1)  # grace of 1 seat is round(0.1) = 0
    assert decide(v).item.item_id == "late"


def test_refusal_reports_the_item_that_got_furthest() -> None:
    wrong_product = mk("p", product="other")
    full = mk("f", quantity=1)
    v = view_with(wrong_product, full)
    v.statuses["f"] = ItemStatus(seats_used=1)
    d = decide(v)
    assert refused_code(d) is Code.LIMIT_EXCEEDED and d.item_id == "f"


def test_missing_item_gives_124_when_nothing_else_fits() -> None:
    v = view_with(mk("a", product="other"))
    code = v.codes["216998-c"]
    v.codes["216998-c"] = HandshakeCode(name=code.name, organization_id="216998", items=("a", "gone"))
    assert refused_code(decide(v)) is Code.ITEM_MISSING
    v.items["b"] = mk("b")
    v.codes["216998-c"] = HandshakeCode(name=code.name, organization_id="216998", items=("gone", "b"))
    assert decide(v).item.item_id == "b"


def test_code_without_items_gives_104() -> None:
    v = view_with()
    assert refused_code(decide(v)) is Code.NO_MATCHING_ITEM


def test_instances_granted_for_concurrent_instance_only() -> None:
    item = mk("i", LicenseType.PER_CONCURRENT_INSTANCE, deployment_type=DeploymentType.SERVER, quantity=8)
    grant = decide(view_with(item), req(deployment_type=DeploymentType.SERVER, instances=3))
    assert isinstance(grant, hs.Grant) and grant.fit.instances == 3
    grant = decide(view_with(mk("d")), req(instances=3))
    assert isinstance(grant, hs.Grant) and grant.fit.instances == 1


def test_overused_instance_item_grants_only_n_across_servers() -> None:
    item = mk("i", LicenseType.PER_CONCURRENT_INSTANCE, deployment_type=DeploymentType.SERVER, quantity=8)
    v = view_with(item)
    server = req(deployment_type=DeploymentType.SERVER, instances=3)
    v.elsewhere["i"] = 6
    assert isinstance(decide(v, server), hs.Grant)  # not overused: the tolerance absorbs it
    v.statuses["i"] = ItemStatus(overused=True)
    assert refused_code(decide(v, server)) is Code.LIMIT_EXCEEDED
    v.elsewhere["i"] = 5
    assert isinstance(decide(v, server), hs.Grant)
