"""Protocol versions (105) and client version ranges (107) through HTTP, license files and lts-license."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lts_server import licensefile
from lts_server.cli.vendor import payload_from_spec
from tests.conftest import NOW, Running, item, license_spec

CODE = "216998-L1"


@pytest.fixture
async def ranged(running: Running) -> Running:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("legacy", versions="<3", quantity=5), item("current", versions=">=3.0,<5", quantity=5)])))
    return running


async def test_protocol_version_the_server_does_not_speak_gets_105(ranged: Running) -> None:
    for version in (2, 0, -1):
        status, out = await ranged.handshake(handshakeCode=CODE, protocolVersion=version, version="4.0")
        assert status == 403 and out["error"]["code"] == 105 and out["error"]["sdkCode"] == -20105
        assert out["error"]["protocolVersions"] == [1] and "it speaks 1" in out["error"]["message"]
    assert (await ranged.handshake(handshakeCode=CODE, protocolVersion=1, version="4.0"))[0] == 200
    assert (await ranged.handshake(handshakeCode=CODE, clientUuid="d2", version="4.0"))[0] == 200  # absent = 1
    status, out = await ranged.handshake(handshakeCode=CODE, protocolVersion="1")
    assert status == 400 and out["error"]["field"] == "protocolVersion"
    assert ranged.ledger.status("current").seats_used == 2


async def test_a_newer_client_hears_105_even_when_its_body_does_not_decode(ranged: Running) -> None:
    """The version is checked first: a newer protocol's fields (or values) are why its body does not decode
    here, and the versions spoken are what the client can act on."""
    for extra in ({"futureField": 1}, {"deploymentType": "hologram"}, {"borrowDays": 0}):
        status, out = await ranged.handshake(handshakeCode=CODE, protocolVersion=2, version="4.0", **extra)
        assert status == 403 and out["error"]["code"] == 105 and out["error"]["protocolVersions"] == [1], out
    status, out = await ranged.handshake(handshakeCode=CODE, version="4.0", futureField=1)  # version 1: the 400
    assert status == 400 and out["error"]["field"] == "futureField"
    assert ranged.ledger.status("current").seats_used == 0


async def test_usage_reports_and_returns_check_the_protocol_version_too(ranged: Running) -> None:
    assert (await ranged.handshake(handshakeCode=CODE, version="4.0"))[0] == 200
    report = {"reportId": "r1", "clientUuid": "device-1", "handshakeCode": CODE, "records": []}
    for body in ({**report, "protocolVersion": 2}, {**report, "protocolVersion": 2, "futureField": True}):
        status, out = await ranged.report(body)
        assert status == 403 and out["error"]["code"] == 105 and out["error"]["sdkCode"] == -20105, out
        assert out["error"]["protocolVersions"] == [1]
    assert (await ranged.report({**report, "protocolVersion": 1}))[0] == 200
    async with ranged.session.post(f"{ranged.url}/api/v1/handshake/return", json={
            "clientUuid": "device-1", "handshakeCode": CODE, "protocolVersion": 3, "soon": 1}) as resp:
        out = await resp.json()
        assert resp.status == 403 and out["error"]["code"] == 105, out


async def test_a_version_outside_every_item_gets_107_naming_the_range(ranged: Running) -> None:
    status, out = await ranged.handshake(handshakeCode=CODE, version="2.5")
    assert status == 200 and out["authorization"]["itemId"] == "legacy"
    status, out = await ranged.handshake(handshakeCode=CODE, clientUuid="d2", version="4.1b2")
    assert status == 200 and out["authorization"]["itemId"] == "current"
    status, out = await ranged.handshake(handshakeCode=CODE, clientUuid="d3", version="5.0")
    assert status == 403 and out["error"]["code"] == 107 and out["error"]["sdkCode"] == -20107
    assert "5.0 is outside" in out["error"]["message"] and out["error"]["versions"] in (">=3.0,<5", "<3")
    status, out = await ranged.handshake(handshakeCode=CODE, clientUuid="d4")
    assert status == 403 and out["error"]["code"] == 107 and "names no version" in out["error"]["message"]
    refused = await ranged.sql("SELECT result FROM events WHERE type = 'handshake' AND client_uuid = 'd3'")
    assert refused == [(107,)]


async def test_an_unparsable_range_is_rejected_at_import_with_the_item_named(running: Running) -> None:
    payload = licensefile.encode_payload(payload_from_spec(license_spec("L9", items=[item("ok"), item("x")]), NOW))
    raw = json.loads(payload)
    raw["items"][1]["versions"] = ">=banana"
    data = licensefile.sign(json.dumps(raw, indent=2).encode() + b"\n", running.vendor.key)
    await running.drop("bad.lic", data)
    async with running.session.get(f"{running.url}/api/v1/admin/imports") as resp:
        [state] = (await resp.json())["files"]
    assert state["state"] == "rejected"
    assert state["reason"].startswith("bad-field: items[1].versions: item x: '>=banana' is not a PEP 440")
    assert "ok" not in running.ledger.items and "x" not in running.ledger.items


def test_lts_license_issues_and_shows_the_new_keys(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lts_server.cli.vendor", *args], capture_output=True,
                              text=True, timeout=60)

    assert cli("keygen", "--out", str(tmp_path / "keys")).returncode == 0
    spec = tmp_path / "spec.toml"
    base = ('license_id = "L1"\norganization_id = "216998"\n[[items]]\nitem_id = "L1-1"\nproduct = "reader"\n'
            'deployment_type = "desktop"\nlicense_type = "per-device"\nperiod = "monthly"\nquantity = 5\n'
            'starts_at = 2026-01-01T00:00:00Z\nexpires_at = 2099-01-01T00:00:00Z\n')
    spec.write_text(base + 'borrow_max_days = 14\nversions = ">=3.0,<5"\n')
    key = str(tmp_path / "keys" / "vendor.key")
    out = cli("issue", str(spec), "--key", key, "--out", str(tmp_path / "a.lic"))
    assert out.returncode == 0, out.stderr
    show = cli("show", str(tmp_path / "a.lic"), "--public-key", str(tmp_path / "keys" / "vendor.pub"))
    assert "borrow up to 14 days" in show.stdout and "versions >=3.0,<5" in show.stdout
    for extra, field in (('versions = "=>3"\n', "items[0].versions"), ("borrow_max_days = 0\n", "items[0].borrow_max_days"),
                         ("borrow_max_days = 400\n", "items[0].borrow_max_days")):
        spec.write_text(base + extra)
        bad = cli("issue", str(spec), "--key", key, "--out", str(tmp_path / "b.lic"))
        assert bad.returncode == 2 and field in bad.stderr, bad.stderr
    scan = base.replace('"per-device"\nperiod = "monthly"', '"per-scan"')
    spec.write_text(scan + "borrow_max_days = 3\n")
    bad = cli("issue", str(spec), "--key", key, "--out", str(tmp_path / "b.lic"))
    assert bad.returncode == 2 and "items[0].borrow_max_days" in bad.stderr and "cannot be borrowed" in bad.stderr
