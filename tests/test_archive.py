"""Archiving the event log: old device events move into compressed files, statistics stay exact."""

from __future__ import annotations

import errno
import gzip
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lts_server import archive as archive_mod
from lts_server import config as config_mod
from lts_server import server as server_mod
from lts_server.archive import Archiver
from lts_server.core.times import iso
from lts_server.server import Server
from tests.conftest import (
    Clock,
    Running,
    Vendor,
    admin_login,
    item,
    license_spec,
    storage_section,
    wait_for,
    write_config,
)

DEVICE_TYPES = {"handshake", "seat.granted", "seat.refreshed", "seat.released", "usage.record", "usage.report"}


@pytest.fixture
def manual_rollups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The background rollup job waits an hour between runs: the test folds events when it says so."""
    monkeypatch.setattr(server_mod, "ROLLUP_SECONDS", 3600.0)


async def setup_traffic(r: Running, devices: int = 5) -> None:
    await r.drop("a.lic", r.vendor.issue(license_spec("L1", items=[item("L1-1", quantity=50), item("L1-2")])))
    for i in range(devices):
        assert (await r.handshake(handshakeCode="216998-L1", clientUuid=f"old-{i}"))[0] == 200
    # A refresh, and a refusal (another product), so every kind of device event is in the log.
    assert (await r.handshake(handshakeCode="216998-L1", clientUuid="old-0"))[0] == 200
    assert (await r.handshake(handshakeCode="216998-L1", clientUuid="old-x", product="other"))[0] == 403


async def two_days_later(r: Running) -> None:
    """Move the clock on two days, and log in again: an admin token lasts 12 hours."""
    r.clock.advance(days=2)
    r.session.headers["Authorization"] = f"Bearer {await admin_login(r.url)}"


async def exported(r: Running) -> list[dict[str, Any]]:
    async with r.session.get(f"{r.url}/api/v1/admin/events") as resp:
        assert resp.status == 200
        return [json.loads(line) for line in (await resp.text()).splitlines()]


async def statistics(r: Running) -> list[dict[str, Any]]:
    """Every statistics answer an admin reads, for the period of the traffic and all time."""
    start = iso(r.clock.now - timedelta(days=3))
    end = iso(r.clock.now + timedelta(hours=1))
    out = []
    for path in ("codes/216998-L1", "items/L1-1"):
        for bucket in ("3m", "2h", "1d"):
            async with r.session.get(f"{r.url}/api/v1/admin/stats/{path}",
                                     params={"bucket": bucket, "from": start, "to": end}) as resp:
                assert resp.status == 200
                body = await resp.json()
                out.append({"series": body["series"], "summary": body["summary"]})
    return out


async def archive(r: Running, before: str) -> tuple[int, dict[str, Any]]:
    async with r.session.post(f"{r.url}/api/v1/admin/events/archive", json={"before": before}) as resp:
        return resp.status, await resp.json()


def archived_lines(folder: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(folder.glob("*.ndjson.gz")):
        with gzip.open(path, "rt") as f:
            lines += [json.loads(line) for line in f]
    return lines


def archive_folder(r: Running) -> Path:
    assert r.server.services is not None
    return r.server.services.archiver.folder


async def test_archive_moves_old_device_events_to_a_file_and_statistics_stay_the_same(running: Running) -> None:
    await setup_traffic(running)
    await two_days_later(running)
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="new-1"))[0] == 200
    await running.server.roll_up()
    stats_before = await statistics(running)
    events_before = await exported(running)
    horizon = running.clock.now - timedelta(days=1)

    status, body = await archive(running, iso(horizon))

    assert status == 200, body
    old_device_events = [e for e in events_before if e["type"] in DEVICE_TYPES and e["at"] < iso(horizon)]
    assert body["events"] == len(old_device_events) == 13  # 5 grants and a refresh (2 each), a refusal
    assert [f["events"] for f in body["files"]] == [13]
    # The files hold exactly the events that left the log, as the export wrote them.
    assert archived_lines(archive_folder(running)) == old_device_events
    remaining = await exported(running)
    assert remaining == [e for e in events_before if e not in old_device_events]
    assert {e["type"] for e in remaining if e["at"] < iso(horizon)} >= {"code.created", "import.imported"}
    assert await statistics(running) == stats_before
    # New traffic is numbered after everything archived and counted as before.
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="new-2"))[0] == 200
    await running.server.roll_up()
    newest = (await exported(running))[-1]
    assert newest["clientUuid"] == "new-2" and newest["seq"] > max(e["seq"] for e in events_before)
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-L1") as resp:
        assert (await resp.json())["summary"]["all"]["granted"] == 8
    async with running.session.get(f"{running.url}/api/v1/admin/events/archives") as resp:
        listed = (await resp.json())["archives"]
    assert [(a["events"], a["done"]) for a in listed] == [(13, True)]
    # A second run finds nothing more to move.
    status, body = await archive(running, iso(horizon))
    assert status == 200 and body["events"] == 0 and body["files"] == []


async def test_events_not_yet_in_the_statistics_are_kept(manual_rollups: None, running: Running) -> None:
    await setup_traffic(running, devices=2)
    await running.server.roll_up()
    folded = await exported(running)
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="late-1"))[0] == 200
    await two_days_later(running)
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="new-1"))[0] == 200

    status, body = await archive(running, iso(running.clock.now - timedelta(days=1)))

    assert status == 200
    assert [e["clientUuid"] for e in archived_lines(archive_folder(running))] == [
        e["clientUuid"] for e in folded if e["type"] in DEVICE_TYPES]
    assert {e["clientUuid"] for e in await exported(running) if e["type"] == "handshake"} == {"late-1", "new-1"}
    assert body["rollupLagEvents"] > 0
    await running.server.roll_up()
    status, body = await archive(running, iso(running.clock.now - timedelta(days=1)))
    assert body["events"] == 2  # late-1's grant, now counted
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-L1") as resp:
        summary = (await resp.json())["summary"]["all"]
    assert (summary["granted"], summary["refused"], summary["devices"]) == (5, 1, 4)


async def test_archive_refuses_a_horizon_less_than_an_hour_ago(running: Running) -> None:
    status, body = await archive(running, iso(running.clock.now - timedelta(minutes=30)))
    assert status == 400 and body["error"]["field"] == "before"
    status, body = await archive(running, "yesterday")
    assert status == 400 and body["error"]["field"] == "before"


class Crash(Exception):
    pass


@pytest.fixture
def crash_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make one store operation of the next archive run fail, as a crash at that point would stop it."""

    def arm(store: Any, operation: str) -> None:
        original = getattr(type(store), operation)

        async def failing(self: Any, *args: Any) -> Any:
            monkeypatch.setattr(type(store), operation, original)
            raise Crash(operation)

        monkeypatch.setattr(type(store), operation, failing)

    yield arm


@pytest.mark.parametrize("crash_in", ["record_archive", "delete_archived"])
async def test_a_crash_between_the_file_and_the_delete_loses_nothing_and_doubles_nothing(
        running: Running, crash_once: Any, crash_in: str) -> None:
    await setup_traffic(running)
    await two_days_later(running)
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="new-1"))[0] == 200
    await running.server.roll_up()
    events_before = await exported(running)
    stats_before = await statistics(running)
    assert running.server.services is not None
    archiver: Archiver = running.server.services.archiver
    before = running.clock.now - timedelta(days=1)
    crash_once(running.server.services.store, crash_in)
    archiver.folder.mkdir(parents=True)
    (archiver.folder / "kept-by-the-operator.ndjson.gz").write_bytes(b"not ours")

    with pytest.raises(Crash):
        await archiver.run(before, running.clock.now)

    # The file was written (and, past record_archive, recorded); every event is still in the log.
    assert await exported(running) == events_before
    report = await archiver.run(before, running.clock.now)
    (archiver.folder / "kept-by-the-operator.ndjson.gz").unlink()  # still there: only its own files are touched
    archived = archived_lines(archiver.folder)
    assert len(archived) == len({e["seq"] for e in archived}) == 13
    assert archived == [e for e in events_before if e not in await exported(running)]
    assert (report.resumed, report.resumed_events + report.events) == \
        ((1, 13) if crash_in == "delete_archived" else (0, 13))
    assert len(list(archiver.folder.iterdir())) == 1
    assert await statistics(running) == stats_before


@pytest.mark.parametrize("fault", ["disk full", "not a folder"])
async def test_an_archive_folder_that_cannot_be_written_answers_503_and_loses_nothing(
        running: Running, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """A full disk (or a folder that is a file) under archive_dir: the admin is told which folder and why,
    the events stay in the log, no half-written file is left, and the next run after the fix archives."""
    await setup_traffic(running)
    await two_days_later(running)
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="new-1"))[0] == 200
    await running.server.roll_up()
    events_before = await exported(running)
    folder = archive_folder(running)
    if fault == "disk full":
        def full(out: Any, page: Any) -> None:
            out.write(b"part of a page")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(archive_mod, "_write", full)
        reason = os.strerror(errno.ENOSPC)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_bytes(b"")  # a file where the folder should be
        reason = "File exists"

    async with running.session.post(f"{running.url}/api/v1/admin/events/archive",
                                    json={"before": iso(running.clock.now - timedelta(days=1))}) as resp:
        status, body, retry = resp.status, await resp.json(), resp.headers.get("Retry-After")

    assert (status, retry) == (503, "30"), body
    message = body["error"]["message"]
    assert str(folder) in message and reason in message, message
    assert "database" not in message.split(";")[0]  # the folder's fault, not the database's
    assert await exported(running) == events_before
    if fault == "disk full":
        assert list(folder.iterdir()) == []  # the .partial file is gone
        monkeypatch.undo()
    else:
        folder.unlink()
    status, body = await archive(running, iso(running.clock.now - timedelta(days=1)))
    assert status == 200 and body["events"] == 13
    assert len(archived_lines(folder)) == 13


async def test_retain_days_archives_old_device_events_on_its_own(
        request: pytest.FixtureRequest, backend: str, tmp_path: Path, vendor: Vendor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "ARCHIVE_SECONDS", 0.05)
    clock = Clock()
    storage = await storage_section(request, backend, tmp_path)
    cfg = config_mod.load(write_config(tmp_path, vendor, storage=storage,
                                       events={"retain_days": 1, "archive_dir": str(tmp_path / "old-events")}),
                          environ={})
    server = Server(cfg, clock=clock)
    await server.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {await admin_login(server.urls[0])}"}) \
                as session:
            r = Running(server, server.urls[0], tmp_path, vendor, session, clock)
            await setup_traffic(r, devices=3)
            await two_days_later(r)
            assert (await r.handshake(handshakeCode="216998-L1", clientUuid="new-1"))[0] == 200
            await r.server.roll_up()

            def old_handshakes_archived() -> bool:  # 3 grants, a refresh, a refusal
                return [e["type"] for e in archived_lines(tmp_path / "old-events")].count("handshake") == 5

            await wait_for(old_handshakes_archived, timeout=30)

            async def only_new_left() -> bool:  # the file is written first, the events deleted after it
                return {e["clientUuid"] for e in await exported(r) if e["type"] in DEVICE_TYPES} == {"new-1"}

            await wait_for(only_new_left, timeout=30)
    finally:
        await server.stop()
