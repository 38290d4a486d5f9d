"""Slow, idle and too many connections: deadlines, a cap with a clear refusal, no log flood,
and legitimate clients served throughout. Every connection goes to 127.0.0.1, bounded in
number and time."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from lts_server import logs
from lts_server.server import RESERVED_FDS
from tests.conftest import Daemon, Vendor, license_spec, start_daemon, stop_daemon, write_config

HANDSHAKE = {"handshakeCode": "216998-L1", "clientUuid": "legit", "product": "barcode-reader",
             "deploymentType": "browser"}


def _daemon(tmp_path: Path, vendor: Vendor, open_files: int | None = None, **server: object) -> Daemon:
    (tmp_path / "import").mkdir(exist_ok=True)
    (tmp_path / "import" / "a.lic").write_bytes(vendor.issue(license_spec("L1")))
    cfg = write_config(tmp_path, vendor, log={"level": "info", "format": "json"},
                       server={"host": "127.0.0.1", "port": 0, "header_timeout": 2.0, "body_timeout": 2.0,
                               "idle_timeout": 2.0, **server})
    return start_daemon(cfg, tmp_path, open_files=open_files)


def _events(daemon: Daemon, name: str) -> list[dict]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == name]


async def _open(daemon: Daemon, n: int, first: bytes = b"") -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    port = int(daemon.url.rsplit(":", 1)[1])
    conns = []
    for i in range(0, n, 100):  # in batches, as a real burst would queue in the backlog
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(min(100, n - i))))
        for _, writer in batch:
            if first:
                writer.write(first)
        conns += batch
    return conns


async def _handshake_seconds(url: str) -> tuple[int, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(f"{url}/api/v1/handshake", json=HANDSHAKE) as resp:
            await resp.read()
            return resp.status, time.monotonic() - started


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""


async def test_2000_slow_connections_do_not_stop_handshakes_and_are_closed_in_time(tmp_path: Path,
                                                                                    vendor: Vendor) -> None:
    daemon = _daemon(tmp_path, vendor)
    try:
        # Slowloris: a request head that never ends, one header line now and then.
        slow = await _open(daemon, 2000, b"POST /api/v1/handshake HTTP/1.1\r\nHost: x\r\n")
        opened = time.monotonic()
        latencies = []
        for i in range(10):
            for _, writer in slow[i::10]:
                writer.write(b"X-Slow: 1\r\n")
            status, seconds = await _handshake_seconds(daemon.url)
            assert status == 200
            latencies.append(seconds)
            await asyncio.sleep(0.1)
        assert max(latencies) < 1.0, latencies
        # header_timeout is 2 s: every slow connection got 408 and was closed soon after.
        answers = await asyncio.gather(*(_closed_by_server(r, 6.0 - (time.monotonic() - opened)) for r, _ in slow))
        assert answers.count(None) == 0, f"{answers.count(None)} slow connections still open"
        assert sum(1 for a in answers if a and a.startswith(b"HTTP/1.1 408")) > 1900
        for _, writer in slow:
            writer.close()
        # One log line per interval for the lot, not one per connection.
        assert 1 <= len(_events(daemon, "http.slow_client_closed")) <= 2
        print(f"2000 slowloris connections: handshake latency max {max(latencies) * 1000:.0f} ms, "
              f"median {sorted(latencies)[5] * 1000:.0f} ms")
    finally:
        assert stop_daemon(daemon) == 0


async def test_a_slow_body_gets_408_and_an_idle_keep_alive_connection_is_closed(tmp_path: Path,
                                                                                 vendor: Vendor) -> None:
    daemon = _daemon(tmp_path, vendor)
    try:
        [(reader, writer)] = await _open(daemon, 1, b"POST /api/v1/handshake HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        answer = await _closed_by_server(reader, 5.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        writer.close()
        [(reader, writer)] = await _open(daemon, 1)
        body = json.dumps(HANDSHAKE).encode()
        writer.write(b"POST /api/v1/handshake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                     .split(b":")[1])
        await reader.readexactly(length)
        started = time.monotonic()
        assert await _closed_by_server(reader, 5.0) == b""  # idle_timeout is 2 s
        assert 1.5 < time.monotonic() - started < 4.5
        writer.close()
        assert "Traceback" not in daemon.log()
    finally:
        assert stop_daemon(daemon) == 0


async def test_at_the_cap_an_idle_connection_makes_room_for_a_new_one(tmp_path: Path, vendor: Vendor) -> None:
    daemon = _daemon(tmp_path, vendor, max_connections=20, header_timeout=30.0)
    try:
        idle = await _open(daemon, 20)
        await asyncio.sleep(0.3)
        status, seconds = await _handshake_seconds(daemon.url)
        assert status == 200 and seconds < 1.0
        assert await _closed_by_server(idle[0][0], 2.0) == b""  # the longest waiting made room
        for _, writer in idle:
            writer.close()
        assert _events(daemon, "http.connection_replaced")
    finally:
        assert stop_daemon(daemon) == 0


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_a_clear_503(tmp_path: Path,
                                                                                vendor: Vendor) -> None:
    daemon = _daemon(tmp_path, vendor, max_connections=20, body_timeout=3.0)
    try:
        busy = await _open(daemon, 20, b"POST /api/v1/handshake HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await asyncio.sleep(0.5)
        [(reader, writer)] = await _open(daemon, 1, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await _closed_by_server(reader, 2.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too many open connections" in answer and b"Retry-After: 1" in answer
        writer.close()
        await asyncio.sleep(3.5)  # the body deadline frees them
        status, _ = await _handshake_seconds(daemon.url)
        assert status == 200
        for _, writer in busy:
            writer.close()
        assert len(_events(daemon, "http.connections_full")) == 1
    finally:
        assert stop_daemon(daemon) == 0


async def test_few_open_files_lower_the_cap_instead_of_failing_accept_in_a_loop(tmp_path: Path,
                                                                                vendor: Vendor) -> None:
    daemon = _daemon(tmp_path, vendor, open_files=600, header_timeout=30.0)
    try:
        flood = await _open(daemon, 800)
        await asyncio.sleep(0.5)
        for _ in range(5):
            status, seconds = await _handshake_seconds(daemon.url)
            assert status == 200 and seconds < 1.0
        for _, writer in flood:
            writer.close()
        [lowered] = _events(daemon, "server.max_connections_lowered")
        assert lowered["used"] == 600 - RESERVED_FDS
        assert not _events(daemon, "asyncio.error")
        assert len(daemon.log().splitlines()) < 50
    finally:
        assert stop_daemon(daemon) == 0


async def test_a_repeated_event_loop_error_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_last_logged", {})
    monkeypatch.setattr(logs, "_left_out", {})
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    try:
        with caplog.at_level(logging.INFO, logger="lts_server"):
            for _ in range(10_000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
    finally:
        loop.set_exception_handler(None)
    lines = [r for r in caplog.records if r.getMessage() == "asyncio.error"]
    assert len(lines) == 1 and "Too many open files" in lines[0].fields["error"]
