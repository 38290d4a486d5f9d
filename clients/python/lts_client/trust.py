"""The chain of trust from a vendor's key to one authorization, checked offline on the device.

A device holds only its vendor's public key(s). An answer to a handshake carries:

1. the **binding**: a short statement the vendor signed when it issued the license file
   ("license L of organization O, with these items, is licensed to server U whose identity
   key is K"), with the vendor's key id and signature;
2. the **authorization**: the exact bytes the server signed with its identity key K, naming
   the binding by its SHA-256 (`bindingSha256`).

So a device verifies: the vendor signed the binding; the binding names the key that signed
the authorization; the authorization is for the binding's server, license, organization and
one of its items, within the item's dates; and it is what the device asked for. Every byte
signed at each step is described in docs/authorization-format.md, so a vendor can write the
same check in another language; the fixed vectors in tests/vectors/ say which answers verify.

Answers from servers whose license files carry no server key have no binding: a device
trusts those only by a key it was given (`public_keys`) or learned on first use.

This module is the one place that knows the binding statement's format: lts-license writes
it with `binding_statement`, the server checks it at import with `parse_binding`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

BINDING_TYPE = "lts-binding"
BINDING_FORMAT = 1
# An item serves for 7 days past its expiry (the grace stage); no authorization may outlast that.
EXPIRY_GRACE = timedelta(days=7)
DEFAULT_TOLERANCE = timedelta(minutes=5)


class BadSignature(Exception):
    """An answer (or a cached authorization) that must not be trusted; nothing of it is kept.

    The subclasses say why; catch this class to catch them all."""


class UntrustedKey(BadSignature):
    """Signed by a key this device neither was given nor can trace to a trusted vendor key."""


class BadBinding(BadSignature):
    """The vendor's binding does not verify, or does not cover this authorization."""


class NotRequested(BadSignature):
    """A valid authorization, but for something else than what was asked (another device, product, ...)."""

    def __init__(self, field: str, asked: Any, got: Any) -> None:
        super().__init__(f"the authorization is for {field} {got!r}, the request was for {asked!r}")
        self.field = field
        self.asked = asked
        self.got = got


class OutsideValidity(BadSignature):
    """Expired, or issued later than the device's clock allows."""


class Trust(StrEnum):
    """How an authorization was trusted."""

    VENDOR = "vendor"  # the chain from a vendor key: the binding names the server's identity key
    PINNED = "pinned"  # the server's key was given to the client (public_keys)
    FIRST_USE = "first-use"  # the server's key was learned from the server at the first contact


# -- the binding statement ------------------------------------------------------------------------


class BoundItem(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=True):
    item_id: str
    product: str
    deployment_type: str
    license_type: str
    starts_at: str
    expires_at: str
    edition: str | None = None
    domain: str | None = None


class BindingStatement(msgspec.Struct, rename="camel", kw_only=True):
    """What the vendor signs about one license file and one server (field order is the statement's)."""

    type: str
    format: int
    license_id: str
    revision: int
    organization_id: str
    server_uuid: str
    server_key: str
    issued_at: str
    items: list[BoundItem]


_statement_encoder = msgspec.json.Encoder()


def binding_statement(*, license_id: str, revision: int, organization_id: str, server_uuid: str, server_key: str,
                      issued_at: str, items: Iterable[BoundItem]) -> bytes:
    """The statement's bytes, as lts-license writes them into a license file (compact JSON, UTF-8)."""
    return _statement_encoder.encode(BindingStatement(
        type=BINDING_TYPE, format=BINDING_FORMAT, license_id=license_id, revision=revision,
        organization_id=organization_id, server_uuid=server_uuid, server_key=server_key, issued_at=issued_at,
        items=list(items)))


def parse_binding(statement: bytes) -> BindingStatement:
    """The statement's fields; BadBinding when it is not a version-1 binding statement."""
    try:
        parsed = msgspec.json.decode(statement, type=BindingStatement)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadBinding(f"the binding statement is not valid: {e}") from None
    if parsed.type != BINDING_TYPE or parsed.format != BINDING_FORMAT:
        raise BadBinding(f"the binding statement is of type {parsed.type!r} format {parsed.format}, "
                         f"not {BINDING_TYPE!r} format {BINDING_FORMAT}")
    return parsed


def key_id(raw_public_key: bytes) -> str:
    """The name of a public key: the first 16 hex digits of SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def public_key(b64: str, what: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes, or a PEM text (what `lts-license keygen` writes)."""
    text = b64.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return key
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as e:
        raise UntrustedKey(f"{what} is not an Ed25519 public key (base64 of 32 bytes, or PEM): {e}") from None


def raw_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _verify(key: Ed25519PublicKey, signature_b64: str, data: bytes, what: str,
            error: type[BadSignature] = BadSignature) -> None:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, data)
    except (ValueError, binascii.Error, InvalidSignature):
        raise error(f"{what} does not verify") from None


def keyring(keys: Mapping[str, str] | None, what: str) -> dict[str, Ed25519PublicKey]:
    """Keys by key id: under the id they were given as, and under their own (the first 16 hex digits of
    SHA-256 of the raw key, which servers and license files name them by)."""
    ring = {}
    for given_id, text in (keys or {}).items():
        key = public_key(text, f"{what} {given_id}")
        ring[given_id] = key
        ring.setdefault(key_id(raw_bytes(key)), key)
    return ring


# -- an answer ------------------------------------------------------------------------------------


class BindingEnvelope(msgspec.Struct, rename="camel", kw_only=True):
    key_id: str
    statement: str  # base64 of the statement's bytes
    signature: str  # base64 Ed25519 signature of those bytes by the vendor key key_id


class Envelope(msgspec.Struct, rename="camel", kw_only=True):
    authorization: msgspec.Raw
    signature: str
    key_id: str
    report_key: str
    binding: BindingEnvelope | None = None


@dataclass(frozen=True)
class Verified:
    """An authorization that passed every check."""

    fields: dict[str, Any]
    raw: bytes
    signature: str
    key_id: str
    report_key: str
    trust: Trust
    binding: BindingEnvelope | None


_envelope = msgspec.json.Decoder(Envelope)


def decode_answer(body: bytes) -> Envelope:
    try:
        return _envelope.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadSignature(f"the answer is not a handshake answer: {e}") from None


def _time(fields: Mapping[str, Any], name: str) -> datetime:
    value = fields.get(name)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise BadSignature(f"the authorization's {name} is not a date-time: {value!r}") from None
    if t.tzinfo is None:
        raise BadSignature(f"the authorization's {name} has no time zone: {value!r}")
    return t.astimezone(UTC)


def check_request(fields: Mapping[str, Any], request: Mapping[str, Any],
                  server_uuids: Iterable[str] | None = None) -> None:
    """The authorization is for what was asked: device, product, deployment type, code or organization,
    edition, and (when the device knows them) the server. `request` holds the handshake body's fields."""
    for name in ("clientUuid", "deploymentType", "handshakeCode", "organizationId"):
        asked = request.get(name)
        if asked is not None and fields.get(name) != asked:
            raise NotRequested(name, asked, fields.get(name))
    product = request.get("product")
    if product is not None and str(fields.get("product", "")).casefold() != str(product).casefold():
        raise NotRequested("product", product, fields.get("product"))
    edition = fields.get("edition")  # present when the item is for one edition only
    if edition is not None and str(request.get("edition") or "").casefold() != str(edition).casefold():
        raise NotRequested("edition", request.get("edition"), edition)
    wanted = set(server_uuids or ())
    if wanted and fields.get("serverUuid") not in wanted:
        raise NotRequested("serverUuid", sorted(wanted), fields.get("serverUuid"))


def check_validity(fields: Mapping[str, Any], now: datetime, tolerance: timedelta = DEFAULT_TOLERANCE) -> None:
    issued, expires = _time(fields, "issuedAt"), _time(fields, "expiresAt")
    if now >= expires:
        raise OutsideValidity(f"the authorization expired at {fields['expiresAt']} (the device's clock says "
                              f"{now.isoformat()}; if that is wrong, set the device's clock)")
    if issued > now + tolerance:
        raise OutsideValidity(f"the authorization is issued at {fields['issuedAt']}, later than the device's clock "
                              f"({now.isoformat()}) allows")


def open_binding(binding: BindingEnvelope, vendor_keys: Mapping[str, Ed25519PublicKey]) -> tuple[bytes,
                                                                                                  BindingStatement]:
    """The binding statement's bytes and fields, once the vendor's signature of them verifies."""
    vendor = vendor_keys.get(binding.key_id)
    if vendor is None:
        raise UntrustedKey(f"the binding is signed by vendor key {binding.key_id}, which this device does not trust")
    try:
        statement = base64.b64decode(binding.statement, validate=True)
    except (ValueError, binascii.Error):
        raise BadBinding("the binding statement is not base64") from None
    _verify(vendor, binding.signature, statement, f"the vendor's signature of the binding (key {binding.key_id})",
            BadBinding)
    return statement, parse_binding(statement)


def check_covered(fields: Mapping[str, Any], statement: bytes, bound: BindingStatement, tolerance: timedelta) -> None:
    """The binding covers the authorization: same server, license and organization, one of its items, its dates."""
    if fields.get("bindingSha256") != hashlib.sha256(statement).hexdigest():
        raise BadBinding("the authorization does not name this binding (bindingSha256)")
    for name, value in (("serverUuid", bound.server_uuid), ("licenseId", bound.license_id),
                        ("organizationId", bound.organization_id)):
        if fields.get(name) != value:
            raise BadBinding(f"the authorization is for {name} {fields.get(name)!r}; the vendor bound "
                             f"license {bound.license_id} to {name} {value!r}")
    item = next((i for i in bound.items if i.item_id == fields.get("itemId")), None)
    if item is None:
        raise BadBinding(f"item {fields.get('itemId')!r} is not an item of license {bound.license_id}")
    if str(fields.get("product", "")).casefold() != item.product.casefold():
        raise BadBinding(f"item {item.item_id} is for product {item.product!r}, not {fields.get('product')!r}")
    for name, value in (("deploymentType", item.deployment_type), ("licenseType", item.license_type)):
        if fields.get(name) != value:
            raise BadBinding(f"item {item.item_id} is {name} {value!r}, not {fields.get(name)!r}")
    if item.edition is not None and str(fields.get("edition") or "").casefold() != item.edition.casefold():
        raise BadBinding(f"item {item.item_id} is for edition {item.edition!r}")
    starts = _time({"startsAt": item.starts_at}, "startsAt")
    ends = _time({"expiresAt": item.expires_at}, "expiresAt") + EXPIRY_GRACE
    if _time(fields, "issuedAt") < starts - tolerance or _time(fields, "expiresAt") > ends:
        raise BadBinding(f"the authorization runs {fields.get('issuedAt')} to {fields.get('expiresAt')}, outside "
                         f"item {item.item_id}'s {item.starts_at} to {item.expires_at} and its 7 days of grace")


def verify_answer(body: bytes | Envelope, *, request: Mapping[str, Any], now: datetime,
                  vendor_keys: Mapping[str, Ed25519PublicKey] | None = None,
                  pinned_keys: Mapping[str, Ed25519PublicKey] | None = None,
                  first_use_keys: Mapping[str, Ed25519PublicKey] | None = None,
                  server_uuids: Iterable[str] | None = None,
                  tolerance: timedelta = DEFAULT_TOLERANCE) -> Verified:
    """Every check of one handshake answer (or a cached one), in this order: whose key signed it, its
    signature, the vendor's binding (when the device trusts a vendor key and the answer carries one),
    what it is for, and when. Raises BadSignature (a subclass says why) at the first that fails."""
    envelope = body if isinstance(body, Envelope) else decode_answer(body)
    raw = bytes(envelope.authorization)
    try:
        fields = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise BadSignature(f"the authorization is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise BadSignature("the authorization is not a JSON object")
    vendors = vendor_keys or {}
    trust: Trust | None = None
    key: Ed25519PublicKey | None = None
    bound: tuple[bytes, BindingStatement] | None = None
    if vendors and envelope.binding is not None:
        try:
            bound = open_binding(envelope.binding, vendors)
        except UntrustedKey:
            if envelope.key_id not in (pinned_keys or {}):  # another vendor's binding, but the key is pinned
                raise
        else:
            key = public_key(bound[1].server_key, "the binding's serverKey")
            if key_id(raw_bytes(key)) != envelope.key_id:
                raise UntrustedKey(f"the answer names key {envelope.key_id}; the vendor bound the license to key "
                                   f"{key_id(raw_bytes(key))}")
            trust = Trust.VENDOR
    if trust is None:
        for ring, kind in ((pinned_keys, Trust.PINNED), (first_use_keys, Trust.FIRST_USE)):
            if ring and envelope.key_id in ring:
                key, trust = ring[envelope.key_id], kind
                break
        else:
            raise UntrustedKey(f"the authorization is signed by key {envelope.key_id}, which this device does not "
                               "trust" + ("" if vendors else " (give the server's key, or the vendor's key)"))
    assert key is not None
    _verify(key, envelope.signature, raw, "the authorization's signature")
    if trust is Trust.VENDOR and bound is not None:
        check_covered(fields, bound[0], bound[1], tolerance)
    check_request(fields, request, server_uuids)
    check_validity(fields, now, tolerance)
    return Verified(fields, raw, envelope.signature, envelope.key_id, envelope.report_key, trust, envelope.binding)
