"""Writes the test vectors of docs/authorization-format.md into this folder (deterministic: run it again and
nothing changes). Needs only lts-client and cryptography:

    .venv/bin/python tests/vectors/make_vectors.py
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_client.trust import BoundItem, binding_statement, key_id

HERE = Path(__file__).resolve().parent
NOW = "2026-06-01T12:00:00Z"
SERVER_UUID = "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"
REQUEST = {"clientUuid": "7f3c-laptop", "product": "barcode-reader", "deploymentType": "desktop",
           "handshakeCode": "216998-100028117"}


def key(name: str) -> Ed25519PrivateKey:
    """A fixed key: its 32-byte seed is SHA-256 of its name."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"lts-vector-{name}".encode()).digest())


def raw(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


VENDOR, OTHER_VENDOR, SERVER, FORGER = key("vendor"), key("other-vendor"), key("server"), key("forger")


def statement(server_key: Ed25519PrivateKey = SERVER, server_uuid: str = SERVER_UUID) -> bytes:
    return binding_statement(
        license_id="100028117", revision=1, organization_id="216998", server_uuid=server_uuid,
        server_key=b64(raw(server_key)), issued_at="2026-01-02T00:00:00Z",
        items=[BoundItem(item_id="100028117-1", product="barcode-reader", deployment_type="desktop",
                         license_type="per-device", starts_at="2026-01-01T00:00:00Z",
                         expires_at="2027-01-01T00:00:00Z")])


def answer(*, signer: Ed25519PrivateKey = SERVER, vendor: Ed25519PrivateKey = VENDOR, bound: bytes | None = None,
           change: dict[str, Any] | None = None, after_signing: tuple[bytes, bytes] | None = None,
           expires: str = "2026-06-01T12:59:00Z", signed: bytes | None = None) -> str:
    """`signed`: what the vendor's signature in the binding covers (default: the statement sent)."""
    bound = bound if bound is not None else statement()
    fields: dict[str, Any] = {
        "authorizationId": "q3X0b1nG9kT2c8Yw5LrA1mZp", "serverUuid": SERVER_UUID, "handshakeCode": "216998-100028117",
        "organizationId": "216998", "itemId": "100028117-1", "licenseId": "100028117", "product": "barcode-reader",
        "deploymentType": "desktop", "licenseType": "per-device", "clientUuid": "7f3c-laptop",
        "issuedAt": "2026-06-01T11:59:00Z", "expiresAt": expires, "refreshBy": "2026-06-01T12:59:00Z",
        "seats": {"used": 1, "quantity": 50, "limit": 55, "left": 54},
        "bindingSha256": hashlib.sha256(statement()).hexdigest(),
    }
    fields.update(change or {})
    authorization = json.dumps(fields, separators=(",", ":")).encode()
    signature = b64(signer.sign(authorization))
    if after_signing is not None:
        authorization = authorization.replace(*after_signing)
    binding = {"keyId": key_id(raw(vendor)), "statement": b64(bound),
               "signature": b64(vendor.sign(signed if signed is not None else bound))}
    return ('{"authorization":' + authorization.decode() + ',"signature":"' + signature + '","keyId":"'
            + key_id(raw(signer)) + '","reportKey":"TlTDRDl9KpQTOEwy47BxjeDDzy048vbyyyrwO5xEaDQ=","binding":'
            + json.dumps(binding, separators=(",", ":")) + "}")


VECTORS = {
    "valid": ("An answer that verifies: the vendor's binding names the server key that signed it.", answer(), None),
    "wrong-vendor": ("The binding is signed by a vendor key the device does not hold.",
                     answer(vendor=OTHER_VENDOR), "UntrustedKey"),
    "wrong-server-uuid": ("The authorization names another server than the one the vendor bound.",
                          answer(change={"serverUuid": "11111111-2222-4333-8444-555555555555"}), "BadBinding"),
    "forged-server-key": ("A forger put its own key into the binding statement: the vendor's signature no longer "
                          "verifies.", answer(signer=FORGER, bound=statement(FORGER), signed=statement()), "BadBinding"),
    "server-key-not-bound": ("The binding is genuine, but the authorization is signed by another key.",
                             answer(signer=FORGER), "UntrustedKey"),
    "altered-field": ("A byte of the authorization changed after it was signed (expiresAt moved a year on).",
                      answer(after_signing=(b'"expiresAt":"2026', b'"expiresAt":"2027')), "BadSignature"),
    "expired": ("Signed and bound, but expired at the device's time (now).",
                answer(expires="2026-06-01T11:59:30Z", change={"refreshBy": "2026-06-01T11:59:30Z"}),
                "OutsideValidity"),
    "other-device": ("Valid for another device than the one that asked.",
                     answer(change={"clientUuid": "another-device"}), "NotRequested"),
    "item-not-bound": ("The item is not one the vendor bound to this server.",
                       answer(change={"itemId": "100028117-9"}), "BadBinding"),
}


def main() -> None:
    keys = {name: {"seed": k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption()).hex(),
                   "publicKey": b64(raw(k)), "keyId": key_id(raw(k))}
            for name, k in (("vendor", VENDOR), ("otherVendor", OTHER_VENDOR), ("server", SERVER), ("forger", FORGER))}
    (HERE / "keys.json").write_text(json.dumps(keys, indent=2) + "\n")
    for name, (description, body, error) in VECTORS.items():
        vector = {"description": description, "now": NOW, "vendorKeys": {keys["vendor"]["keyId"]:
                                                                          keys["vendor"]["publicKey"]},
                  "request": REQUEST, "answer": body, "valid": error is None, "error": error}
        (HERE / f"{name}.json").write_text(json.dumps(vector, indent=2) + "\n")


if __name__ == "__main__":
    main()
