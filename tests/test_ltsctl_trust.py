"""ltsctl's trust commands end to end against a daemon: identity, a bound license, usage export checked by
lts-license verify-usage, the clock, device bindings."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Daemon, Vendor, license_spec, start_daemon, stop_daemon, storage_section, write_config
from tests.test_ltsctl import ctl, ok


@pytest.fixture
def daemon(request: pytest.FixtureRequest, backend: str, tmp_path: Path, vendor: Vendor) -> Iterator[Daemon]:
    storage = asyncio.run(storage_section(request, backend, tmp_path))
    d = start_daemon(write_config(tmp_path, vendor, storage=storage), tmp_path)
    yield d
    assert stop_daemon(d) == 0


def vendor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lts_server.cli.vendor", *args], capture_output=True, text=True,
                          timeout=60)


async def _handshakes(url: str, *bodies: dict) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as s:
        for body in bodies:
            async with s.post(f"{url}/api/v1/handshake", json={
                    "handshakeCode": "216998-L1", "product": "barcode-reader", "deploymentType": "browser",
                    **body}) as resp:
                statuses.append(resp.status)
    return statuses


def test_identity_bound_license_export_and_verify(daemon: Daemon, vendor: Vendor, tmp_path: Path) -> None:
    identity = json.loads(ok(daemon, "--json", "identity"))  # no login needed
    assert json.loads(ok(daemon, "identity", "--json")) == identity  # --json after the command too
    text = ok(daemon, "identity")
    assert f'server_key = "{identity["identityKey"]}"' in text and identity["serverUuid"] in text
    lic = tmp_path / "bound.lic"
    lic.write_bytes(vendor.issue(license_spec("L1", server_uuid=identity["serverUuid"],
                                              server_key=identity["identityKey"])))
    ok(daemon, "login", "--setup")
    assert "imported" in ok(daemon, "licenses", "import", str(lic))
    assert asyncio.run(_handshakes(daemon.url, {"clientUuid": "a", "deviceFingerprint": "m1"},
                                   {"clientUuid": "a", "deviceFingerprint": "m2"})) == [200, 403]
    out = tmp_path / "first.statement"
    exported = json.loads(ok(daemon, "--json", "usage", "export", "--out", str(out)))
    assert exported["statementId"] == 1 and stat.S_IMODE(out.stat().st_mode) == 0o600
    checked = vendor_cli("verify-usage", str(out), "--license", str(lic), "--vendor-key", str(vendor.pub_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"VALID {out}: statement 1")
    assert "L1-1" in checked.stdout
    second = tmp_path / "second.statement"
    ok(daemon, "usage", "export", "--out", str(second))
    checked = vendor_cli("verify-usage", str(second), "--license", str(lic), "--vendor-key", str(vendor.pub_path),
                         "--previous", str(out), "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["statementId"] == 2
    again = tmp_path / "again.statement"
    ok(daemon, "usage", "export", "--statement", "1", "--out", str(again))
    assert again.read_bytes() == out.read_bytes()
    assert [s["statementId"] for s in json.loads(ok(daemon, "--json", "usage", "statements"))] == [1, 2]
    future = ctl(daemon, "usage", "export", "--until", "2999-01-01T00:00:00Z", "--out", str(tmp_path / "x"))
    assert future.returncode == 1 and "in the future" in future.stderr and not (tmp_path / "x").exists()
    # Clones and bindings.
    assert "a" in ok(daemon, "devices", "clones")
    assert json.loads(ok(daemon, "--json", "devices", "binding", "a"))["clones"] == 1
    assert "reset" in ok(daemon, "devices", "reset-binding", "a")
    assert ctl(daemon, "devices", "reset-binding", "a").returncode == 1
    assert asyncio.run(_handshakes(daemon.url, {"clientUuid": "a", "deviceFingerprint": "m2"})) == [200]
    # The clock is fine: nothing to accept.
    assert "state           ok" in ok(daemon, "clock")
    refused = ctl(daemon, "clock", "accept")
    assert refused.returncode == 1 and "nothing to accept" in refused.stderr
