"""The pure rules of issue 25: version ranges and protocol versions, borrow limits, reservation arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lts_server.core import borrowing, reservations
from lts_server.core import handshake as hs
from lts_server.core.model import HandshakeCode, ItemStatus, LicenseType, Period, SeatLimit
from lts_server.core.versions import RangeError, check_range, protocol_problem, version_problem
from lts_server.errors import Code
from tests.test_core_handshake import mk, req, view_with

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


# -- versions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, inside", [
    ("3.0", True), ("4.9.9", True), ("4.1b1", True), ("5", False), ("5.0a1", False), ("2.9", False),
    ("10", False)])
def test_version_ranges_are_pep_440(version: str, inside: bool) -> None:
    assert (version_problem(version, ">=3.0,<5") is None) is inside


def test_a_request_without_a_version_or_with_a_bad_one_is_outside() -> None:
    assert "names no version" in (version_problem(None, ">=3") or "")
    assert "not a PEP 440 version" in (version_problem("banana", ">=3") or "")


@pytest.mark.parametrize("text", ["", "  ", ">=abc", "3.0", "=>3", "x" * 300])
def test_unparsable_ranges_are_refused(text: str) -> None:
    with pytest.raises(RangeError):
        check_range(text)


def test_protocol_versions() -> None:
    assert protocol_problem(1) is None
    assert protocol_problem(2) == "protocolVersion 2 is not spoken by this server; it speaks 1"
    decision = hs.decide(req(protocol_version=0), view_with(mk("a")), NOW, lambda c, p: True)
    assert isinstance(decision, hs.Refused) and decision.refusal.code is Code.BAD_PROTOCOL


def test_107_only_when_no_other_item_fits() -> None:
    old = mk("old", versions="<3")
    new = mk("new", versions=">=3.0,<5")
    view = view_with(old, new)
    grant = hs.decide(req(version="4.2"), view, NOW, lambda c, p: True)
    assert isinstance(grant, hs.Grant) and grant.item.item_id == "new"
    refused = hs.decide(req(version="6.0"), view, NOW, lambda c, p: True)
    assert isinstance(refused, hs.Refused) and refused.refusal.code is Code.INCOMPATIBLE_VERSION
    # Version is checked after product, deployment type and edition: an item of another product says 106 only
    # when no item got as far as the version.
    other = view_with(mk("viewer", product="viewer"), new)
    refused = hs.decide(req(version="6.0"), other, NOW, lambda c, p: True)
    assert isinstance(refused, hs.Refused) and refused.refusal.code is Code.INCOMPATIBLE_VERSION
    assert refused.item_id == "new"


# -- borrowing --------------------------------------------------------------------------------------

def code(**kw: object) -> HandshakeCode:
    return HandshakeCode(name="216998-c", organization_id="216998", items=("a",), **kw)  # type: ignore[arg-type]


def test_borrow_limits() -> None:
    item = mk("a", borrow_max_days=14)
    assert borrowing.borrow_problem(item, code(), 14) is None
    assert "over the 14 days" in (borrowing.borrow_problem(item, code(), 15) or "")
    assert "over the 5 days" in (borrowing.borrow_problem(item, code(borrow_max_days=5), 6) or "")
    assert "through 216998-c" in (borrowing.borrow_problem(item, code(borrow_max_days=5), 6) or "")
    assert "does not allow borrowing" in (borrowing.borrow_problem(item, code(borrow_max_days=0), 1) or "")
    # A code cannot raise the vendor's limit.
    assert borrowing.allowed_days(item, code(borrow_max_days=100)).days == 14
    assert "no borrowMaxDays" in (borrowing.borrow_problem(mk("a"), code(), 1) or "")
    scan = mk("s", LicenseType.PER_SCAN, borrow_max_days=3)
    assert "per-scan" in (borrowing.borrow_problem(scan, code(), 1) or "")


def test_a_borrow_ends_at_the_expiry_at_the_latest() -> None:
    item = mk("a", days=3, borrow_max_days=30)
    assert borrowing.borrowed_until(item, 10, NOW) == item.expires_at
    assert borrowing.borrowed_until(item, 2, NOW) == NOW + timedelta(days=2)


def test_a_borrowed_per_device_authorization_lasts_the_longer_of_period_and_borrow() -> None:
    yearly = view_with(mk("a", borrow_max_days=30))
    grant = hs.decide(req(borrow_days=10), yearly, NOW, lambda c, p: True)
    assert isinstance(grant, hs.Grant)
    assert grant.fit.borrowed_until == NOW + timedelta(days=10)
    assert grant.fit.expires_at == NOW + timedelta(days=365)
    daily = view_with(mk("a", period=Period.DAILY, borrow_max_days=30))
    grant = hs.decide(req(borrow_days=10), daily, NOW, lambda c, p: True)
    assert isinstance(grant, hs.Grant) and grant.fit.expires_at == NOW + timedelta(days=10)


def test_concurrent_borrows_take_seats_up_to_the_quantity() -> None:
    conc = mk("a", LicenseType.PER_CONCURRENT_DEVICE, borrow_max_days=5, quantity=2)
    view = view_with(conc)
    grant = hs.decide(req(borrow_days=1), view, NOW, lambda c, p: True)
    assert isinstance(grant, hs.Grant) and grant.fit.seat is hs.SeatAction.CLAIM and grant.fit.limit == 2
    view.statuses["a"] = ItemStatus(seats_used=2)
    refused = hs.decide(req(borrow_days=1), view, NOW, lambda c, p: True)
    assert isinstance(refused, hs.Refused) and refused.refusal.code is Code.LIMIT_EXCEEDED and refused.full == ("a",)
    # Without borrowing the item is not limited by its borrows.
    assert isinstance(hs.decide(req(), view, NOW, lambda c, p: True), hs.Grant)


# -- reservations -----------------------------------------------------------------------------------

def test_claim_kinds() -> None:
    share = reservations.Share
    assert reservations.claim_kind(5, 11, share()) is reservations.ClaimKind.SHARED
    assert reservations.claim_kind(7, 11, share(others_reserved=4)) is None
    assert reservations.claim_kind(10, 11, share(reserved_left=1)) is reservations.ClaimKind.RESERVED
    assert reservations.claim_kind(11, 11, share(reserved_left=1)) is None
    assert reservations.claim_kind(0, 11, share(cap_left=0, reserved_left=3)) is None
    assert reservations.claim_kind(8, 11, share(waiting=3)) is None


def test_refusal_names_the_full_items_for_the_queue() -> None:
    a, b = mk("a", quantity=1), mk("b", quantity=1)
    view = view_with(a, b)
    view.statuses.update({"a": ItemStatus(seats_used=1), "b": ItemStatus(seats_used=1)})
    refused = hs.decide(req(), view, NOW, lambda c, p: True)
    assert isinstance(refused, hs.Refused) and set(refused.full) == {"a", "b"}
    view.waiting["a"] = 1
    view.statuses["a"] = ItemStatus()
    refused = hs.decide(req(), view, NOW, lambda c, p: True)
    assert isinstance(refused, hs.Refused) and "waiting in the queue" in refused.refusal.detail


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), st.booleans()), max_size=120),
       st.integers(0, 6), st.integers(0, 4), st.one_of(st.none(), st.integers(1, 8)))
def test_reservations_hold_under_any_claims_and_releases(steps: list[tuple[str, bool]], rx: int, ry: int,
                                                         cap: int | None) -> None:
    """Whatever the order of claims and releases: never more than the limit, never past a cap, the invariant
    U + unused <= L, and a code with reserved seats left always gets one while U < L."""
    limit = 11  # quantity 10 and a grace of 1
    limits = {"x": SeatLimit("i", rx, cap), "y": SeatLimit("i", ry)}
    codes = {n: HandshakeCode(name=n, organization_id="216998", items=("i",),
                              seat_limits=(limits[n],) if n in limits else ()) for n in ("x", "y", "z")}
    held = {"x": 0, "y": 0, "z": 0}
    used = 0
    for name, claim in steps:
        share = reservations.share_of(codes[name], "i", limits, held)
        if claim:
            kind = reservations.claim_kind(used, limit, share)
            if share.reserved_left and used < limit and (share.cap_left is None or share.cap_left > 0):
                assert kind is reservations.ClaimKind.RESERVED
            if kind is not None:
                used += 1
                held[name] += 1
        elif held[name]:
            used -= 1
            held[name] -= 1
        assert used <= limit
        assert cap is None or held["x"] <= cap
        assert used + reservations.total_unused(limits, held) <= limit


def test_limit_problems_add_every_code() -> None:
    item = mk("i", quantity=10)
    a = HandshakeCode(name="o-a", organization_id="216998", items=("i",), seat_limits=(SeatLimit("i", 6),))
    b = HandshakeCode(name="o-b", organization_id="216998", items=("i",), seat_limits=(SeatLimit("i", 5),))
    [(field, message)] = reservations.limit_problems(b, {"i": item}, [a])
    assert field == "itemLimits.i.reservedSeats" and "total 11 seats" in message and "o-a 6" in message

