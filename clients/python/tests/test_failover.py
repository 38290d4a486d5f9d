"""The client remembers servers that failed: a hung first server costs one timeout, not one per call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from lts_client import LtsClient, ServerUnavailable
from lts_client.failover import FIRST_BACKOFF, MAX_BACKOFF, Failover
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakeserver import REQUEST, FakeServer, start  # noqa: F401 - start is a fixture


@pytest.fixture
async def hung() -> AsyncIterator[str]:
    """A server that accepts connections and reads nothing, ever: what a SIGSTOPped process looks like."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_hung_first_server_costs_one_timeout_then_the_next_answers_at_once(hung: str, start: Any) -> None:
    fake = await start()
    good = fake.url
    async with LtsClient([hung, good], public_keys={fake.key_id: fake.public_b64}, timeout=1.5) as client:
        started = time.monotonic()
        first = await client.handshake(**REQUEST)
        first_took = time.monotonic() - started
        started = time.monotonic()
        second = await client.handshake(**REQUEST)
        second_took = time.monotonic() - started
    assert first.server == second.server == good
    assert first_took >= 1.4  # the first call waited for the hung server once
    assert second_took < 1.0, second_took  # the second asked the answering server first


async def test_a_backed_off_server_is_asked_first_again_once_its_backoff_ends(hung: str, start: Any) -> None:
    fake = await start()
    good = fake.url
    clock = Clock()
    async with LtsClient([hung, good], public_keys={fake.key_id: fake.public_b64}, timeout=0.5) as client:
        client.failover.clock = clock
        await client.handshake(**REQUEST)
        assert client.failover.order() == [good, hung]
        clock.now += FIRST_BACKOFF
        assert client.failover.order() == [hung, good]  # its place back: it may have recovered


def test_backoff_doubles_with_each_failure_in_a_row_up_to_the_cap_and_an_answer_clears_it() -> None:
    clock = Clock()
    failover = Failover(["a", "b", "c"], clock=clock)
    assert failover.order() == ["a", "b", "c"]
    waits = []
    for _ in range(12):
        failover.failed("a")
        waits.append(failover.backoff("a"))
    assert waits[:4] == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF, 8 * FIRST_BACKOFF]
    assert max(waits) == waits[-1] == MAX_BACKOFF
    assert failover.order() == ["b", "c", "a"]
    failover.answered("a")
    assert failover.backoff("a") == 0 and failover.order() == ["a", "b", "c"]


def test_when_every_server_is_backed_off_all_are_still_tried_soonest_back_first() -> None:
    clock = Clock()
    failover = Failover(["a", "b", "c"], clock=clock)
    failover.failed("a")
    failover.failed("a")  # 4 s
    failover.failed("b")  # 2 s
    failover.failed("c")
    clock.now += 0.5
    failover.failed("c")
    failover.failed("c")  # 8 s from now
    assert failover.order() == ["b", "a", "c"]


async def test_a_failing_server_for_usage_reports_is_asked_after_the_others(start: Any) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 500, "message": "boom"}}, status=500)

    async def counted(request: web.Request) -> web.Response:
        return web.json_response({"accepted": 0})

    calls: list[str] = []

    def tracking(name: str, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.Response:
            calls.append(name)
            return await handler(request)
        return wrapped

    key = Ed25519PrivateKey.generate()
    first = await start(FakeServer(key=key), tracking("first", broken))
    second = await start(FakeServer(key=key), tracking("second", counted))
    async with LtsClient([first.url, second.url], public_keys={first.key_id: first.public_b64}) as client:
        auth = await client.handshake(**REQUEST)
        report = {"handshakeCode": "216998-L1", "clientUuid": "dev-1", "records": []}
        await client.report_usage(report, auth)
        await client.report_usage(report, auth)
    assert calls == ["first", "second", "second"]


async def test_a_server_that_never_answers_is_named_with_the_time_waited(hung: str) -> None:
    """ServerUnavailable says what happened (aiohttp's timeout carries no message); a wait for a seat
    (waitSeconds) adds its seconds to the timeout."""
    async with LtsClient([hung], timeout=0.5) as client:
        with pytest.raises(ServerUnavailable) as unavailable:
            await client.handshake(**REQUEST)
        assert str(unavailable.value) == f"{hung}: timed out after 0.5 s"
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as unavailable:
            await client.handshake(**REQUEST, wait_seconds=1)
        assert time.monotonic() - started >= 1.4
        assert str(unavailable.value) == f"{hung}: timed out after 1.5 s"
