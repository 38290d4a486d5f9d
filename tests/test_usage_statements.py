"""Usage the vendor can verify: export a statement, check it with lts-license verify-usage, and see every
tampering (a byte flipped, an event deleted, two swapped, an old statement replayed, a restored backup) named."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_server import config as config_mod
from lts_server.cli import vendor as vendor_cli
from lts_server.server import Server
from tests.conftest import Clock, Running, Vendor, admin_login, item, license_spec, write_config

DEVICES = 3


def bound_license(running: Running, license_id: str = "L1", **kw: Any) -> bytes:
    ident = running.server.services.identity
    return running.vendor.issue(license_spec(license_id, server_uuid=ident.server_uuid,
                                             server_key=ident.public_key_b64, **kw))


async def traffic(running: Running, devices: int = DEVICES, prefix: str = "dev") -> None:
    for n in range(devices):
        status, _ = await running.handshake(handshakeCode="216998-L1", clientUuid=f"{prefix}-{n}")
        assert status == 200
    status, body = await running.handshake(handshakeCode="216998-nope", clientUuid=f"{prefix}-x")
    assert status == 403 and body["error"]["code"] == 101


async def export(running: Running, **query: str) -> bytes:
    async with running.session.get(f"{running.url}/api/v1/usage/export", params=query) as resp:
        data = await resp.read()
        assert resp.status == 200, data
        return data


def check(tmp: Path, running: Running, statement: bytes, previous: bytes | None = None,
          capsys: pytest.CaptureFixture[str] | None = None, license_data: bytes | None = None) -> tuple[int, str]:
    """lts-license verify-usage over files, as a vendor runs it; returns (exit status, what it printed)."""
    (tmp / "s.statement").write_bytes(statement)
    lic = tmp / "license.lic"
    lic.write_bytes(license_data or bound_license(running))
    args = ["verify-usage", str(tmp / "s.statement"), "--license", str(lic), "--vendor-key",
            str(running.vendor.pub_path)]
    if previous is not None:
        (tmp / "p.statement").write_bytes(previous)
        args += ["--previous", str(tmp / "p.statement")]
    status = vendor_cli.main(args)
    out = capsys.readouterr() if capsys is not None else None
    return status, (out.out + out.err) if out else ""


def lines(statement: bytes) -> list[bytes]:
    return statement.split(b"\n")


async def test_export_and_verify_round_trip(running: Running, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    statement = await export(running)
    status, out = check(tmp_path, running, statement, capsys=capsys)
    assert status == 0, out
    assert out.startswith(f"VALID {tmp_path / 's.statement'}: statement 1")
    summary = json.loads(lines(statement)[-2].split(b" ", 2)[2])
    assert summary["items"]["L1-1"] == {"granted": DEVICES, "refused": 0, "seatsGranted": DEVICES, "units": 0,
                                        "devices": DEVICES}
    assert summary["codes"]["216998-nope"] == {"granted": 0, "refused": 1}
    types = [json.loads(line.split(b" ", 2)[2])[3] for line in lines(statement)[1:-2]]
    assert types.count("handshake") == DEVICES + 1 and "import.imported" in types
    # Printed per item for the vendor.
    assert "L1-1" in out and f"{DEVICES}" in out

    # The next statement starts where this one ended, and says so.
    await traffic(running, 1, prefix="second")
    second = await export(running)
    status, out = check(tmp_path, running, second, previous=statement, capsys=capsys)
    assert status == 0, out
    assert "continues statement 1" in out
    # Its first event is the export's own: the vendor sees each statement in the chain.
    first = json.loads(lines(second)[1].split(b" ", 2)[2])
    assert first[3] == "usage.statement" and first[12]["statementId"] == 1

    # A lost file is written again, byte for byte.
    async with running.session.get(f"{running.url}/api/v1/usage/export", params={"statement": "1"}) as resp:
        assert await resp.read() == statement


async def test_a_flipped_byte_is_named(running: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    statement = await export(running)
    target = lines(statement)[5]
    flipped = statement.replace(target, target.replace(b'"handshake"', b'"handshakf"').replace(b"dev-", b"deV-"), 1)
    assert flipped != statement
    status, out = check(tmp_path, running, flipped, capsys=capsys)
    assert status == 1
    body = json.loads(target.split(b" ", 2)[2])
    assert f"event {body[0]}:{body[1]} (line 6)" in out and "does not match its hash" in out
    # A byte of the summary: its signature fails.
    tail = statement.replace(b'"events":', b'"events": ', 1)
    status, out = check(tmp_path, running, tail, capsys=capsys)
    assert status == 1 and "signature does not verify" in out


async def test_an_event_deleted_from_the_database_is_named(running: Running, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    chain, seq = (await running.sql("SELECT chain, chain_seq FROM events WHERE type = 'handshake'"
                                    " ORDER BY seq LIMIT 1"))[0]
    await running.sql("DELETE FROM events WHERE chain = ? AND chain_seq = ?", chain, seq)
    status, out = check(tmp_path, running, await export(running), capsys=capsys)
    assert status == 1
    assert f"event {chain}:{seq} is missing" in out


async def test_two_events_swapped_are_named(running: Running, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    rows = await running.sql("SELECT chain, chain_seq, client_uuid FROM events WHERE type = 'handshake' AND result = 0"
                             " ORDER BY seq LIMIT 2")
    (chain, first, a), (_, second, b) = rows
    # In the database: two events trade places (their content moves, their chain positions stay).
    await running.sql("UPDATE events SET client_uuid = ? WHERE chain = ? AND chain_seq = ?", b, chain, first)
    await running.sql("UPDATE events SET client_uuid = ? WHERE chain = ? AND chain_seq = ?", a, chain, second)
    statement = await export(running)
    status, out = check(tmp_path, running, statement, capsys=capsys)
    assert status == 1 and f"event {chain}:{first} " in out
    # In the file: two lines trade places.
    clean = await _fresh_statement(running)
    parts = lines(clean)
    parts[2], parts[3] = parts[3], parts[2]
    status, out = check(tmp_path, running, b"\n".join(parts), capsys=capsys)
    third = json.loads(lines(clean)[3].split(b" ", 2)[2])
    assert status == 1 and f"event {third[0]}:{third[1]} (line 3)" in out


async def _fresh_statement(running: Running) -> bytes:
    await traffic(running, 2, prefix="fresh")
    return await export(running)


async def test_an_old_statement_replayed_is_refused(running: Running, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    first = await export(running)
    await traffic(running, 1, prefix="later")
    second = await export(running)
    status, out = check(tmp_path, running, first, previous=second, capsys=capsys)
    assert status == 1
    chain = json.loads(lines(first)[1].split(b" ", 2)[2])[0]
    assert "an older statement replayed" in out and f"its first event is {chain}:1 (line 2)" in out


async def test_bad_statements_and_licenses_get_precise_errors(running: Running, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    statement = await export(running)
    for broken, expected in ((b"hello\n", "not a usage statement"),
                             (statement[: len(statement) // 2], "truncated"),
                             (b"\n".join(lines(statement)[:-2]) + b"\n", "truncated"),
                             (statement.replace(b"\nE ", b"\nX ", 1), "not an event line")):
        status, out = check(tmp_path, running, broken, capsys=capsys)
        assert status == 1 and expected in out, out
    # A license without serverKey cannot anchor a statement: a usage error, exit 2.
    status, out = check(tmp_path, running, statement, capsys=capsys,
                        license_data=running.vendor.issue(license_spec("L1")))
    assert status == 2 and "has no serverKey" in out
    # A statement from another server (its own identity, a license bound to it).
    other = (tmp_path / "other").resolve()
    other.mkdir()
    cfg = config_mod.load(write_config(other, running.vendor), environ={})
    server = Server(cfg, clock=Clock())
    await server.start()
    try:
        ident = server.services.identity
        await admin_login(server.urls[0])
        data = running.vendor.issue(license_spec("L1", server_uuid=ident.server_uuid, server_key=ident.public_key_b64))
        status, out = check(tmp_path, running, statement, capsys=capsys, license_data=data)
        assert status == 1 and "signature does not verify" in out
    finally:
        await server.stop()
    # An export that asks for the future, or a period backwards: 400, nothing recorded.
    async with running.session.get(f"{running.url}/api/v1/usage/export", params={"until": "2999-01-01T00:00:00Z"}) as r:
        assert r.status == 400 and (await r.json())["error"]["field"] == "until"
    async with running.session.get(f"{running.url}/api/v1/admin/usage/statements") as resp:
        assert [s["statementId"] for s in (await resp.json())["statements"]] == [1]


async def test_the_export_needs_an_admin(running: Running) -> None:
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{running.url}/api/v1/usage/export") as resp:
            assert resp.status == 401


@pytest.mark.sqlite_only  # restores the SQLite file; a pg_restore would show the same
async def test_a_database_restored_from_an_older_backup_is_named(backend: str, tmp_path: Path, vendor: Vendor,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_mod.load(write_config(tmp_path, vendor), environ={})
    clock = Clock()

    async def started() -> Running:
        server = Server(cfg, clock=clock)
        await server.start()
        token = await admin_login(server.urls[0])
        session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
        return Running(server, server.urls[0], tmp_path, vendor, session, clock)

    async def stopped(r: Running) -> None:
        await r.session.close()
        await r.server.stop()

    running = await started()
    await running.drop("l1.lic", bound_license(running))
    await traffic(running)
    first = await export(running)
    await traffic(running, 2, prefix="kept")  # in the backup
    await stopped(running)
    database = cfg.database_path
    shutil.copy(database, tmp_path / "backup.sqlite3")
    running = await started()
    await traffic(running, 2, prefix="lost")  # after the backup: gone with the restore
    second = await export(running)  # the vendor has this one
    await stopped(running)
    for suffix in ("-wal", "-shm"):
        Path(str(database) + suffix).unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite3", database)
    running = await started()
    try:
        await traffic(running, 2, prefix="after-restore")
        third = await export(running)
        assert json.loads(lines(third)[-2].split(b" ", 2)[2])["statementId"] == 2  # the backup knows statement 1 only
        status, out = check(tmp_path, running, third, previous=second, capsys=capsys)
        assert status == 1
        # The first event after the backup point: the restored chain went on from there differently.
        lost = [json.loads(line.split(b" ", 2)[2]) for line in lines(second)[1:-2]]
        fork = next(e for e in lost if e[6] == "lost-0" or e[3] == "seat.granted" and e[6] == "lost-0")
        restored = [json.loads(line.split(b" ", 2)[2]) for line in lines(third)[1:-2]]
        assert any(e[1] == fork[1] for e in restored)
        assert "chain was rewound" in out and f"event {fork[0]}:" in out
        # Its own statement still verifies on its own: the break shows only against the one the vendor has.
        status, out = check(tmp_path, running, third, previous=first, capsys=capsys)
        assert status == 0, out
    finally:
        await stopped(running)


def test_statement_lines_are_the_documented_bytes() -> None:
    """The canonical line of an event is the JSON the docs describe, hashed onto its predecessor."""
    from lts_server import usagechain

    row = (1764000000000, "handshake", "216998-L1", "L1-1", "dev-1", "barcode-reader", "browser", 0, None, None, None)
    body = usagechain.line(1, 7, row)
    assert body == b'[1,7,1764000000000,"handshake","216998-L1","L1-1","dev-1","barcode-reader","browser",0,null,null,null]'
    detail = (1764000000000, "seat.released", None, "L1-1", "d\u00e9v\n", None, None, None, '{"reason":"forced"}', None,
              None)
    assert usagechain.line(1, 8, detail) == ('[1,8,1764000000000,"seat.released",null,"L1-1","d\u00e9v\\n",null,null,'
                                             'null,null,null,{"reason":"forced"}]').encode()
    previous = base64.b64decode("A" * 43 + "=")
    import hashlib
    assert usagechain.link(previous, body) == hashlib.sha256(previous + body).digest()


async def test_events_no_statement_covered_are_not_archived(running: Running, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import timedelta

    await running.drop("l1.lic", bound_license(running))
    await traffic(running, 2, prefix="covered")
    first = await export(running)
    await traffic(running, 2, prefix="uncovered")
    await running.server.roll_up()
    later = running.clock.now + timedelta(days=2)  # the archiver is told the time: the admin token stays valid
    report = await running.server.services.archiver.run(later - timedelta(days=1), later)
    assert report.events > 0
    left = {c for (c,) in await running.sql("SELECT client_uuid FROM events WHERE type = 'handshake'")}
    assert not any(c.startswith("covered") for c in left if c)
    assert {"uncovered-0", "uncovered-1"} <= left
    status, out = check(tmp_path, running, await export(running), previous=first, capsys=capsys)
    assert status == 0, out


async def test_the_statement_list_says_where_each_statement_starts(running: Running) -> None:
    """A since given to a later export is ignored (it starts where the previous ended): the list says so too."""
    await running.drop("l1.lic", bound_license(running))
    await traffic(running, 1)
    await export(running, since="2026-01-01T00:00:00Z")
    await traffic(running, 1, prefix="second")
    second = await export(running, since="2026-01-01T00:00:00Z")
    signed = json.loads(lines(second)[-2].split(b" ", 2)[2])
    async with running.session.get(f"{running.url}/api/v1/admin/usage/statements") as resp:
        listed = (await resp.json())["statements"]
    assert listed[0]["since"] == "2026-01-01T00:00:00Z"
    assert listed[1]["since"] == signed["since"] == listed[0]["until"]
