"""Rejected imports can be cleared, and half-copied files raise no alarm (issue 22, items 1 and 2)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from lts_server import config as config_mod
from lts_server.server import Server
from tests.conftest import ADMIN_PASSWORD, Running, Vendor, admin_login, item, license_spec, write_config


async def _imports(running: Running) -> dict[str, dict]:
    async with running.session.get(running.url + "/api/v1/admin/imports") as resp:
        return {f["path"]: f for f in (await resp.json())["files"]}


async def _rejected_count(running: Running) -> int:
    async with running.session.get(running.url + "/api/v1/admin/status") as resp:
        return (await resp.json())["importDirectory"]["rejected"]


async def _open_import_alerts(running: Running) -> list[str]:
    _, met = await running.server.services.alerts.current()
    return [c.subject for c in met if c.kind.value == "import"]


async def test_a_deleted_rejected_file_stops_being_a_rejection(running: Running) -> None:
    bad = await running.drop("bad.lic", b"not a license file")
    assert await _rejected_count(running) == 1
    assert await _open_import_alerts(running) == [str(bad)]
    bad.unlink()
    await running.importer.scan("test")
    assert await _rejected_count(running) == 0
    assert await _open_import_alerts(running) == []
    assert (await _imports(running))[str(bad)]["state"] == "removed"
    events = await running.sql("SELECT detail FROM events WHERE type = 'import.removed'")
    assert len(events) == 1 and "bad.lic" in events[0][0]
    # Dropped again, the same bytes are rejected again (nothing is skipped for having been seen).
    await running.drop("bad.lic", b"not a license file")
    assert await _rejected_count(running) == 1


async def test_a_fixed_file_replaces_its_rejection(running: Running) -> None:
    path = await running.drop("a.lic", running.vendor.issue(license_spec("L1"))[:-5])  # truncated: bad signature
    assert await _rejected_count(running) == 1
    await running.drop("a.lic", running.vendor.issue(license_spec("L1")))
    assert (await _imports(running))[str(path)]["state"] == "imported"
    assert await _rejected_count(running) == 0
    # A fixed file under another name replaces the rejection of the same license too.
    other = await running.drop("b.lic", running.vendor.issue(license_spec("L2", server_uuid=(
        "00000000-0000-0000-0000-000000000000"))))
    assert (await _imports(running))[str(other)]["state"] == "rejected"
    assert await _rejected_count(running) == 1
    running.clock.advance(seconds=1)
    await running.drop("b-fixed.lic", running.vendor.issue(license_spec("L2")))
    assert await _rejected_count(running) == 0
    assert await _open_import_alerts(running) == []


async def test_the_admin_dismisses_a_rejection(running: Running, tmp_path: Path) -> None:
    bad = await running.drop("odd.lic", b"garbage")
    async with running.session.post(running.url + "/api/v1/admin/imports/dismiss", json={"name": "nope.lic"}) as r:
        assert r.status == 404
        assert "ltsctl imports" in (await r.json())["error"]["message"]
    async with running.session.post(running.url + "/api/v1/admin/imports/dismiss", json={"name": "odd.lic"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["state"] == "dismissed"
    assert await _rejected_count(running) == 0
    assert await _open_import_alerts(running) == []
    await running.importer.scan("test")  # the same bytes are not tried again
    assert (await _imports(running))[str(bad)]["state"] == "dismissed"
    assert await running.sql_value("SELECT COUNT(*) FROM events WHERE type = 'import.dismissed'") == 1
    # A changed file is.
    await running.drop("odd.lic", b"other garbage")
    assert (await _imports(running))[str(bad)]["state"] == "rejected"
    # And through ltsctl.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "LTS_ADMIN_PASSWORD": ADMIN_PASSWORD}

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lts_server.cli.ctl", "--server", running.url, *args],
                              capture_output=True, text=True, env=env, timeout=60)

    assert (await asyncio.to_thread(ctl, "login")).returncode == 0
    out = await asyncio.to_thread(ctl, "imports", "dismiss", "odd.lic")
    assert out.returncode == 0 and "dismissed" in out.stdout, out.stderr
    assert (await _imports(running))[str(bad)]["state"] == "dismissed"
    out = await asyncio.to_thread(ctl, "imports", "dismiss", "odd.lic")
    assert out.returncode == 1 and "no such import rejection" in out.stderr


async def test_a_file_still_being_written_is_not_verified_until_it_settles(tmp_path: Path, vendor: Vendor) -> None:
    cfg = config_mod.load(write_config(tmp_path, vendor, **{"import": {"settle_ms": 600}}), environ={})
    server = Server(cfg)
    await server.start()
    try:
        await admin_login(server.urls[0])
        data = vendor.issue(license_spec("L1", items=[item("L1-1")]))
        path = tmp_path / "import" / "half.lic"
        path.write_bytes(data[: len(data) // 2])  # a copy under way
        importer, ledger = server.services.importer, server.services.ledger
        await importer.scan("changed")
        assert str(path) not in ledger.imports and not ledger.open_rejections()
        time.sleep(0.2)
        path.write_bytes(data)  # the copy completes
        await importer.scan("changed")
        assert str(path) not in ledger.imports
        # The importer scans again by itself once the file has been still for settle_ms.
        deadline = time.monotonic() + 10
        while str(path) not in ledger.imports:
            assert time.monotonic() < deadline, "the settled file was never imported"
            await asyncio.sleep(0.1)
        assert ledger.imports[str(path)].state == "imported"
        assert not ledger.open_rejections()
        # Copy to a temporary name, then rename: verified at once (renamed after its last write).
        tmp = tmp_path / "import" / ".renamed.lic.tmp"
        tmp.write_bytes(vendor.issue(license_spec("L2", items=[item("L2-1")])))
        time.sleep(0.02)
        tmp.rename(tmp_path / "import" / "renamed.lic")
        await importer.scan("changed")
        assert ledger.imports[str(tmp_path / "import" / "renamed.lic")].state == "imported"
    finally:
        await server.stop()
