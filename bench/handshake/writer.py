"""The SQLite writer's own CPU per grant, without HTTP, wrk or front processes (issue 23 item 2):

    .venv/bin/python bench/handshake/writer.py [--grants 40000] [--window 256] [--rounds 5] [--baseline DIR]

A writer process (`python -m lts_server --writer`, as the supervisor of server.workers > 1 starts it) is
driven over its frame socket by this process, as front processes would: `--window` asks in flight, each
frame carrying what is ready. Per round: utime+stime of the writer (every thread of it, from /proc) over the
round and until it is idle again (its statistics rollups folded), divided by its grants, for new devices (each ask a device not seen before) and for refreshes (5,000
seated devices asking again). With --baseline DIR a second writer runs from that source tree, and the
rounds alternate between the two: a change and its parent side by side on this shared machine. Prints the
median of the rounds; the issue's budget for the writer is 100 us a grant.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import cpu_us, device_item, free_port, license_file, vendor_key, write_config  # noqa: E402

from lts_server.core.model import DeploymentType  # noqa: E402
from lts_server.web.schemas import HandshakeBody  # noqa: E402
from lts_server.writerwire import HEADER, Ask, decode_replies, frame  # noqa: E402

SEATED = 5_000


@dataclass
class Writer:
    name: str
    proc: subprocess.Popen[bytes]
    socket: Path
    rounds: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # mode -> (us per grant, grants/s)


def start_writer(name: str, folder: Path, pub: Path, lic: bytes, tree: Path | None) -> Writer:
    cfg = write_config(folder, pub, free_port(), workers=2)
    (folder / "import" / "bench.lic").write_bytes(lic)
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    proc = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg), "--writer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = folder / "state" / "writer.sock"
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name}: the writer did not start (exit {proc.poll()})")
        time.sleep(0.1)
    return Writer(name, proc, sock)


def request(client: str) -> HandshakeBody:
    """An ask's handshake, as a front sends it: the HTTP body's schema (the writer checks it)."""
    return HandshakeBody(client_uuid=client, product="barcode-reader", deployment_type=DeploymentType.BROWSER,
                         handshake_code="216998-BENCH")


async def drive(writer: Writer, clients: itertools.cycle[str] | itertools.count[int], grants: int,
                window: int, prefix: str) -> tuple[int, int]:
    """`grants` asks, `window` in flight; (granted, other answers)."""
    reader, stream = await asyncio.open_unix_connection(str(writer.socket))
    ids = itertools.count(1)
    sent = granted = other = 0

    def send(n: int) -> None:
        nonlocal sent
        n = min(n, grants - sent)
        if n > 0:
            stream.write(frame([Ask(next(ids), request(f"{prefix}{next(clients)}")) for _ in range(n)]))
            sent += n

    async def read() -> None:
        nonlocal granted, other
        while granted + other < grants:
            length = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
            replies = decode_replies(await reader.readexactly(length))
            for reply in replies:
                if reply.status == 200:
                    granted += 1
                else:
                    other += 1
            send(len(replies))

    task = asyncio.create_task(read())  # a writer that closes the connection fails the round, not hangs it
    send(window)
    await task
    stream.close()
    return granted, other


async def settle(writer: Writer) -> None:
    """Until the writer is idle: the statistics rollups of the round's events (folded every second, in pages)
    are part of what its grants cost, and the next round does not pay for them."""
    deadline = time.monotonic() + 30
    last = cpu_us([writer.proc.pid])
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = cpu_us([writer.proc.pid])
        quiet = quiet + 1 if now - last < 20_000 else 0  # under 4% of a core: its timers, nothing left to fold
        last = now


async def measure(writer: Writer, mode: str, grants: int, window: int, round_no: int) -> None:
    clients: itertools.cycle[str] | itertools.count[int]
    if mode == "new":
        clients, prefix = itertools.count(), f"new-{round_no}-"
    else:
        clients, prefix = itertools.cycle(str(i) for i in range(SEATED)), "seated-"
    before, started = cpu_us([writer.proc.pid]), time.perf_counter()
    granted, other = await drive(writer, clients, grants, window, prefix)
    elapsed = time.perf_counter() - started
    await settle(writer)
    if other:
        raise SystemExit(f"{writer.name} {mode}: {other} asks were not granted")
    writer.rounds.setdefault(mode, []).append(((cpu_us([writer.proc.pid]) - before) / granted, granted / elapsed))


async def bench(args: argparse.Namespace, folder: Path) -> None:
    key, pub = vendor_key(folder / "vendor")
    lic = license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)])
    trees = [("writer", None)] + ([("writer base", Path(args.baseline).resolve())] if args.baseline else [])
    writers = [start_writer(name, folder / name.replace(" ", "-"), pub, lic, tree) for name, tree in trees]
    try:
        for w in writers:  # the seated devices, and a first load so caches and the database are warm
            await drive(w, itertools.cycle(str(i) for i in range(SEATED)), SEATED, args.window, "seated-")
            await drive(w, itertools.count(), args.grants // 4, args.window, "warm-")
        for n in range(args.rounds):
            for mode in args.modes.split(","):
                for w in writers if n % 2 == 0 else writers[::-1]:
                    await measure(w, mode, args.grants, args.window, n)
    finally:
        for w in writers:
            w.proc.terminate()
            w.proc.wait()
    print(f"writer CPU per grant (utime+stime of the writer process / grants), {args.rounds} alternating rounds of"
          f" {args.grants} asks, {args.window} in flight, medians:")
    for mode in args.modes.split(","):
        for w in writers:
            us = statistics.median(r[0] for r in w.rounds[mode])
            rate = statistics.median(r[1] for r in w.rounds[mode])
            print(f"  {mode:8} {w.name:12} {us:7.1f} us/grant  {rate:8.0f} grants/s"
                  f"  (rounds: {', '.join(f'{r[0]:.0f}' for r in w.rounds[mode])})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grants", type=int, default=40_000, help="asks per round and mode")
    p.add_argument("--window", type=int, default=256, help="asks in flight (a few fronts' worth)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default="new,refresh")
    p.add_argument("--baseline", help="a source tree whose writer runs side by side, rounds alternated")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
