"""The frames between front processes and the writer, and the two ends in one process: a full disk on the
writer answers 503 with Retry-After on every front and recovers by itself; a reply frame the front cannot
decode drops that connection, and the front reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from conftest import Vendor, free_port, item, license_spec, write_config
from lts_server import config as config_mod
from lts_server import writer
from lts_server.core.model import DeploymentType
from lts_server.front import Front, writer_gone
from lts_server.server import Server
from lts_server.store import StoreError, StoreFull
from lts_server.web import device
from lts_server.web.schemas import Authorization, HandshakeBody, SeatCount
from lts_server.writerwire import (HEADER, MAX_FRAME, Ask, BadFrame, Reply, decode_asks, decode_replies, frame,
                                   frame_length)

REQUEST = HandshakeBody(client_uuid="dev-1", product="barcode-reader", deployment_type=DeploymentType.BROWSER,
                        handshake_code="216998-P", version="2.1", instances=3, borrow_days=2)


def test_asks_and_replies_round_trip_with_their_ids() -> None:
    data = frame([Ask(1, REQUEST, "ab" * 32),
                  Ask(2, HandshakeBody(client_uuid="dev-2", product="p", deployment_type=DeploymentType.SERVER))])
    (length,) = HEADER.unpack(data[:HEADER.size])
    assert length == len(data) - HEADER.size == frame_length(data[:HEADER.size])
    asks = decode_asks(data[HEADER.size:])
    assert [a.id for a in asks] == [1, 2] and asks[0].request == REQUEST and asks[1].fingerprint is None
    auth = Authorization("a1", "s", "216998-P", "216998", "p1", "P", "barcode-reader", "browser", "per-device",
                         "dev-1", "2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z",
                         datetime(2026, 1, 1, 1, 2, 3, 456000, tzinfo=timezone.utc), seats=SeatCount(1, 10, 11, 10))
    replies = decode_replies(frame([Reply(2, 403, b'{"error":{}}'), Reply(1, 200, authorization=auth,
                                                                          report_key="k", binding=b',"b":1')])[4:])
    assert replies[0] == Reply(2, 403, b'{"error":{}}')
    # The front signs the bytes it encodes: the same as the writer's own encoding would be.
    assert msgspec.json.encode(replies[1].authorization) == msgspec.json.encode(auth)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x91\x01", b"\x91\x93\x01\xc0\xc0", b"\x92\x91\x01",
                                  msgspec.msgpack.encode([[1, {"clientUuid": 5}, None]]),
                                  msgspec.msgpack.encode({"id": 1})])
def test_what_is_not_a_list_of_asks_is_a_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_asks(body)
    with pytest.raises(BadFrame):
        decode_replies(body)


GOOD = {"clientUuid": "dev-1", "product": "p", "deploymentType": "server"}


@pytest.mark.parametrize("ask", [
    [1, {**GOOD, "clientUuid": ""}, None], [1, {**GOOD, "clientUuid": "x" * 129}, None],
    [1, {**GOOD, "clientUuid": "a/b"}, None], [1, {**GOOD, "instances": 0}, None],
    [1, {**GOOD, "instances": -1000}, None], [1, {**GOOD, "borrowDays": 366}, None],
    [1, {**GOOD, "version": "2\x00"}, None], [1, {**GOOD, "sessionPassword": "pw\x00"}, None],
    [1, {**GOOD, "waitSeconds": 0}, None], [1, {**GOOD, "deviceFingerprint": "f"}, None],
    [1, {**GOOD, "unknown": 1}, None], [1, GOOD, "AB" * 32], [1, GOOD, "ab"], [-1, GOOD, None], [2**64 - 1, GOOD, None],
])
def test_an_ask_the_http_edge_would_have_refused_is_a_bad_frame(ask: list[Any]) -> None:
    with pytest.raises(BadFrame):
        decode_asks(msgspec.msgpack.encode([[0, GOOD, None], ask]))
    assert decode_asks(msgspec.msgpack.encode([[0, GOOD, "ab" * 32]]))[0].request.client_uuid == "dev-1"


@pytest.mark.parametrize("field", [f for f in msgspec.structs.fields(HandshakeBody) if "str" in str(f.type)])
def test_a_nul_in_any_text_field_of_an_ask_is_a_bad_frame(field: msgspec.structs.FieldInfo) -> None:
    ask = [1, {**GOOD, field.encode_name: "a\x00b"}, None]
    with pytest.raises(BadFrame):
        decode_asks(msgspec.msgpack.encode([ask]))


def test_the_writer_decides_the_request_the_http_edge_would_have_made() -> None:
    full = HandshakeBody(client_uuid="dev-1", product="p", deployment_type=DeploymentType.SERVER,
                         handshake_code="216998-P", organization_id="216998", session_password="pw", version="2.1",
                         edition="pro", domain="a.example.com", app_id="app", process_name="proc", instances=3,
                         protocol_version=2, borrow_days=4)
    for body in (full, REQUEST, HandshakeBody(client_uuid="d", product="p", deployment_type=DeploymentType.BROWSER)):
        (ask,) = decode_asks(frame([Ask(1, body)])[HEADER.size:])
        assert ask.decided() == device.to_request(body)


def test_while_the_writer_restarts_only_a_change_is_said_to_be_in_doubt() -> None:
    for method, in_doubt in (("POST", True), ("DELETE", True), ("GET", False), ("HEAD", False)):
        answer = writer_gone(method)
        assert (answer.status, answer.headers["Retry-After"]) == (503, "1")
        assert ("may or may not have been recorded" in answer.text) is in_doubt, (method, answer.text)


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    assert frame_length(HEADER.pack(MAX_FRAME)) == MAX_FRAME
    with pytest.raises(BadFrame, match="at most"):
        frame_length(HEADER.pack(MAX_FRAME + 1))


def test_a_state_folder_too_deep_for_a_socket_address_is_reached_through_its_descriptor(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    address = writer.socket_path(deep, writer.FRAMES)
    assert address.startswith("/proc/self/fd/") and len(address) < writer.MAX_ADDRESS
    assert writer.socket_path(tmp_path, writer.FRAMES) == str(tmp_path / writer.FRAMES)


@dataclass
class Split:
    server: Server
    fronts: list[Front]
    url: str


@pytest.fixture
async def split(tmp_path: Path, vendor: Vendor) -> AsyncIterator[Split]:
    """A writer and two fronts on one port, in this process."""
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / "p.lic").write_bytes(vendor.issue(license_spec("P", items=[item("p1", quantity=50)])))
    port = free_port()
    cfg = config_mod.load(write_config(tmp_path, vendor, server={"workers": 2, "port": port}), environ={})
    server = Server(cfg, fronted=True)
    await server.start()
    fronts = [Front(cfg, n) for n in (1, 2)]
    for front in fronts:
        await front.start()
    await asyncio.sleep(0.2)  # the links connect
    yield Split(server, fronts, f"http://127.0.0.1:{port}")
    for front in fronts:
        await front.stop()
    await server.stop()


async def _handshakes(url: str, tag: str, count: int) -> list[tuple[int, str, Any]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async def one(n: int) -> tuple[int, str, Any]:
            body = {"handshakeCode": "216998-P", "clientUuid": f"{tag}-{n}", "product": "barcode-reader",
                    "deploymentType": "browser"}
            async with s.post(f"{url}/api/v1/handshake", json=body) as resp:
                return resp.status, resp.headers.get("Retry-After", ""), await resp.json()
        return await asyncio.gather(*(one(n) for n in range(count)))


async def test_a_full_disk_on_the_writer_is_503_on_every_front_and_recovers(split: Split, monkeypatch) -> None:
    asked = {1: 0, 2: 0}
    for front in split.fronts:
        real_ask = front.link.ask

        async def counting(request: HandshakeBody, fingerprint: str | None, _n: int = front.worker,
                           _ask: Any = real_ask) -> Reply:
            asked[_n] += 1
            return await _ask(request, fingerprint)

        monkeypatch.setattr(front.link, "ask", counting)
    store = split.server.services.store
    real_write = store.write

    async def full(batch, pipeline=None):  # noqa: ANN001, ANN202
        raise StoreFull("database /x: database or disk is full; free disk space, then retry")

    monkeypatch.setattr(store, "write", full)
    answers = await _handshakes(split.url, "full", 40)
    assert all(a[:2] == (503, "30") and "full" in a[2]["error"]["message"] for a in answers), answers
    assert asked[1] and asked[2], asked  # both fronts were asked, both answered 503
    monkeypatch.setattr(store, "write", real_write)
    answers = await _handshakes(split.url, "after", 40)
    assert [a[0] for a in answers] == [200] * 40
    assert split.server.services.ledger.statuses["p1"].seats_used == 40


async def test_a_reply_frame_the_front_cannot_decode_drops_the_connection_and_it_reconnects(
        split: Split, monkeypatch) -> None:
    broken = {"done": False}
    real_frame = writer.frame

    def garbled(messages: list[Reply]) -> bytes:
        if not broken["done"]:
            broken["done"] = True
            return HEADER.pack(3) + b"\xc1\xc1\xc1"
        return real_frame(messages)

    monkeypatch.setattr(writer, "frame", garbled)
    first = await _handshakes(split.url, "one", 1)
    assert first[0][:2] == (503, "1")  # the ask was decided (and may hold a seat): the device retries
    for _ in range(50):
        answers = await _handshakes(split.url, "two", 10)
        if all(a[0] == 200 for a in answers):
            break
        await asyncio.sleep(0.05)
    assert [a[0] for a in answers] == [200] * 10
    again = await _handshakes(split.url, "one", 1)
    assert again[0][0] == 200 and again[0][2]["authorization"]["seats"]["used"] == 11


async def test_a_second_writer_on_the_same_state_folder_is_refused(split: Split) -> None:
    second = Server(split.server.config, fronted=True)
    with pytest.raises(StoreError, match="another writer process serves"):
        await second.start()
    await second.stop()
    answers = await _handshakes(split.url, "still", 5)  # the first writer still has its sockets
    assert [a[0] for a in answers] == [200] * 5
