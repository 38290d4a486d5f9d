"""The license file format: sign, verify, and reject everything else."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lts_server import licensefile
from lts_server.cli.vendor import payload_from_spec
from lts_server.identity import key_id
from tests.conftest import NOW, Vendor, item, license_spec, make_vendor


def trusted(v: Vendor) -> dict:
    return {key_id(v.key.public_key()): v.key.public_key()}


def test_round_trip_keeps_every_field(vendor: Vendor) -> None:
    spec = license_spec("100028117", items=[
        item("A", edition="pro"),
        item("B", "per-domain", quantity=1),
        item("C", "per-concurrent-instance", quantity=8),
    ], server_uuid="0feb6cf8-698d-47b4-8f64-dc3580f5a7a9", revision=3)
    data = vendor.issue(spec)
    text = data.decode()
    assert text.startswith("LTS-LICENSE-FILE 1\nKey-Id: ")
    assert '"licenseId": "100028117"' in text  # readable with cat
    v = licensefile.verify(data, trusted(vendor))
    lic = v.license
    assert (lic.license_id, lic.organization_id, lic.revision, lic.status) == ("100028117", "216998", 3, "Activated")
    assert lic.alias == f"DM_100028117_Date{NOW:%Y%m%d}"
    assert lic.server_uuid == "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"
    assert [i.item_id for i in lic.items] == ["A", "B", "C"]
    assert lic.items[0].edition == "pro"
    assert lic.items[1].domain == "*.example.com"
    assert lic.items[2].quantity == 8
    assert v.key_id == key_id(vendor.key.public_key())


def test_several_trusted_keys(vendor: Vendor, tmp_path) -> None:
    other = make_vendor(tmp_path / "other")
    keys = {**trusted(vendor), **trusted(other)}
    assert licensefile.verify(vendor.issue(license_spec("A")), keys).license.license_id == "A"
    assert licensefile.verify(other.issue(license_spec("B")), keys).license.license_id == "B"


@pytest.mark.parametrize("mutate, kind", [
    (lambda d: d.replace(b"LTS-LICENSE-FILE 1", b"LTS-LICENSE-FILE 2"), "unsupported-format"),
    (lambda d: b"hello", "malformed"),
    (lambda d: d[: len(d) // 2], "bad-signature"),
    (lambda d: d[:40], "malformed"),
    (lambda d: d.replace(b'"quantity": 10', b'"quantity": 99'), "bad-signature"),
    (lambda d: d.replace(b"\n", b"\r\n"), "malformed"),
    (lambda d: d + b" ", "bad-signature"),
])
def test_rejections(vendor: Vendor, mutate, kind: str) -> None:
    data = vendor.issue(license_spec("L1"))
    with pytest.raises(licensefile.LicenseFileError) as err:
        licensefile.verify(mutate(data), trusted(vendor))
    assert err.value.kind == kind


def test_unknown_key(vendor: Vendor, tmp_path) -> None:
    other = make_vendor(tmp_path / "other")
    with pytest.raises(licensefile.LicenseFileError, match="unknown-key"):
        licensefile.verify(other.issue(license_spec("L1")), trusted(vendor))


def test_signed_but_invalid_content_is_rejected_with_the_field(vendor: Vendor) -> None:
    raw = b'{"format": 1, "licenseId": "L1", "alias": "a", "organizationId": "1", "licenseTextVersion": "2.0", ' \
          b'"status": "Activated", "revision": 1, "issuedAt": "2026-01-01T00:00:00Z", "items": [{"itemId": "x", ' \
          b'"product": "p", "deploymentType": "browser", "licenseType": "per-device", "quantity": 0, ' \
          b'"startsAt": "2026-01-01T00:00:00Z", "expiresAt": "2027-01-01T00:00:00Z", "period": "yearly"}]}'
    with pytest.raises(licensefile.LicenseFileError) as err:
        licensefile.verify(licensefile.sign(raw, vendor.key), trusted(vendor))
    assert err.value.kind == "bad-field"
    assert err.value.message.startswith("items[0].quantity: item x: ")


@pytest.mark.parametrize(("license_type", "quantity", "refused"), [
    ("per-device", 1_000_000_000, False), ("per-device", 1_000_000_001, True),
    ("per-concurrent-instance", 1_000_000_001, True), ("per-scan", 1_000_000_000_000, False),
])
def test_counted_items_stay_within_32_bits_and_quotas_go_to_a_trillion(
        vendor: Vendor, license_type: str, quantity: int, refused: bool) -> None:
    period = ', "period": "yearly"' if license_type == "per-device" else ""
    raw = ('{"format": 1, "licenseId": "L1", "alias": "a", "organizationId": "1", "licenseTextVersion": "2.0", '
           '"status": "Activated", "revision": 1, "issuedAt": "2026-01-01T00:00:00Z", "items": [{"itemId": "x", '
           f'"product": "p", "deploymentType": "browser", "licenseType": "{license_type}", "quantity": {quantity}, '
           f'"startsAt": "2026-01-01T00:00:00Z", "expiresAt": "2027-01-01T00:00:00Z"{period}}}]}}').encode()
    signed = licensefile.sign(raw, vendor.key)
    if not refused:
        assert licensefile.verify(signed, trusted(vendor)).license.items[0].quantity == quantity
        return
    with pytest.raises(licensefile.LicenseFileError) as err:
        licensefile.verify(signed, trusted(vendor))
    assert err.value.kind == "bad-field"
    assert err.value.message.startswith("items[0].quantity: at most 1,000,000,000 for "), err.value.message
    with pytest.raises(Exception, match="at most 1,000,000,000"):  # the vendor's tool refuses to issue it
        vendor.issue(license_spec("L1", items=[item("x", license_type, quantity=quantity)]))


def test_a_wrong_type_inside_an_item_names_the_item(vendor: Vendor) -> None:
    raw = b'{"format": 1, "licenseId": "L1", "alias": "a", "organizationId": "1", "licenseTextVersion": "2.0", ' \
          b'"status": "Activated", "revision": 1, "issuedAt": "2026-01-01T00:00:00Z", "items": [' + \
          b', '.join(b'{"itemId": "%s", "product": "p", "deploymentType": "browser", "licenseType": "per-device", ' \
                     b'"quantity": 1, "startsAt": "2026-01-01T00:00:00Z", "expiresAt": "2027-01-01T00:00:00Z", ' \
                     b'"period": "yearly"%s}' % (name, extra) for name, extra in (
                         (b"first", b""), (b"second", b', "versions": 5'))) + b']}'
    with pytest.raises(licensefile.LicenseFileError) as err:
        licensefile.verify(licensefile.sign(raw, vendor.key), trusted(vendor))
    assert err.value.kind == "bad-field"
    assert err.value.message == "items[1].versions: item second: Expected `str | null`, got `int`"


def test_binding_rules(vendor: Vendor) -> None:
    uuid = "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"
    bound = licensefile.verify(vendor.issue(license_spec("L1", server_uuid=uuid)), trusted(vendor)).license
    licensefile.check_binding(bound, uuid, allow_unbound=False)
    with pytest.raises(licensefile.LicenseFileError, match="wrong-server"):
        licensefile.check_binding(bound, "11111111-1111-1111-1111-111111111111", allow_unbound=True)
    unbound = licensefile.verify(vendor.issue(license_spec("L2")), trusted(vendor)).license
    licensefile.check_binding(unbound, uuid, allow_unbound=True)
    with pytest.raises(licensefile.LicenseFileError, match="unbound"):
        licensefile.check_binding(unbound, uuid, allow_unbound=False)
    new = licensefile.verify(vendor.issue(license_spec("L3", status="New")), trusted(vendor)).license
    with pytest.raises(licensefile.LicenseFileError, match="not-activated"):
        licensefile.check_binding(new, uuid, allow_unbound=True)


SAMPLE_KEY = Ed25519PrivateKey.generate()
SAMPLE = licensefile.sign(licensefile.encode_payload(payload_from_spec(
    license_spec("T1", items=[item("T1-1", edition="pro"), item("T1-2", "per-scan")],
                 server_uuid="0feb6cf8-698d-47b4-8f64-dc3580f5a7a9"), NOW)), SAMPLE_KEY)
SAMPLE_KEYS = {key_id(SAMPLE_KEY.public_key()): SAMPLE_KEY.public_key()}
SAMPLE_LICENSE = licensefile.verify(SAMPLE, SAMPLE_KEYS).license


def _outcome(data: bytes) -> object:
    try:
        return licensefile.verify(data, SAMPLE_KEYS).license
    except licensefile.LicenseFileError:
        return None


def test_flipping_any_single_byte_never_changes_what_imports() -> None:
    """Every position, three different flips each: rejected, or the identical license."""
    for pos in range(len(SAMPLE)):
        for mask in (0x01, 0x20, 0x80):
            tampered = bytearray(SAMPLE)
            tampered[pos] ^= mask
            outcome = _outcome(bytes(tampered))
            assert outcome is None or outcome == SAMPLE_LICENSE, f"byte {pos} ^ {mask:#x} changed the content"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_replacing_any_byte_with_any_value(pos: int, value: int) -> None:
    tampered = bytearray(SAMPLE)
    tampered[pos % len(SAMPLE)] = value
    outcome = _outcome(bytes(tampered))
    if bytes(tampered) == SAMPLE:
        assert outcome == SAMPLE_LICENSE
    else:
        assert outcome is None or outcome == SAMPLE_LICENSE


def test_expiry_relative_to_now_in_fixtures() -> None:
    # Guards the fixtures themselves: test data is made relative to now, so it never expires.
    lic = SAMPLE_LICENSE
    assert lic.items[0].starts_at < NOW + timedelta(seconds=1) < lic.items[0].expires_at


def _bound_payload(vendor_key: Any) -> Any:
    spec = license_spec("L1", server_uuid="0feb6cf8-698d-47b4-8f64-dc3580f5a7a9",
                        server_key="8T+rnoEwMqyvt5cfrYRN/9Ympz/a+7Xk4N3XUkMDsPo=")
    return licensefile.make_binding(payload_from_spec(spec, NOW), vendor_key)


def test_a_binding_that_does_not_say_what_the_file_says_is_rejected(vendor: Any) -> None:
    import base64
    import json as json_mod

    import msgspec

    trusted = licensefile.load_trusted([vendor.pub_path])
    good = _bound_payload(vendor.key)
    verified = licensefile.verify(licensefile.sign(licensefile.encode_payload(good), vendor.key), trusted)
    assert verified.binding is not None and verified.license.server_key == good.server_key
    statement = json_mod.loads(base64.b64decode(good.binding))
    statement["items"][0]["expiresAt"] = "2099-01-01T00:00:00Z"
    forged = base64.b64encode(json_mod.dumps(statement, separators=(",", ":")).encode()).decode()
    for payload, reason in (
            (msgspec.structs.replace(good, binding=forged), "bad-binding"),  # the vendor did not sign that
            (msgspec.structs.replace(good, binding_signature=None), "bad-field"),
            (msgspec.structs.replace(good, revision=2), "bad-binding")):  # the statement says revision 1
        with pytest.raises(licensefile.LicenseFileError) as refused:
            licensefile.verify(licensefile.sign(licensefile.encode_payload(payload), vendor.key), trusted)
        assert refused.value.kind == reason, str(refused.value)
    # A statement the vendor signed, for other items than the file's.
    other = dict(statement, items=statement["items"][:0])
    raw = json_mod.dumps(other, separators=(",", ":")).encode()
    payload = msgspec.structs.replace(good, binding=base64.b64encode(raw).decode(),
                                      binding_signature=base64.b64encode(vendor.key.sign(raw)).decode())
    with pytest.raises(licensefile.LicenseFileError, match="items differ"):
        licensefile.verify(licensefile.sign(licensefile.encode_payload(payload), vendor.key), trusted)
