"""The handshake decision: which item (if any) authorizes a device, and why not.

Pure: the caller passes the request, a read-only view of the ledger and `now`,
and gets back a Grant or a Refusal; applying it is the shell's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Protocol

from lts_server.core import borrowing
from lts_server.core.model import (
    EXPIRY_GRACE,
    PERIOD_LENGTH,
    SHORT_AUTHORIZATION,
    Counts,
    DeploymentType,
    HandshakeCode,
    Item,
    ItemStatus,
    LicenseType,
    domain_matches,
    hard_limit,
)
from lts_server.core.ordering import usage_order
from lts_server.core.reservations import FREE, ClaimKind, Share, claim_kind, no_room
from lts_server.core.versions import DEFAULT_PROTOCOL, protocol_problem, version_problem
from lts_server.errors import Code, Refusal

DOMAIN_AUTHORIZATION = timedelta(days=1)
# What to do after a refused borrow (115): the generic 115 step speaks of license-type fields.
BORROW_NEXT = ("borrow for at most the days the item's license (borrowMaxDays) and the code allow, or handshake "
               "without borrowDays")


@dataclass(frozen=True)
class Request:
    client_uuid: str
    product: str
    deployment_type: DeploymentType
    handshake_code: str | None = None
    organization_id: str | None = None
    session_password: str | None = None
    version: str | None = None
    edition: str | None = None
    domain: str | None = None
    app_id: str | None = None
    process_name: str | None = None
    instances: int = 1
    protocol_version: int = DEFAULT_PROTOCOL
    # Borrow the seat offline for this many days (core/borrowing.py).
    borrow_days: int | None = None


class View(Protocol):
    """What the decision reads from the ledger."""

    codes: Mapping[str, HandshakeCode]
    items: Mapping[str, Item]

    def default_codes(self, organization_id: str) -> list[str]:
        """The codes a request naming only the organization may use, in the order they are tried."""
        ...

    def organization_known(self, organization_id: str) -> bool: ...

    def status(self, item_id: str) -> ItemStatus: ...

    def seat_expiry(self, item_id: str, client_uuid: str) -> datetime | None: ...

    def instances_elsewhere(self, item_id: str, client_uuid: str, now: datetime) -> int:
        """Instances (one per device on concurrent-device items) granted to other clients
        whose authorization is still running."""
        ...

    def share(self, item_id: str, code: HandshakeCode) -> Share:
        """What the code may take of the item's seats: its reservations, the others', its cap, the queue."""
        ...


class SeatAction(Enum):
    NONE = "none"
    CLAIM = "claim"
    REFRESH = "refresh"


@dataclass(frozen=True)
class Fit:
    """An item that authorizes the request, and on what terms."""

    item: Item
    seat: SeatAction
    expires_at: datetime
    instances: int
    limit: int  # seats or units the item may reach, grace included
    reserved: bool = False  # CLAIM: one of the code's reserved seats (core/reservations.py)
    borrowed_until: datetime | None = None  # a borrowed seat is held until then


@dataclass(frozen=True)
class Grant:
    code: HandshakeCode
    fit: Fit

    @property
    def item(self) -> Item:
        return self.fit.item


@dataclass(frozen=True)
class NoRoom(Refusal):
    """120 because every seat the request may take is taken (a request with waitSeconds may queue)."""


@dataclass(frozen=True)
class Refused:
    refusal: Refusal
    code_name: str | None = None
    item_id: str | None = None
    # On a 120 for want of a seat: every item of the code that refused for that reason (a queue waits on them).
    full: tuple[str, ...] = ()


Decision = Grant | Refused


def resolve_codes(req: Request, view: View) -> list[HandshakeCode] | Refused:
    """The code the request names; or, naming only an organization, every default code of it."""
    if req.handshake_code is not None:
        code = view.codes.get(req.handshake_code)
        if code is None:
            return Refused(Refusal(Code.UNKNOWN_CODE, repr(req.handshake_code)), req.handshake_code)
        if req.organization_id is not None and req.organization_id != code.organization_id:
            return Refused(
                Refusal(Code.CODE_ORG_MISMATCH, f"{code.name} belongs to organization {code.organization_id}"),
                code.name,
            )
        return [code]
    if req.organization_id is not None:
        codes = [view.codes[n] for n in view.default_codes(req.organization_id) if n in view.codes]
        if not codes:
            return Refused(Refusal(Code.UNKNOWN_ORGANIZATION, repr(req.organization_id)))
        return codes
    return Refused(Refusal(Code.NO_CODE_NOR_ORG))


def check_validation_fields(req: Request, code: HandshakeCode) -> Refusal | None:
    """The code's binding for the request's kind of client: domain, app id or process name."""
    if req.deployment_type is DeploymentType.BROWSER and code.domains:
        if not req.domain or not any(domain_matches(p, req.domain) for p in code.domains):
            return Refusal(Code.DOMAIN_MISMATCH, f"{_given('domain', req.domain)} is not allowed for {code.name}")
    elif req.deployment_type is DeploymentType.MOBILE and code.app_ids:
        if req.app_id not in code.app_ids:
            return Refusal(Code.VALIDATION_FIELD_MISMATCH,
                           f"{_given('appId', req.app_id)} is not allowed for {code.name}")
    elif req.deployment_type not in (DeploymentType.BROWSER, DeploymentType.MOBILE) and code.process_names:
        if req.process_name not in code.process_names:
            return Refusal(
                Code.VALIDATION_FIELD_MISMATCH, f"{_given('processName', req.process_name)} is not allowed for {code.name}"
            )
    return None


def _given(field: str, value: str | None) -> str:
    """How a message names what the request sent in a field: the value, or that it sent none."""
    return f"{field} {value!r}" if value else f"a request without {field}"


# The checks an item goes through, in order; a refusal reports the item that
# got furthest down this list (the first such item in usage order on a tie).
CHECKS = (
    Code.PRODUCT_MISMATCH,
    Code.DEPLOYMENT_MISMATCH,
    Code.EDITION_MISMATCH,
    Code.INCOMPATIBLE_VERSION,
    Code.NOT_YET_EFFECTIVE,
    Code.EXPIRED,
    Code.REVOKED,
    Code.TYPE_INCOMPATIBLE,
    Code.QUOTA_EXCEEDED_BY_REQUEST,
    Code.LIMIT_EXCEEDED,
)


def authorization_end(item: Item, now: datetime, judged: datetime | None = None) -> datetime:
    """How long an authorization from this item lasts (see docs/api.md). `judged`: the time the item's dates
    are judged at when the clock is behind the server's records (lts_server/clock.py); never earlier than now."""
    at = judged or now
    cap = item.expires_at if at < item.expires_at else item.expires_at + EXPIRY_GRACE
    if item.period is not None:
        length = PERIOD_LENGTH[item.period]
    elif item.license_type is LicenseType.PER_DOMAIN:
        length = DOMAIN_AUTHORIZATION
    else:
        length = SHORT_AUTHORIZATION
    return min(now + length, cap)


def fit(req: Request, item: Item, status: ItemStatus, seat_expiry: datetime | None, now: datetime,
        instances_elsewhere: int = 0, code: HandshakeCode | None = None,
        share: Callable[[], Share] | None = None, judged: datetime | None = None) -> Refusal | Fit:
    """Whether one item authorizes the request, or the first check it fails. The item's start, expiry and
    grace are judged at `judged` when given (a clock set back never extends them), else at now."""
    rules = item.rules
    at = judged or now
    if item.product.casefold() != req.product.casefold():
        return Refusal(Code.PRODUCT_MISMATCH, f"item {item.item_id} is for {item.product}")
    if item.deployment_type is not req.deployment_type:
        return Refusal(Code.DEPLOYMENT_MISMATCH, f"item {item.item_id} is for {item.deployment_type.value}")
    if item.edition is not None and (req.edition or "").casefold() != item.edition.casefold():
        return Refusal(Code.EDITION_MISMATCH, f"item {item.item_id} is for edition {item.edition}")
    if item.versions is not None and (outside := version_problem(req.version, item.versions)):
        return Refusal(Code.INCOMPATIBLE_VERSION, f"item {item.item_id}: {outside}")
    if at < item.starts_at:
        return Refusal(Code.NOT_YET_EFFECTIVE, f"item {item.item_id} starts at {item.starts_at.isoformat()}")
    if at >= item.expires_at + EXPIRY_GRACE:
        return Refusal(Code.EXPIRED, f"item {item.item_id} expired at {item.expires_at.isoformat()}")
    if status.revoked:
        return Refusal(Code.REVOKED, f"item {item.item_id} is revoked")
    if rules.needs_domain:
        if not req.domain:
            return Refusal(Code.TYPE_INCOMPATIBLE, f"item {item.item_id} is per-domain and the request names no domain")
        if item.domain and not domain_matches(item.domain, req.domain):
            return Refusal(Code.DOMAIN_MISMATCH, f"item {item.item_id} is for {item.domain}")
    borrowed_until = None
    if req.borrow_days is not None:
        refused = borrowing.borrow_problem(item, code, req.borrow_days) if code else "no handshake code"
        if refused:
            return Refusal(Code.TYPE_INCOMPATIBLE, refused, next_step=BORROW_NEXT)
        borrowed_until = borrowing.borrowed_until(item, req.borrow_days, now)
    instances = req.instances if rules.counts is Counts.INSTANCES else 1
    if rules.counts is Counts.INSTANCES and instances > item.quantity:
        return Refusal(
            Code.QUOTA_EXCEEDED_BY_REQUEST, f"{instances} instances asked, item {item.item_id} allows {item.quantity}"
        )
    limit = hard_limit(item.license_type, item.quantity)
    seat = SeatAction.NONE
    reserved = False
    # Seats: per-device items always; a concurrent item only for a borrow, at most `quantity` borrowed at once.
    seated = rules.counts is Counts.SEATS or (borrowed_until is not None and rules.counts is Counts.CONCURRENCY)
    if seated:
        if rules.counts is Counts.CONCURRENCY:
            limit = item.quantity
        if seat_expiry is not None:
            seat = SeatAction.REFRESH
        else:
            room = share() if share is not None else FREE
            kind = claim_kind(status.seats_used, limit, room)
            if kind is None:
                detail = no_room(item, code, status.seats_used, limit, room) if code else f"item {item.item_id} is full"
                if rules.counts is Counts.CONCURRENCY:
                    detail = f"all {item.quantity} borrowable seats of item {item.item_id} are borrowed"
                return NoRoom(Code.LIMIT_EXCEEDED, detail)
            seat = SeatAction.CLAIM
            reserved = kind is ClaimKind.RESERVED
    elif rules.counts is Counts.UNITS and status.units_used >= limit:
        return Refusal(Code.LIMIT_EXCEEDED, f"the quota of item {item.item_id} and its grace are used up")
    if rules.per_slice and status.overused and instances_elsewhere + instances > item.quantity:
        # Overuse tolerance used up: only N devices (or instances) across all clients.
        what = "instances" if rules.counts is Counts.INSTANCES else "devices"
        return Refusal(
            Code.LIMIT_EXCEEDED,
            f"item {item.item_id} is overused; {instances_elsewhere} of {item.quantity} {what} are in use",
        )
    expires = authorization_end(item, now, judged)
    if borrowed_until is not None:
        expires = max(expires, borrowed_until) if rules.counts is Counts.SEATS else borrowed_until
    return Fit(item, seat, expires, instances, limit, reserved, borrowed_until)


def _rank(refusal: Refusal) -> int:
    if refusal.code is Code.DOMAIN_MISMATCH:
        return CHECKS.index(Code.TYPE_INCOMPATIBLE)
    return CHECKS.index(refusal.code) if refusal.code in CHECKS else -1


def held_seat(req: Request, view: View, order: list[str], now: datetime,
              code: HandshakeCode | None = None, judged: datetime | None = None) -> Fit | None:
    """The seat this device already holds on one of the code's items, if that item still covers the request.

    One device, one seat per code: a device seated on a later item keeps it
    even when an earlier item gains room, so it never ends up holding two.
    """
    for item_id in order:
        expiry = view.seat_expiry(item_id, req.client_uuid)
        item = view.items.get(item_id)
        if expiry is None or item is None:
            continue
        outcome = fit(req, item, view.status(item_id), expiry, now, code=code, judged=judged)
        if isinstance(outcome, Fit):
            return outcome
    return None


def decide(
    req: Request,
    view: View,
    now: datetime,
    password_matches: Callable[[HandshakeCode, str | None], bool],
    judged: datetime | None = None,
) -> Decision:
    unspoken = protocol_problem(req.protocol_version)
    if unspoken is not None:
        return Refused(Refusal(Code.BAD_PROTOCOL, unspoken), req.handshake_code)
    resolved = resolve_codes(req, view)
    if isinstance(resolved, Refused):
        return resolved
    # Several codes only for a request naming just the organization: its default codes, oldest license first.
    admitted: list[tuple[HandshakeCode, list[str]]] = []  # with its usage order
    first_refusal: Refused | None = None
    for code in resolved:
        if code.password_hash is not None and not password_matches(code, req.session_password):
            first_refusal = first_refusal or Refused(Refusal(Code.WRONG_PASSWORD), code.name)
            continue
        invalid = check_validation_fields(req, code)
        if invalid is not None:
            first_refusal = first_refusal or Refused(invalid, code.name)
            continue
        admitted.append((code, usage_order(code.items, view.items, code.custom_order)))
    if not admitted:
        assert first_refusal is not None
        return first_refusal
    # One device, one seat: a seat it holds through any of the codes comes before usage order.
    for code, order in admitted:
        held = held_seat(req, view, order, now, code, judged)
        if held is not None:
            return Grant(code, held)
    best: Refused | None = None
    for code, order in admitted:
        decision = _walk(req, code, order, view, now, judged)
        if isinstance(decision, Grant):
            return decision
        if best is None or _rank(decision.refusal) > _rank(best.refusal):
            best = decision
    assert best is not None
    return best


def _walk(req: Request, code: HandshakeCode, order: list[str], view: View, now: datetime,
          judged: datetime | None = None) -> Decision:
    """The code's items in usage order: the first that fits, or the refusal of the one that got furthest."""
    best: tuple[int, Refusal, str] | None = None
    missing: str | None = None
    full: list[str] = []
    for item_id in order:
        item = view.items.get(item_id)
        if item is None:
            missing = missing or item_id
            continue
        status = view.status(item_id)
        elsewhere = (
            view.instances_elsewhere(item_id, req.client_uuid, now)
            if status.overused and item.rules.per_slice
            else 0
        )
        outcome = fit(req, item, status, view.seat_expiry(item_id, req.client_uuid), now, elsewhere, code,
                      lambda: view.share(item_id, code), judged)  # noqa: B023 - called before the loop moves on
        if isinstance(outcome, Fit):
            return Grant(code, outcome)
        if isinstance(outcome, NoRoom):
            full.append(item_id)
        if best is None or _rank(outcome) > best[0]:
            best = (_rank(outcome), outcome, item_id)
    if missing is not None:
        return Refused(Refusal(Code.ITEM_MISSING, f"item {missing} of {code.name} no longer exists"), code.name, missing)
    if best is None:
        return Refused(Refusal(Code.NO_MATCHING_ITEM, f"{code.name} has no license items"), code.name)
    return Refused(best[1], code.name, best[2], tuple(full) if isinstance(best[1], NoRoom) else ())
