"""Domain values: license types and their rules, license items, licenses, handshake codes.

This module is the one table of facts about license types (what each limits,
which fields it needs, its grace); everything else asks it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum


class DeploymentType(StrEnum):
    BROWSER = "browser"
    MOBILE = "mobile"
    SERVER = "server"
    DESKTOP = "desktop"
    EMBEDDED = "embedded"


class LicenseType(StrEnum):
    PER_SCAN = "per-scan"
    PER_PAGE = "per-page"
    PER_DEVICE = "per-device"
    PER_SERVER = "per-server"
    PER_CONCURRENT_DEVICE = "per-concurrent-device"
    PER_CONCURRENT_INSTANCE = "per-concurrent-instance"
    PER_DOMAIN = "per-domain"


class Period(StrEnum):
    YEARLY = "yearly"
    QUARTERLY = "quarterly"
    MONTHLY = "monthly"
    DAILY = "daily"


PERIOD_LENGTH: dict[Period, timedelta] = {
    Period.YEARLY: timedelta(days=365),
    Period.QUARTERLY: timedelta(days=90),
    Period.MONTHLY: timedelta(days=30),
    Period.DAILY: timedelta(days=1),
}

EXPIRY_GRACE = timedelta(days=7)
SLICE = timedelta(minutes=3)
# What a cached authorization of a type without a seat period is good for:
# long enough to ride out a short outage, short enough that a revocation or
# an exhausted quota reaches devices within the hour.
SHORT_AUTHORIZATION = timedelta(hours=1)
CONCURRENT_TOLERANCE_FACTOR = 1000


class Counts(StrEnum):
    """What a license type limits."""

    SEATS = "seats"  # distinct devices holding a seat for a period
    UNITS = "units"  # units consumed from a quota
    CONCURRENCY = "concurrency"  # devices active per time slice
    INSTANCES = "instances"  # instances active per time slice
    NOTHING = "nothing"  # unlimited within its domain


@dataclass(frozen=True)
class TypeRules:
    counts: Counts
    needs_period: bool = False
    needs_domain: bool = False
    # Deployment types a request may come from; None means any.
    deployments: frozenset[DeploymentType] | None = None
    grace_percent: int = 0
    # A device may take it offline for days (borrowDays): the types that hold a seat per device.
    borrowable: bool = False

    @property
    def per_slice(self) -> bool:
        """Counted per time slice, with an overuse tolerance instead of a hard limit."""
        return self.counts in (Counts.CONCURRENCY, Counts.INSTANCES)


LICENSE_TYPES: dict[LicenseType, TypeRules] = {
    LicenseType.PER_SCAN: TypeRules(Counts.UNITS, grace_percent=5),
    LicenseType.PER_PAGE: TypeRules(Counts.UNITS, grace_percent=5),
    LicenseType.PER_DEVICE: TypeRules(Counts.SEATS, needs_period=True, grace_percent=10, borrowable=True),
    LicenseType.PER_SERVER: TypeRules(
        Counts.SEATS, needs_period=True, grace_percent=10, deployments=frozenset({DeploymentType.SERVER}),
        borrowable=True,
    ),
    LicenseType.PER_CONCURRENT_DEVICE: TypeRules(Counts.CONCURRENCY, borrowable=True),
    LicenseType.PER_CONCURRENT_INSTANCE: TypeRules(
        Counts.INSTANCES, deployments=frozenset({DeploymentType.SERVER})
    ),
    LicenseType.PER_DOMAIN: TypeRules(Counts.NOTHING, needs_domain=True),
}


def grace_allowance(license_type: LicenseType, quantity: int) -> int:
    """Extra seats or units allowed past the quantity: round(p% x quantity), half up."""
    percent = LICENSE_TYPES[license_type].grace_percent
    return (quantity * percent * 2 + 100) // 200


def hard_limit(license_type: LicenseType, quantity: int) -> int:
    return quantity + grace_allowance(license_type, quantity)


@dataclass(frozen=True)
class Item:
    """One license item: a permit that cannot be split."""

    item_id: str
    license_id: str
    organization_id: str
    product: str
    deployment_type: DeploymentType
    license_type: LicenseType
    quantity: int
    starts_at: datetime
    expires_at: datetime
    edition: str | None = None
    period: Period | None = None
    domain: str | None = None
    # Days a device may borrow the item offline (None: no borrowing), and the client versions it serves
    # (a PEP 440 range, core/versions.py; None: any).
    borrow_max_days: int | None = None
    versions: str | None = None

    @property
    def rules(self) -> TypeRules:
        return LICENSE_TYPES[self.license_type]


@dataclass(frozen=True)
class License:
    license_id: str
    alias: str
    organization_id: str
    license_text_version: str
    status: str
    revision: int
    issued_at: datetime
    items: tuple[Item, ...]
    server_uuid: str | None = None
    # The server's identity key the vendor bound the file to (base64 raw Ed25519), with server_uuid.
    server_key: str | None = None

    def renewed_by(self, new: License) -> License:
        """What importing `new` over this license stores: its fields and items, and the items of this one
        it no longer lists (a renewal keeps them; see docs/license-file-format.md)."""
        listed = {i.item_id for i in new.items}
        return replace(new, items=new.items + tuple(i for i in self.items if i.item_id not in listed))

    def same_as(self, other: License) -> bool:
        """The same license, whatever order each lists its items in (a file in its own order, the
        database by item id)."""
        return (replace(self, items=()) == replace(other, items=())
                and {i.item_id: i for i in self.items} == {i.item_id: i for i in other.items}
                and len(self.items) == len(other.items))


@dataclass(frozen=True)
class ItemStatus:
    """The live counters of an item, as the ledger keeps them."""

    revoked: bool = False
    seats_used: int = 0
    units_used: int = 0
    overuse_used: int = 0
    overused: bool = False


@dataclass(frozen=True)
class SeatLimit:
    """What one handshake code may take of one item's seats (core/reservations.py)."""

    item_id: str
    reserved_seats: int = 0  # seats only this code may take
    max_seats: int | None = None  # the most this code holds; None: no cap


@dataclass(frozen=True)
class HandshakeCode:
    name: str
    organization_id: str
    items: tuple[str, ...]
    is_default: bool = False
    custom_order: bool = False
    domains: tuple[str, ...] = ()
    app_ids: tuple[str, ...] = ()
    process_names: tuple[str, ...] = ()
    password_hash: str | None = None
    source_license_id: str | None = None
    # Lowers the items' borrowing limit for this code (0: no borrowing through it); None: the items' own.
    borrow_max_days: int | None = None
    seat_limits: tuple[SeatLimit, ...] = ()

    def seat_limit(self, item_id: str) -> SeatLimit | None:
        for limit in self.seat_limits:
            if limit.item_id == item_id:
                return limit
        return None


def domain_matches(pattern: str, domain: str) -> bool:
    """`*.example.com` matches example.com and any subdomain; a plain name matches itself."""
    pattern = pattern.lower().rstrip(".")
    domain = domain.lower().rstrip(".")
    if pattern.startswith("*."):
        base = pattern[2:]
        return domain == base or domain.endswith("." + base)
    return domain == pattern
