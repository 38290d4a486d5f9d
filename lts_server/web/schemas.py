"""Request and response bodies of the device API, validated by msgspec."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from lts_server.core.borrowing import MAX_DAYS as MAX_BORROW_DAYS
from lts_server.core.model import DeploymentType
from lts_server.core.usage import MAX_COUNT, MAX_RECORDS
from lts_server.core.versions import DEFAULT_PROTOCOL

MAX_BODY = 16 * 1024

Short = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Field = Annotated[str, msgspec.Meta(max_length=256)]
ClientUuid = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:{}-]+$")]
ProtocolVersion = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31)]


class HandshakeBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    client_uuid: ClientUuid
    product: Short
    deployment_type: DeploymentType
    handshake_code: Short | None = None
    organization_id: Short | None = None
    session_password: Field | None = None
    version: Short | None = None
    edition: Short | None = None
    domain: Annotated[str, msgspec.Meta(max_length=253)] | None = None
    app_id: Field | None = None
    process_name: Field | None = None
    instances: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    # Opaque, computed by the device (lts_client derives one); at most 256 bytes of UTF-8. The first grant
    # binds the client UUID to it; another one later is a clone (151).
    device_fingerprint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    # The protocol the request speaks (105 names the versions this server speaks).
    protocol_version: ProtocolVersion = DEFAULT_PROTOCOL
    # Borrow the seat offline for this many days (per-device, per-server, per-concurrent-device items
    # whose license allows it: borrowMaxDays).
    borrow_days: Annotated[int, msgspec.Meta(ge=1, le=MAX_BORROW_DAYS)] | None = None
    # Wait up to this many seconds for a seat instead of a refusal (at most [queue] max_wait_s).
    wait_seconds: Annotated[int, msgspec.Meta(ge=0, le=2**31, description=(
        "seconds to wait in the item's queue for a seat; at most the server's [queue] max_wait_s "
        "(default 300; 400 above it)"))] | None = None


class ImportDismissBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    # The rejected file's path as `ltsctl imports` lists it, or its file name.
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class SeatCount(msgspec.Struct, rename="camel"):
    used: int
    quantity: int
    limit: int
    left: int


class Authorization(msgspec.Struct, rename="camel", omit_defaults=True):
    authorization_id: str
    server_uuid: str
    handshake_code: str
    organization_id: str
    item_id: str
    license_id: str
    product: str
    deployment_type: str
    license_type: str
    client_uuid: str
    issued_at: str
    expires_at: str
    # When the device should ask again (it may run on this authorization offline until expiresAt). A datetime:
    # msgspec writes RFC 3339 (UTC, "Z") itself, a tenth of what formatting it here costs per grant.
    refresh_by: datetime
    edition: str | None = None
    domain: str | None = None
    instances: int | None = None
    seats: SeatCount | None = None
    units: SeatCount | None = None
    # With a license bound to this server's identity key: SHA-256 (hex) of the vendor's binding statement.
    binding_sha256: str | None = None
    # A borrowed seat: held for this device, which may work offline, until then.
    borrowed_until: str | None = None


class BindingAnswer(msgspec.Struct, rename="camel"):
    """The vendor's binding of the license to this server (docs/authorization-format.md)."""

    key_id: str
    statement: str
    signature: str


class HandshakeAnswer(msgspec.Struct, rename="camel"):
    """A granted handshake. The server writes `authorization` first and signs its exact bytes."""

    authorization: Authorization
    signature: str
    key_id: str
    # The device's secret for signing its usage reports (X-LTS-Report-MAC); outside the signed part.
    report_key: str
    binding: BindingAnswer | None = None


class ServerInfo(msgspec.Struct, rename="camel"):
    server_uuid: str
    version: str
    key_id: str
    public_key: str


class UsageRecordBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    slot: datetime
    product: Short
    operation: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    count: Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
    item_id: Short | None = None


class UsageBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    report_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:{}-]+$")]
    client_uuid: ClientUuid
    handshake_code: Short
    records: Annotated[list[UsageRecordBody], msgspec.Meta(max_length=MAX_RECORDS)]
    protocol_version: ProtocolVersion = DEFAULT_PROTOCOL


class ReturnBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """Give a borrowed seat back early; signed like a usage report (X-LTS-Report-MAC)."""

    client_uuid: ClientUuid
    handshake_code: Short
    protocol_version: ProtocolVersion = DEFAULT_PROTOCOL


class ReturnAnswer(msgspec.Struct, rename="camel"):
    client_uuid: str
    handshake_code: str
    item_id: str | None
    # Always true: the device holds no borrowed seat of the code now.
    returned: bool
    # Whether this request released it (false: returned before, or the borrow had lapsed).
    released: bool
    borrowed_until: str | None = None


MIN_PASSWORD = 12
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
NewPassword = Annotated[str, msgspec.Meta(min_length=MIN_PASSWORD, max_length=1024,
                                          description=f"at least {MIN_PASSWORD} characters")]


class SetupBody(msgspec.Struct, forbid_unknown_fields=True):
    password: NewPassword


class LoginBody(msgspec.Struct, forbid_unknown_fields=True):
    password: Password


class PasswordChangeBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    current_password: Password
    new_password: NewPassword


# Answers, described here so that the OpenAPI document states their shape.

class Health(msgspec.Struct, omit_defaults=True):
    status: str
    reason: str | None = None


class ServerList(msgspec.Struct):
    servers: list[str]


class UsageAnswer(msgspec.Struct, rename="camel"):
    report_id: str
    duplicate: bool
    accepted: int


class SetupAnswer(msgspec.Struct):
    user: str
    setup: bool


class TokenAnswer(msgspec.Struct, rename="camel"):
    token: str
    expires_at: str


class PasswordChanged(msgspec.Struct, rename="camel"):
    changed: bool
    token: str
    expires_at: str


class ItemLimitBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    # Seats of the item only this code may take (all reservations on an item: at most its quantity).
    # The ranges are checked with the item named (core/reservations.py): 0 or more, 1 or more.
    reserved_seats: Annotated[int, msgspec.Meta(le=1_000_000_000_000, description=(
        "0 or more; the reservations of all codes on an item add up to at most its quantity"))] = 0
    # The most seats of the item this code ever holds; absent or null: no cap.
    max_seats: Annotated[int, msgspec.Meta(le=1_000_000_000_000, description=(
        "1 or more, not below reservedSeats; absent or null: no cap"))] | None = None


ItemLimits = Annotated[dict[Short, ItemLimitBody], msgspec.Meta(max_length=1000)]
BorrowDays = Annotated[int, msgspec.Meta(ge=0, le=MAX_BORROW_DAYS)]


Value = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Values = Annotated[list[Value], msgspec.Meta(max_length=100)]
ItemIds = Annotated[list[Short], msgspec.Meta(max_length=1000)]


class CodeCreateBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    organization_id: Short
    custom: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
    items: ItemIds = []
    domains: Values = []
    app_ids: Values = []
    process_names: Values = []
    session_password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    # Lowers the items' borrowMaxDays for this code (0: no borrowing through it).
    borrow_max_days: BorrowDays | None = None
    # Per item: reservedSeats, maxSeats.
    item_limits: ItemLimits = {}


class CodeEditBody(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    custom: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    items: ItemIds | None = None
    domains: Values | None = None
    app_ids: Values | None = None
    process_names: Values | None = None
    # A string sets the password; "" removes it; absent leaves it.
    session_password: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    # A number sets it; null removes the code's own limit; absent leaves it.
    borrow_max_days: BorrowDays | None | msgspec.UnsetType = msgspec.UNSET
    # Replaces every limit of the code ({} removes them); absent leaves them.
    item_limits: ItemLimits | None = None


class UsageOrderBody(msgspec.Struct, forbid_unknown_fields=True):
    items: ItemIds


class ArchiveBody(msgspec.Struct, forbid_unknown_fields=True):
    # ISO 8601 with a time zone: device events stamped before it are archived.
    before: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
