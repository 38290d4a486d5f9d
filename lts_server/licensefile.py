"""Signed license files: the format, signing, parsing and verification.

A file is a short header and the payload, separated by one empty line:

    LTS-LICENSE-FILE 1
    Key-Id: 3f2a9c0d1e4b5a68
    Signature: <base64 Ed25519 signature of the payload bytes>

    { ...the payload, pretty-printed JSON... }

The signature covers the payload bytes exactly as they are in the file, so no
canonicalisation step exists that two implementations could do differently.
See docs/license-file-format.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# The binding statement's format is the device's to define (lts-client); lts-license writes it, the server checks it.
from lts_client.trust import BadBinding, BindingStatement, BoundItem, binding_statement, parse_binding

from lts_server.core.model import (
    LICENSE_TYPES,
    Counts,
    DeploymentType,
    Item,
    License,
    LicenseType,
    Period,
)
from lts_server.core.times import iso
from lts_server.core.versions import RangeError, check_range
from lts_server.identity import key_id

FORMAT_VERSION = 1
MAGIC = b"LTS-LICENSE-FILE"
MAX_FILE_BYTES = 1024 * 1024
# The most seats, devices or instances an item may count: with its grace (10%) still a 32-bit number, the
# database's INTEGER on PostgreSQL. Quotas (units) are BIGINT and go to the schema's 10^12.
MAX_COUNTED = 1_000_000_000
_HEADER = re.compile(
    rb"\ALTS-LICENSE-FILE (?P<version>[0-9]+)\nKey-Id: (?P<key_id>[0-9a-f]{16})\n"
    rb"Signature: (?P<signature>[A-Za-z0-9+/]{86}==)\n\n"
)

Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Organization ids carry no hyphen: a code name is "{organizationId}-{custom}".
OrganizationId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._]{0,63}$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
DomainPattern = Annotated[
    str,
    msgspec.Meta(pattern=r"^(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}$", max_length=253),
]
Uuid = Annotated[
    str, msgspec.Meta(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
]
Moment = Annotated[datetime, msgspec.Meta(tz=True)]
# base64 of a raw 32-byte Ed25519 public key, and of a 64-byte signature.
RawKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+/]{43}=$")]
Base64 = Annotated[str, msgspec.Meta(pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
                                     max_length=4 * MAX_FILE_BYTES // 3)]
SignatureText = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class ItemPayload(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    item_id: Id
    product: Name
    edition: Name | None = None
    deployment_type: DeploymentType
    license_type: LicenseType
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000_000)]
    period: Period | None = None
    domain: DomainPattern | None = None
    starts_at: Moment
    expires_at: Moment
    # Days a device may borrow the item offline; absent: no borrowing (core/borrowing.py).
    borrow_max_days: Annotated[int, msgspec.Meta(ge=1, le=365)] | None = None
    # The client versions the item serves, a PEP 440 range such as ">=3.0,<5"; absent: any (core/versions.py).
    versions: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


class Payload(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    format: Literal[1]
    license_id: Id
    alias: Name
    organization_id: OrganizationId
    license_text_version: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    status: Literal["New", "Activated"]
    server_uuid: Uuid | None = None
    # The binding to the server's identity key (docs/authorization-format.md): the key, and the vendor's
    # statement naming it with the license's items (base64 of its exact bytes), signed by the same vendor key.
    server_key: RawKey | None = None
    binding: Base64 | None = None
    binding_signature: SignatureText | None = None
    revision: Annotated[int, msgspec.Meta(ge=1)]
    issued_at: Moment
    items: Annotated[list[ItemPayload], msgspec.Meta(min_length=1, max_length=1000)]


class LicenseFileError(Exception):
    """Why a file is not (or not yet) an importable license, for a person to read."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def default_alias(license_id: str, activated: datetime) -> str:
    return f"DM_{license_id}_Date{activated:%Y%m%d}"


def problems(payload: Payload, signed: bool = True) -> list[tuple[str, str]]:
    """Rules a typed payload must also obey: (field path, what is wrong). `signed`: a file's payload (a spec's
    has no binding yet: lts-license makes it)."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    if payload.server_key is not None and payload.server_uuid is None:
        found.append(("serverKey", "requires serverUuid: a key is bound together with the server it belongs to"))
    if signed and payload.server_key is not None and (payload.binding is None or payload.binding_signature is None):
        found.append(("binding", "binding and bindingSignature are required with serverKey (lts-license issue "
                                 "writes them)"))
    if payload.server_key is None and (payload.binding is not None or payload.binding_signature is not None):
        found.append(("binding", "only a file with serverKey has a binding"))
    for i, item in enumerate(payload.items):
        at = f"items[{i}]"
        rules = LICENSE_TYPES[item.license_type]
        if item.item_id in seen:
            found.append((f"{at}.itemId", f"duplicate item id {item.item_id!r}"))
        seen.add(item.item_id)
        if item.expires_at <= item.starts_at:
            found.append((f"{at}.expiresAt", "must be after startsAt"))
        if rules.counts is not Counts.UNITS and item.quantity > MAX_COUNTED:
            found.append((f"{at}.quantity", f"at most {MAX_COUNTED:,} for {item.license_type.value} items (seats, "
                                            "devices and instances are stored as 32-bit numbers, grace included); "
                                            "per-scan and per-page quotas go to 1,000,000,000,000"))
        if rules.needs_period and item.period is None:
            found.append((f"{at}.period", f"required for {item.license_type.value} items"))
        if not rules.needs_period and item.period is not None:
            found.append((f"{at}.period", "only per-device and per-server items have a period"))
        if rules.needs_domain and item.domain is None:
            found.append((f"{at}.domain", f"required for {item.license_type.value} items"))
        if not rules.needs_domain and item.domain is not None:
            found.append((f"{at}.domain", "only per-domain items have a domain"))
        if rules.deployments is not None and item.deployment_type not in rules.deployments:
            allowed = ", ".join(sorted(d.value for d in rules.deployments))
            found.append((f"{at}.deploymentType", f"{item.license_type.value} items must be {allowed}"))
        if item.borrow_max_days is not None and not rules.borrowable:
            found.append((f"{at}.borrowMaxDays", f"item {item.item_id}: {item.license_type.value} items cannot be "
                                                 "borrowed (per-device, per-server and per-concurrent-device can)"))
        if item.versions is not None:
            try:
                check_range(item.versions)
            except RangeError as e:
                found.append((f"{at}.versions", f"item {item.item_id}: {e}"))
    return found


def to_license(payload: Payload) -> License:
    items = tuple(
        Item(
            item_id=i.item_id,
            license_id=payload.license_id,
            organization_id=payload.organization_id,
            product=i.product,
            edition=i.edition,
            deployment_type=i.deployment_type,
            license_type=i.license_type,
            quantity=i.quantity,
            period=i.period,
            domain=i.domain.lower() if i.domain else None,
            starts_at=i.starts_at,
            expires_at=i.expires_at,
            borrow_max_days=i.borrow_max_days,
            versions=i.versions,
        )
        for i in payload.items
    )
    return License(
        license_id=payload.license_id,
        alias=payload.alias,
        organization_id=payload.organization_id,
        license_text_version=payload.license_text_version,
        status=payload.status,
        revision=payload.revision,
        issued_at=payload.issued_at,
        items=items,
        server_uuid=payload.server_uuid,
        server_key=payload.server_key,
    )


def encode_payload(payload: Payload) -> bytes:
    return msgspec.json.format(msgspec.json.encode(payload), indent=2) + b"\n"


def sign(payload_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The whole file for these payload bytes."""
    signature = base64.b64encode(private_key.sign(payload_bytes))
    kid = key_id(private_key.public_key()).encode()
    return b"%s %d\nKey-Id: %s\nSignature: %s\n\n%s" % (MAGIC, FORMAT_VERSION, kid, signature, payload_bytes)


@dataclass(frozen=True)
class Binding:
    """The vendor's signed binding of a license to a server's identity key, as a device receives it."""

    license_id: str
    revision: int
    key_id: str  # the vendor key that signed it
    statement: bytes
    signature: str
    item_ids: tuple[str, ...]


@dataclass(frozen=True)
class Verified:
    license: License
    key_id: str
    sha256: str
    text: str
    binding: Binding | None = None


def bound_items(payload: Payload) -> list[BoundItem]:
    """The items' terms as the binding statement states them."""
    return [BoundItem(item_id=i.item_id, product=i.product, deployment_type=i.deployment_type.value,
                      license_type=i.license_type.value, starts_at=iso(i.starts_at), expires_at=iso(i.expires_at),
                      edition=i.edition, domain=i.domain.lower() if i.domain else None) for i in payload.items]


def make_binding(payload: Payload, private_key: Ed25519PrivateKey) -> Payload:
    """The payload with its binding statement and the vendor's signature of it (needs serverUuid, serverKey)."""
    assert payload.server_uuid is not None and payload.server_key is not None
    statement = binding_statement(license_id=payload.license_id, revision=payload.revision,
                                  organization_id=payload.organization_id, server_uuid=payload.server_uuid,
                                  server_key=payload.server_key, issued_at=iso(payload.issued_at),
                                  items=bound_items(payload))
    return msgspec.structs.replace(payload, binding=base64.b64encode(statement).decode(),
                                   binding_signature=base64.b64encode(private_key.sign(statement)).decode())


def _check_binding_statement(payload: Payload, vendor: Ed25519PublicKey, kid: str) -> Binding:
    """The statement is signed by the file's vendor key and says exactly what the payload says."""
    assert payload.binding is not None and payload.binding_signature is not None
    statement = base64.b64decode(payload.binding)
    try:
        vendor.verify(base64.b64decode(payload.binding_signature), statement)
    except InvalidSignature:
        raise LicenseFileError("bad-binding", "the binding's signature does not verify with the file's vendor key")
    try:
        bound: BindingStatement = parse_binding(statement)
    except BadBinding as e:
        raise LicenseFileError("bad-binding", str(e)) from None
    facts = (("licenseId", bound.license_id, payload.license_id), ("revision", bound.revision, payload.revision),
             ("organizationId", bound.organization_id, payload.organization_id),
             ("serverUuid", bound.server_uuid, payload.server_uuid), ("serverKey", bound.server_key, payload.server_key),
             ("issuedAt", bound.issued_at, iso(payload.issued_at)))
    for name, stated, actual in facts:
        if stated != actual:
            raise LicenseFileError("bad-binding", f"the binding says {name} {stated!r}, the file {actual!r}")
    if bound.items != bound_items(payload):
        raise LicenseFileError("bad-binding", "the binding's items differ from the file's items")
    return Binding(payload.license_id, payload.revision, kid, statement, payload.binding_signature,
                   tuple(i.item_id for i in payload.items))


def verify(data: bytes, trusted: dict[str, Ed25519PublicKey]) -> Verified:
    """Check the signature first, then the payload; raise LicenseFileError with the reason."""
    if len(data) > MAX_FILE_BYTES:
        raise LicenseFileError("malformed", f"file is larger than {MAX_FILE_BYTES} bytes")
    if not data.startswith(MAGIC):
        raise LicenseFileError("malformed", "not an lts-server license file (first line must be 'LTS-LICENSE-FILE 1')")
    m = _HEADER.match(data)
    if m is None:
        raise LicenseFileError(
            "malformed",
            "the header must be exactly 'LTS-LICENSE-FILE 1', 'Key-Id: <16 hex>', 'Signature: <base64>' "
            "and an empty line (incomplete or altered file?)",
        )
    if int(m.group("version")) != FORMAT_VERSION:
        raise LicenseFileError("unsupported-format", f"format version {int(m.group('version'))} is not supported")
    kid = m.group("key_id").decode()
    public_key = trusted.get(kid)
    if public_key is None:
        raise LicenseFileError("unknown-key", f"signed with key id {kid}, which is not among vendor.public_keys")
    signature_text = m.group("signature")
    signature = base64.b64decode(signature_text, validate=True)
    if base64.b64encode(signature) != signature_text:
        raise LicenseFileError("bad-signature", "the signature is not in canonical base64")
    payload_bytes = data[m.end() :]
    try:
        public_key.verify(signature, payload_bytes)
    except InvalidSignature:
        raise LicenseFileError(
            "bad-signature", "the signature does not match the content (altered, incomplete, or re-encoded file)"
        ) from None
    try:
        payload = msgspec.json.decode(payload_bytes, type=Payload, strict=True)
    except msgspec.ValidationError as e:
        raise LicenseFileError("bad-field", _field_message(str(e), payload_bytes)) from None
    except msgspec.DecodeError as e:
        raise LicenseFileError("malformed", f"payload is not valid JSON: {e}") from None
    found = problems(payload)
    if found:
        raise LicenseFileError("bad-field", "; ".join(f"{path}: {what}" for path, what in found))
    binding = _check_binding_statement(payload, public_key, kid) if payload.server_key is not None else None
    return Verified(to_license(payload), kid, hashlib.sha256(data).hexdigest(), data.decode("utf-8"), binding)


def _field_message(text: str, payload: bytes) -> str:
    """msgspec's error as `path: what`, naming the item by its id when the path is inside one (an operator
    knows items by id, not by their place in the file)."""
    msg, _, where = text.partition(" - at `$")
    if not where:
        return msg
    path = where.rstrip("`").lstrip(".")
    if (m := _ITEM_AT.match(path)) and (item_id := _item_id(payload, int(m.group(1)))) is not None:
        return f"{path}: item {item_id}: {msg}"
    return f"{path}: {msg}"


_ITEM_AT = re.compile(r"items\[(\d+)\]")


def _item_id(payload: bytes, index: int) -> str | None:
    try:
        item = msgspec.json.decode(payload)["items"][index]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        return None
    return item.get("itemId") if isinstance(item, dict) and isinstance(item.get("itemId"), str) else None


def check_binding(lic: License, server_uuid: str, allow_unbound: bool, server_key: str | None = None) -> None:
    if lic.status != "Activated":
        raise LicenseFileError("not-activated", f"license status is {lic.status}; only Activated licenses import")
    if lic.server_uuid is None:
        if not allow_unbound:
            raise LicenseFileError(
                "unbound", "the file is not bound to a server and vendor.allow_unbound is false"
            )
    elif lic.server_uuid != server_uuid:
        raise LicenseFileError(
            "wrong-server", f"the file is bound to server {lic.server_uuid}, this server is {server_uuid}"
        )
    if lic.server_key is not None and server_key is not None and lic.server_key != server_key:
        raise LicenseFileError(
            "wrong-server-key", f"the file is bound to identity key {lic.server_key}; this server's identity key is "
            f"{server_key} (`ltsctl identity`): ask the vendor for a file with this key")


def raw_public_key(b64: str) -> Ed25519PublicKey:
    """A public key from base64 of its raw 32 bytes (serverKey)."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_trusted(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id(key)] = key
    return keys
