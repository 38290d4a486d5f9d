"""server.workers = 2 on SQLite: two front processes on the port in front of one writer, through HTTP.

Exact seats under concurrency, kill -9 of the writer and of a front under load (every acknowledged grant is
in the database after), frames the writer cannot decode, and an admin change seen by every front's next
grant.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_client import MAC_HEADER, report_mac
from lts_server.core.times import iso, slice_start

from conftest import (Daemon, Vendor, admin_login, free_port, item, license_spec, start_daemon, stop_daemon,
                      write_config)

CODE = "216998-P"


def children(d: Daemon) -> dict[str, int]:
    """The supervisor's processes by role: "writer", "front 1", "front 2"."""
    pids = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True).stdout.split()
    roles = {}
    for pid in pids:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        roles["writer" if b"--writer" in args else f"front {args[args.index(b'--worker') + 1].decode()}"] = int(pid)
    return roles


def wait_listening(d: Daemon, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and d.log().count("listening on") < count:
        time.sleep(0.05)
    assert d.log().count("listening on") >= count, d.log()


@pytest.fixture
def fronted(tmp_path: Path, vendor: Vendor) -> Iterator[Daemon]:
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=100)])))
    (tmp_path / "import" / "u.lic").write_bytes(vendor.issue(license_spec("U", items=[item("u1", "per-scan",
                                                                                           quantity=100)])))
    (tmp_path / "import" / "q.lic").write_bytes(vendor.issue(license_spec("Q", items=[item("q1", quantity=1)])))
    port = free_port()
    cfg = write_config(tmp_path, vendor, server={"workers": 2, "port": port}, log={"level": "info"})
    d = start_daemon(cfg, tmp_path, port=port)
    try:
        wait_listening(d, 4)  # the writer, two fronts, the supervisor
        assert "2 workers in front of one writer listening" in d.log(), d.log()
        yield d
    finally:
        if d.proc.poll() is None:
            assert stop_daemon(d, timeout=30) == 0, d.log()[-3000:]
    assert subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True).returncode == 1
    assert sorted(p.name for p in (tmp_path / "state").glob("*.sock")) == []  # a clean stop leaves no socket


def body(n: int | str, code: str = CODE, **kw: Any) -> dict[str, Any]:
    return {"handshakeCode": code, "clientUuid": f"dev-{n}", "product": "barcode-reader", "deploymentType": "browser",
            **kw}


async def handshake(session: aiohttp.ClientSession, url: str, n: int | str) -> tuple[int, dict[str, Any], str]:
    async with session.post(f"{url}/api/v1/handshake", json=body(n)) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After", "")


async def seat_holders(url: str) -> set[str]:
    token = await admin_login(url)
    held: set[str] = set()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        offset: int | None = 0
        while offset is not None:
            async with s.get(f"{url}/api/v1/admin/items/p1/devices?limit=500&offset={offset}") as resp:
                page = await resp.json()
                assert resp.status == 200, page
            held |= {d["clientUuid"] for d in page["devices"]}
            offset = page["next"]
    return held


def test_exact_seats_under_concurrency_and_signed_by_the_fronts(fronted: Daemon) -> None:
    assert set(children(fronted)) == {"writer", "front 1", "front 2"}

    async def scenario() -> tuple[list[tuple[int, dict[str, Any], str]], dict[str, Any], set[str]]:
        # A new connection per request: the kernel spreads them over both fronts.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=200)) as s:
            answers = await asyncio.gather(*(handshake(s, fronted.url, n) for n in range(600)))
            async with s.get(f"{fronted.url}/api/v1/server") as resp:
                info = await resp.json()
        return answers, info, await seat_holders(fronted.url)

    answers, info, held = asyncio.run(scenario())
    statuses = [a[0] for a in answers]
    assert statuses.count(200) == 110 and statuses.count(403) == 490, sorted(set(statuses))
    granted = {a[1]["authorization"]["clientUuid"] for a in answers if a[0] == 200}
    assert granted == held and len(held) == 110
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(info["publicKey"]))
    for status, answer, _ in answers:
        if status == 200:  # signed by a front over the exact bytes sent
            raw = json.dumps(answer["authorization"], separators=(",", ":")).encode()
            key.verify(base64.b64decode(answer["signature"]), raw)
            assert answer["keyId"] == info["keyId"] and answer["reportKey"]
    assert {a[1]["error"]["code"] for a in answers if a[0] == 403} == {120}


def _load(url: str, devices: int, kill: Any) -> tuple[set[str], list[str], int]:
    """Handshakes of `devices` new devices, 16 at a time, kill() halfway; each device retries 503s until it
    has an answer. Returns the acknowledged grants, the Retry-After of each 503, and the refusals."""

    async def scenario() -> tuple[set[str], list[str], int]:
        acknowledged: set[str] = set()
        retry_after: list[str] = []
        refused = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(devices):
            queue.put_nowait(n)

        async def device_loop(s: aiohttp.ClientSession) -> None:
            nonlocal refused
            while not queue.empty():
                n = queue.get_nowait()
                if n == devices // 2:
                    kill()
                for _ in range(400):
                    try:
                        status, answer, retry = await handshake(s, url, n)
                    except (aiohttp.ClientError, OSError):  # a front killed mid-request
                        await asyncio.sleep(0.05)
                        continue
                    if status == 503:
                        retry_after.append(retry)
                        await asyncio.sleep(0.05)
                        continue
                    assert status in (200, 403), (status, answer)
                    if status == 200:
                        acknowledged.add(answer["authorization"]["clientUuid"])
                    else:
                        refused += 1
                    break
                else:
                    raise AssertionError(f"dev-{n} had no answer")

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            await asyncio.gather(*(device_loop(s) for _ in range(16)))
        return acknowledged, retry_after, refused

    return asyncio.run(scenario())


@pytest.mark.parametrize("victim", ["writer", "front 1"])
def test_kill_9_under_load_loses_no_acknowledged_grant(fronted: Daemon, victim: str) -> None:
    before = children(fronted)

    def kill() -> None:
        os.kill(before[victim], signal.SIGKILL)

    acknowledged, retry_after, refused = _load(fronted.url, 400, kill)
    # Granted at most once each: 110 seats, and every one a device was told of is recorded.
    assert len(acknowledged) + refused == 400 and len(acknowledged) == 110
    held = asyncio.run(seat_holders(fronted.url))
    assert acknowledged == held
    assert all(r == "1" for r in retry_after), set(retry_after)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (set(children(fronted)) != set(before)
                                           or children(fronted)[victim] == before[victim]):
        time.sleep(0.1)
    after = children(fronted)
    assert set(after) == set(before) and after[victim] != before[victim], fronted.log()[-3000:]
    if victim == "writer":
        assert retry_after, "no request was in flight or refused while the writer was away"
        assert "front.writer_lost" in fronted.log() and "front.writer_reconnected" in fronted.log()
    # The restarted process serves: the next new device is refused for want of a seat, not an error.
    with socket.create_connection(("127.0.0.1", int(fronted.url.rsplit(":", 1)[1])), timeout=5):
        pass


def _garbage(sock_path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return s.recv(100)


def test_frames_the_writer_cannot_decode_close_the_connection_and_harm_nothing(fronted: Daemon,
                                                                                tmp_path: Path) -> None:
    sock_path = tmp_path / "state" / "writer.sock"
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
    for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x02\x91\x01",
                 b"\x00\x00\x00\x05\x91\x93\x01\xc0\xc0", b"GET / HTTP/1.1\r\n\r\n"):
        assert _garbage(sock_path, junk) == b""  # closed, nothing answered

    async def after() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            return [(await handshake(s, fronted.url, f"after-{n}"))[0] for n in range(20)]

    assert asyncio.run(after()) == [200] * 20
    assert fronted.log().count("writer.bad_frame") >= 1
    assert children(fronted).keys() == {"writer", "front 1", "front 2"}


# Asks that decode as MessagePack but that no front sends: values the HTTP edge refuses.
HOSTILE_ASKS = {
    "empty client UUID": {"clientUuid": ""},
    "5,000-character client UUID": {"clientUuid": "x" * 5000},
    "client UUID with a NUL": {"clientUuid": "nul\x00x"},
    "client UUID with a space": {"clientUuid": "a b"},
    "negative instances": {"instances": -1000},
    "borrowDays 0": {"borrowDays": 0},
    "version with a NUL": {"version": "2.1\x00"},
    "a waitSeconds": {"waitSeconds": 5},
}


@pytest.mark.parametrize("fault", ["hostile values", "bad fingerprint", "negative id"])
def test_asks_with_values_the_http_edge_refuses_are_bad_frames_and_nothing_is_granted(
        fronted: Daemon, tmp_path: Path, fault: str) -> None:
    """A front that sends values no HTTP request could carry (a process gone wrong, or anything else that can
    reach the socket) does not get them decided: the frame is refused whole and nothing of it is stored."""
    sock_path = tmp_path / "state" / "writer.sock"
    good = {**body("hostile-ok"), "clientUuid": "hostile-ok"}
    if fault == "hostile values":
        frames = [[[n, {**good, "clientUuid": f"hostile-{n}", **change}, None]]
                  for n, change in enumerate(HOSTILE_ASKS.values())]
    elif fault == "bad fingerprint":
        frames = [[[1, good, "not hex"]]]
    else:
        frames = [[[-1, good, None]]]
    for asks in frames:
        data = msgspec.msgpack.encode(asks)
        assert _garbage(sock_path, len(data).to_bytes(4, "big") + data) == b""  # closed, nothing answered

    held = asyncio.run(seat_holders(fronted.url))
    assert not {c for c in held if c.startswith("hostile") or not c or "\x00" in c or len(c) > 128}, held

    async def after() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            return [(await handshake(s, fronted.url, f"after-{n}"))[0] for n in range(5)]

    assert asyncio.run(after()) == [200] * 5
    assert "writer.bad_frame" in fronted.log()
    assert children(fronted).keys() == {"writer", "front 1", "front 2"}


def test_an_admin_change_is_seen_by_the_next_grant_on_every_front(fronted: Daemon) -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        token = await admin_login(fronted.url)
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async def round_of(tag: str) -> list[int]:
                answers = await asyncio.gather(*(handshake(s, fronted.url, f"{tag}-{n}") for n in range(20)))
                return [a[1]["error"]["code"] if a[0] == 403 else a[0] for a in answers]

            first = await round_of("a")
            async with s.post(f"{fronted.url}/api/v1/admin/items/p1/revoke", headers=auth) as resp:
                assert resp.status == 200, await resp.text()
            revoked = await round_of("b")
            async with s.post(f"{fronted.url}/api/v1/admin/items/p1/restore", headers=auth) as resp:
                assert resp.status == 200
            restored = await round_of("c")
        return first, revoked, restored

    first, revoked, restored = asyncio.run(scenario())
    assert first == [200] * 20 and revoked == [113] * 20 and restored == [200] * 20


def test_usage_reports_waits_for_a_seat_and_metrics_pass_to_the_writer(fronted: Daemon) -> None:
    async def scenario() -> None:
        token = await admin_login(fronted.url)
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(f"{fronted.url}/api/v1/handshake", json=body("scanner", "216998-U")) as resp:
                granted = await resp.json()
                assert resp.status == 200, granted
            report = json.dumps({"reportId": "r-1", "clientUuid": "dev-scanner", "handshakeCode": "216998-U",
                                 "records": [{"slot": iso(slice_start(datetime.now(UTC))), "product": "barcode-reader",
                                              "operation": "scan", "count": 7}]}).encode()
            mac = report_mac(base64.b64decode(granted["reportKey"]), report)
            for duplicate in (False, True):
                async with s.post(f"{fronted.url}/api/v1/usage", data=report,
                                  headers={"Content-Type": "application/json", MAC_HEADER: mac}) as resp:
                    assert resp.status == 200 and (await resp.json())["duplicate"] is duplicate
            async with s.get(f"{fronted.url}/api/v1/admin/items", headers=auth) as resp:
                units = next(i for i in (await resp.json())["items"] if i["itemId"] == "u1")["units"]
                assert units["used"] == 7, units
            statuses = []
            for n in range(3):  # one seat, no room for overuse: the rest wait in the writer's queue
                async with s.post(f"{fronted.url}/api/v1/handshake", json=body(f"q{n}", "216998-Q")) as resp:
                    statuses.append(resp.status)
            assert statuses == [200, 403, 403]
            async with s.post(f"{fronted.url}/api/v1/handshake", json=body("q-wait", "216998-Q", waitSeconds=1)) as resp:
                waited = await resp.json()
                assert resp.status == 403 and waited["error"]["queuePosition"] == 1, waited
            async with s.post(f"{fronted.url}/api/v1/handshake", json=body("q-long", "216998-Q",
                                                                            waitSeconds=100_000)) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["field"] == "waitSeconds"
            async with s.get(f"{fronted.url}/metrics", headers=auth) as resp:
                text = await resp.text()
                assert resp.status == 200
            granted_line = next(line for line in text.splitlines() if line.startswith("lts_handshakes_total")
                                and 'outcome="granted"' in line)
            assert float(granted_line.rsplit(" ", 1)[1]) == 2.0, granted_line  # counted by the writer

    asyncio.run(scenario())
