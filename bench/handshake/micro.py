"""Microbenchmarks of the handshake hot path's parts, in one process, without HTTP or load.

    .venv/bin/python bench/handshake/micro.py

Each figure is the median of 5 runs, in microseconds of one core:
- routing: a device POST through the middleware stack vs the device-first path (web/app.py), to a
  handler that answers at once: what the middlewares cost on their own;
- the duplicate-key check of a handshake body (web/device.py); a report key; an event's JSON detail;
- SQLite: write_batch per grant (new devices; refreshes of 1,600 devices within the slice of their grant,
  and an hour after their last) with synchronous=OFF (the work, not the flush), and folding the events
  into the rollups per handshake;
- Ed25519: one signature; two threads signing at once vs one (does signing release the GIL?);
- trust (issue 20): the usage chain per grant (two events linked: canonical lines and SHA-256), write_batch
  with and without the chain side by side, and the answer's new parts (refreshBy, the binding's bytes).
These are the pieces the bench's CPU per grant is made of; see docs/design.md.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import shutil
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import make_mocked_request  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from lts_server import bindings, reportkeys, usagechain  # noqa: E402
from lts_server.core.times import iso, utcnow  # noqa: E402
from lts_server.store.sql_trust import BindingRow  # noqa: E402
from lts_server.metrics import Metrics  # noqa: E402
from lts_server.store import WriteBatch, sql  # noqa: E402
from lts_server.store.sqlite import SQLiteStore, drive  # noqa: E402
from lts_server.web import app as app_mod  # noqa: E402
from lts_server.web import device  # noqa: E402
from lts_server.web.services import SERVICES  # noqa: E402

from batches import ITEM, ITEM_ROW, QUANTITY, grants  # noqa: E402  (bench/handshake/batches.py)

BODY = (b'{"handshakeCode":"216998-BENCH","clientUuid":"bench-0-1732870000-1-12345","product":"barcode-reader",'
        b'"deploymentType":"browser"}')
ANSWER = b'{"authorization":{}}'


def median_us(fn: Callable[[], object], number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def routing() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=ANSWER, headers=device.JSON)

    real = device.handshake
    device.handshake = answer  # type: ignore[assignment]
    try:
        app = app_mod.create_app(SimpleNamespace(metrics=Metrics()))  # type: ignore[arg-type]
    finally:
        device.handshake = real  # type: ignore[assignment]
    app.freeze()  # as AppRunner does: only a frozen application runs its middlewares
    stack = web.Application._handle.__get__(app)  # what the override replaced: the router and the middlewares
    loop = asyncio.new_event_loop()

    request = make_mocked_request("POST", "/api/v1/handshake", headers={"Content-Type": "application/json"},
                                  app=app, loop=loop)

    def through(handle: Callable) -> Callable[[], None]:  # type: ignore[type-arg]
        def one() -> None:  # nothing awaits for real: the coroutine finishes at its first step
            coro = handle(request)
            try:
                coro.send(None)
            except StopIteration as done:
                assert done.value.status == 200
            else:
                raise AssertionError("the request waited for something")
        return one

    assert app[SERVICES]
    base = median_us(through(lambda r: answer(r)), 20000)
    print(f"routing: middleware stack {median_us(through(stack), 20000) - base:.1f} us,"
          f" device-first path {median_us(through(app._handle), 20000) - base:.1f} us"
          f" (beyond the handler; {base:.1f} us for a mocked request and the handler alone)")
    loop.close()


def duplicate_keys() -> None:
    print(f"duplicate-key check of a handshake body: {median_us(lambda: device.check_json_text(BODY), 50000):.2f} us")


def small_parts() -> None:
    secret = b"s" * 32
    detail = {"expiresAt": "2027-11-29T11:00:00+00:00"}
    print(f"report key (keyed HMAC, one of two per grant): {median_us(lambda: reportkeys.report_key(secret, 'A' * 24), 50000):.2f} us;"
          f" an event's JSON detail: {median_us(lambda: sql._compact_json(detail), 50000):.2f} us")


MODES = ("new devices", "refresh", "hourly refresh")


def sqlite_write(g: int = 16, batches: int = 300, chained: bool = False) -> None:
    rounds = _sqlite_rounds(g, batches, chained)
    for mode in MODES:
        per_grant, per_event = next(rounds)(mode)
        print(f"sqlite {mode}{' (chained)' if chained else ''}: write_batch"
              f" {per_grant:.1f} us per grant (batches of {g}); rollups {per_event:.1f} us per handshake event")


def chain_write(g: int = 16, batches: int = 150, rounds: int = 9) -> None:
    """write_batch with the chain and without, in alternating rounds on two databases (this machine's noise is
    +-10 us between runs of the same code): the medians and the median of the rounds' differences."""
    plain, chained = _sqlite_rounds(g, batches, False), _sqlite_rounds(g, batches, True)
    first_plain, first_chained = next(plain), next(chained)
    for mode in MODES:
        pairs = []
        for _ in range(rounds):
            a = first_plain(mode)[0]
            b = first_chained(mode)[0]
            pairs.append((a, b))
        base = statistics.median(a for a, _ in pairs)
        with_chain = statistics.median(b for _, b in pairs)
        delta = statistics.median(b - a for a, b in pairs)
        print(f"sqlite {mode}: write_batch {base:.1f} us per grant unchained,"
              f" {with_chain:.1f} chained: the chain costs {delta:+.1f} us per grant (median of {rounds} pairs)")


def _sqlite_rounds(g: int, batches: int, chained: bool):  # noqa: ANN202 - a generator of round runners
    folder = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, folder, True)  # the rounds run until the process ends
    store = SQLiteStore(folder / "bench.sqlite3")
    asyncio.run(store.open())
    asyncio.run(store.close())
    import sqlite3
    con = sqlite3.connect(folder / "bench.sqlite3", isolation_level=None)
    con.execute("PRAGMA foreign_keys = OFF")
    con.execute("PRAGMA synchronous = OFF")
    con.execute(ITEM_ROW, (ITEM, QUANTITY))
    now = utcnow()

    def run(proc: sql.Procedure[object]) -> object:
        con.execute("BEGIN IMMEDIATE")
        result = drive(con, proc)
        con.commit()
        return result

    chain = run(usagechain.claim("bench/0", "0feb6cf8-698d-47b4-8f64-dc3580f5a7a9", 0)) if chained else None

    def write(b: WriteBatch) -> None:
        nonlocal chain
        head = run(sql.write_batch(b, chain))  # type: ignore[arg-type]
        if head is not None:
            chain = head

    seeded = 100  # batches of devices that refresh: 1,600 devices

    def batch(k: int, refresh: bool, hours: int = 0) -> WriteBatch:
        return grants(now + timedelta(hours=hours),
                      (f"dev-{k % seeded if refresh else k + seeded}-{j}" for j in range(g)), refresh)

    for k in range(seeded):
        write(batch(k - seeded, False))
    while run(sql.roll_up(sql.SEQUENTIAL, {}, 500)).processed:  # type: ignore[attr-defined]
        pass
    made = [0]
    hours = [0]

    def one_round(mode: str) -> tuple[float, float]:
        """mode "new devices"; "refresh": the seeded devices again within the 3-minute slice of their grant;
        "hourly refresh": each an hour after its last handshake (a fleet handshaking hourly)."""
        if mode == "hourly refresh":
            todo = [batch(k, True, hours[0] + 1 + k // seeded) for k in range(batches)]
            hours[0] += 1 + batches // seeded
        else:
            todo = [batch(made[0] + k, mode == "refresh") for k in range(batches)]
            made[0] += batches
        started = time.process_time()
        for b in todo:
            write(b)
        per_grant = (time.process_time() - started) / (batches * g) * 1e6
        started = time.process_time()
        folded = 0
        while done := run(sql.roll_up(sql.SEQUENTIAL, {ITEM: ("per-device", QUANTITY)}, 500)).processed:  # type: ignore[attr-defined]
            folded += done
        return per_grant, (time.process_time() - started) / max(1, folded) * 1e6

    while True:
        yield one_round


def signing() -> None:
    key = Ed25519PrivateKey.generate()
    data = b"x" * 560
    one = median_us(lambda: key.sign(data), 3000)
    count = 3000

    def work() -> None:
        for _ in range(count):
            key.sign(data)

    started = time.perf_counter()
    work()
    alone = time.perf_counter() - started
    threads = [threading.Thread(target=work) for _ in range(2)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = time.perf_counter() - started
    print(f"Ed25519 sign: {one:.1f} us; two threads sign {2 * alone / both:.2f}x as fast as one")


def trust_parts() -> None:
    """What issue 20 adds per grant outside the database: link two events onto the chain (on the database
    thread), and the answer's refreshBy and binding bytes (on the event loop), each against its absence."""
    import msgspec

    from lts_server.web import device as device_mod

    now = utcnow()
    head = usagechain.Head(1, "bench/0", 1000, b"h" * 32)
    rows = [(1764000000000, "seat.granted", "216998-BENCH", "BENCH-1", "bench-0-1732870000-1-12345", None, None, None,
             '{"expiresAt":"2027-11-29T11:00:00+00:00"}', None, None),
            (1764000000000, "handshake", "216998-BENCH", "BENCH-1", "bench-0-1732870000-1-12345", "barcode-reader",
             "browser", 0, None, None, None)]
    chain_us = median_us(lambda: usagechain.linked(head, rows), 20000)
    statement = base64.b64encode(b"x" * 600).decode()
    bound = bindings.item_binding(BindingRow("L", 1, "f22983345d3afc83", statement, "s" * 88, ("BENCH-1",)))
    auth = b"a" * 560
    expires = now + timedelta(days=365)

    class With(msgspec.Struct):
        expires_at: str
        refresh_by: object
        binding_sha256: str | None

    class Without(msgspec.Struct):
        expires_at: str

    encode = msgspec.json.Encoder().encode

    def new(binding: bindings.ItemBinding | None) -> bytes:
        refresh, _ = device_mod._terms(60.0, 0.0)
        body = encode(With(iso(expires), min(expires, now + refresh), binding.sha256 if binding else None))
        return b'{"authorization":%s,"signature":"%s","keyId":"%s","reportKey":"%s"%s}' % (
            auth + body, b"s" * 88, b"k" * 16, b"r" * 44, binding.answer_member if binding is not None else b"")

    def old() -> bytes:
        body = encode(Without(iso(expires)))
        return b'{"authorization":%s,"signature":"%s","keyId":"%s","reportKey":"%s"}' % (
            auth + body, b"s" * 88, b"k" * 16, b"r" * 44)

    base = median_us(old, 50000)
    print(f"trust: the chain links a grant's two events in {chain_us:.2f} us (database thread); refreshBy, "
          f"bindingSha256 and the binding's bytes add {median_us(lambda: new(bound), 50000) - base:.2f} us to the "
          f"answer (event loop; {median_us(lambda: new(None), 50000) - base:.2f} us without a binding)")


if __name__ == "__main__":
    routing()
    duplicate_keys()
    small_parts()
    sqlite_write()
    chain_write()
    trust_parts()
    signing()
