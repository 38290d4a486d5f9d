"""The importer: one transaction per file, idempotent, renewals, precise rejections."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from lts_server.core.codes import CodeFields
from lts_server.identity import load_or_create
from tests.conftest import Running, item, license_spec, make_vendor, wait_for, write_config


def db(running: Running) -> sqlite3.Connection:
    return sqlite3.connect(running.folder / "state" / "lts-server.sqlite3")


def count(running: Running, sql: str) -> int:
    return db(running).execute(sql).fetchone()[0]


async def imports(running: Running) -> dict[str, dict]:
    async with running.session.get(f"{running.url}/api/v1/admin/imports") as resp:
        return {Path(f["path"]).name: f for f in (await resp.json())["files"]}


async def test_import_creates_license_items_and_default_code(running: Running) -> None:
    spec = license_spec("100028117", items=[
        item("A", expires_at=item("x")["expires_at"]),
        item("B", quantity=5, expires_at=item("x")["starts_at"].replace(year=item("x")["starts_at"].year + 2)),
    ])
    await running.drop("a.lic", running.vendor.issue(spec))
    con = db(running)
    assert con.execute("SELECT license_id, organization_id, revision FROM licenses").fetchall() == [
        ("100028117", "216998", 1)]
    assert [r[0] for r in con.execute("SELECT item_id FROM items ORDER BY item_id")] == ["A", "B"]
    assert con.execute("SELECT name, is_default FROM handshake_codes").fetchall() == [("216998-100028117", 1)]
    assert running.ledger.ordered_items(running.ledger.codes["216998-100028117"]) == ["A", "B"]
    state = (await imports(running))["a.lic"]
    assert state["state"] == "imported" and state["licenseId"] == "100028117" and len(state["sha256"]) == 64


async def test_same_file_again_changes_and_records_nothing(running: Running) -> None:
    data = running.vendor.issue(license_spec("L1"))
    await running.drop("a.lic", data)
    events = count(running, "SELECT COUNT(*) FROM events")
    report = await running.importer.scan("again")
    assert report.outcomes == {}
    assert count(running, "SELECT COUNT(*) FROM events") == events
    # The same bytes under a second name: recognised as the same license.
    outcome = await running.importer.import_bytes(str(running.folder / "import" / "copy.lic"), data)
    assert outcome is not None and outcome.state == "unchanged"
    assert count(running, "SELECT COUNT(*) FROM events") == events
    assert count(running, "SELECT COUNT(*) FROM licenses") == 1


async def test_same_file_dropped_twice_at_once(running: Running) -> None:
    data = running.vendor.issue(license_spec("L1", items=[item("L1-1"), item("L1-2")]))
    folder = running.folder / "import"
    results = await asyncio.gather(
        running.importer.import_bytes(str(folder / "one.lic"), data),
        running.importer.import_bytes(str(folder / "two.lic"), data),
    )
    assert sorted(r.state for r in results if r) == ["imported", "unchanged"]
    assert count(running, "SELECT COUNT(*) FROM items") == 2
    assert count(running, "SELECT COUNT(*) FROM handshake_codes") == 1
    assert count(running, "SELECT COUNT(*) FROM events WHERE type = 'import.imported'") == 1


async def test_renewal_keeps_code_configuration_and_history(running: Running) -> None:
    v = running.vendor
    await running.drop("a.lic", v.issue(license_spec("L1", items=[item("L1-1"), item("L1-2")])))
    code = "216998-L1"
    await running.ledger.edit_code(code, CodeFields(domains=("*.example.com",)))
    await running.ledger.set_usage_order(code, ("L1-2", "L1-1"))
    status, body = await running.handshake(handshakeCode=code, domain="app.example.com")
    assert status == 200, body
    renewed = license_spec("L1", revision=2, items=[item("L1-1", quantity=99), item("L1-2"), item("L1-3")])
    await running.drop("a.lic", v.issue(renewed))
    assert (await imports(running))["a.lic"]["state"] == "renewed"
    c = running.ledger.codes[code]
    assert c.domains == ("*.example.com",)
    assert c.custom_order and c.items == ("L1-2", "L1-1", "L1-3")
    assert running.ledger.items["L1-1"].quantity == 99
    assert count(running, "SELECT revision FROM licenses WHERE license_id = 'L1'") == 2
    assert count(running, "SELECT COUNT(*) FROM events WHERE type = 'handshake'") == 1
    assert count(running, "SELECT COUNT(*) FROM seats") == 1


async def test_lower_or_equal_revision_with_different_content_is_rejected(running: Running) -> None:
    v = running.vendor
    await running.drop("a.lic", v.issue(license_spec("L1", revision=2)))
    await running.drop("b.lic", v.issue(license_spec("L1", revision=2, items=[item("L1-1", quantity=3)])))
    await running.drop("c.lic", v.issue(license_spec("L1", revision=1)))
    states = await imports(running)
    assert states["b.lic"]["state"] == "rejected" and states["b.lic"]["reason"].startswith("stale-revision")
    assert states["c.lic"]["state"] == "rejected"
    assert running.ledger.items["L1-1"].quantity == 10


@pytest.mark.parametrize("case, reason", [
    ("tampered", "bad-signature"),
    ("unknown-key", "unknown-key"),
    ("malformed", "malformed"),
    ("status-new", "not-activated"),
    ("other-server", "wrong-server"),
    ("item-owned", "item-owned"),
])
async def test_rejections_store_nothing_but_the_rejection(running: Running, case: str, reason: str) -> None:
    v = running.vendor
    await running.drop("base.lic", v.issue(license_spec("BASE", items=[item("SHARED")])))
    before = {t: count(running, f"SELECT COUNT(*) FROM {t}") for t in ("licenses", "items", "handshake_codes")}
    data = {
        "tampered": lambda: v.issue(license_spec("L1")).replace(b'"quantity": 10', b'"quantity": 11'),
        "unknown-key": lambda: make_vendor(running.folder / "x").issue(license_spec("L1")),
        "malformed": lambda: b"not a license",
        "status-new": lambda: v.issue(license_spec("L1", status="New")),
        "other-server": lambda: v.issue(license_spec("L1", server_uuid="11111111-1111-1111-1111-111111111111")),
        "item-owned": lambda: v.issue(license_spec("L1", items=[item("NEW"), item("SHARED")])),
    }[case]()
    path = await running.drop("bad.lic", data)
    state = (await imports(running))["bad.lic"]
    assert state["state"] == "rejected"
    assert state["reason"].startswith(reason)
    assert path.exists(), "a rejected file stays where it is"
    after = {t: count(running, f"SELECT COUNT(*) FROM {t}") for t in before}
    assert after == before
    assert count(running, "SELECT COUNT(*) FROM events WHERE type = 'import.rejected'") == 1


async def test_unbound_rejected_when_not_allowed(running: Running) -> None:
    running.server.config.vendor.allow_unbound = False
    await running.drop("u.lic", running.vendor.issue(license_spec("L1")))
    assert (await imports(running))["u.lic"]["reason"].startswith("unbound")
    uuid = load_or_create(running.folder / "state").server_uuid
    await running.drop("b.lic", running.vendor.issue(license_spec("L2", server_uuid=uuid)))
    assert (await imports(running))["b.lic"]["state"] == "imported"


async def test_half_copied_file_imports_once_complete(running: Running) -> None:
    data = running.vendor.issue(license_spec("L1"))
    await running.drop("slow.lic", data[: len(data) // 3])
    assert (await imports(running))["slow.lic"]["state"] == "rejected"
    await running.drop("slow.lic", data)
    assert (await imports(running))["slow.lic"]["state"] == "imported"


async def test_one_bad_file_does_not_stop_the_others(running: Running) -> None:
    folder = running.folder / "import"
    (folder / "a.lic").write_bytes(b"garbage")
    (folder / "b.lic").write_bytes(running.vendor.issue(license_spec("L2")))
    (folder / "notes.txt").write_text("not a license")
    await running.importer.scan("test")
    states = await imports(running)
    assert states["a.lic"]["state"] == "rejected" and states["b.lic"]["state"] == "imported"
    assert "notes.txt" not in states


async def test_watcher_imports_a_dropped_file(tmp_path: Path, vendor) -> None:
    from lts_server import config as config_mod
    from lts_server.server import Server
    from tests.conftest import write_config

    cfg = config_mod.load(write_config(tmp_path, vendor, **{"import": {"watch": True}}), environ={})
    server = Server(cfg)
    await server.start()
    try:
        await asyncio.sleep(0.3)
        lic = vendor.issue(license_spec("W1"))
        tmp = tmp_path / "import" / ".w.tmp"
        tmp.write_bytes(lic)
        tmp.rename(tmp_path / "import" / "w.lic")
        assert server.services is not None
        await wait_for(lambda: "W1" in server.services.ledger.licenses, timeout=10)
    finally:
        await server.stop()


async def test_rejected_files_are_retried_at_start_up_once_their_key_is_trusted(tmp_path, vendor) -> None:
    from lts_server import config as config_mod
    from lts_server.server import Server

    second = make_vendor(tmp_path / "second-vendor")
    config = write_config(tmp_path, vendor)
    (tmp_path / "import" / "k2.lic").write_bytes(second.issue(license_spec("K2")))
    server = Server(config_mod.load(config, environ={}))
    await server.start()
    try:
        assert server.services.ledger.imports[str(tmp_path / "import" / "k2.lic")].state == "rejected"
        events = sqlite3.connect(tmp_path / "state" / "lts-server.sqlite3").execute
        rejections = "SELECT COUNT(*) FROM events WHERE type = 'import.rejected'"
        await server.services.importer.scan("timer")  # same keys: not tried again, nothing recorded
        assert events(rejections).fetchone()[0] == 1
        await server.reload()  # same keys after a reload: tried again, same reason, nothing new recorded
        assert events(rejections).fetchone()[0] == 1
    finally:
        await server.stop()
    write_config(tmp_path, vendor, vendor={"public_keys": [str(vendor.pub_path), str(second.pub_path)]})
    server = Server(config_mod.load(config, environ={}))
    await server.start()
    try:
        ledger = server.services.ledger
        assert ledger.imports[str(tmp_path / "import" / "k2.lic")].state == "imported"
        assert "K2" in ledger.licenses and ledger.open_rejections() == []
    finally:
        await server.stop()


async def test_an_upload_rejection_no_longer_warns_once_the_same_file_is_imported(running: Running) -> None:
    second = make_vendor(running.folder / "second-vendor")
    data = second.issue(license_spec("K3"))
    async with running.session.post(f"{running.url}/api/v1/admin/licenses?name=k3.lic", data=data) as resp:
        assert resp.status == 422
    assert [r.path for r in running.ledger.open_rejections()] == ["upload:k3.lic"]
    write_config(running.folder, running.vendor,
                 vendor={"public_keys": [str(running.vendor.pub_path), str(second.pub_path)]})
    await running.server.reload()
    await running.drop("k3.lic", data)
    assert running.ledger.open_rejections() == []
    async with running.session.get(f"{running.url}/api/v1/admin/status") as resp:
        assert (await resp.json())["importDirectory"]["rejected"] == 0
