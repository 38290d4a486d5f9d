"""A TCP proxy that adds latency: every byte from a client reaches the server `delay_ms` later.

    python bench/pgproxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Stands in for `tc qdisc ... netem delay` (this machine's kernel has no netem,
and changing loopback's queueing would delay other engineers' runs too): a
node's every round trip to PostgreSQL pays DELAY_MS more, as if the database
were across a network. Order is kept per connection (one timer per direction,
a queue of what is due). asyncio's timers have millisecond granularity, so the
delay a round trip sees is DELAY_MS to DELAY_MS + 1; run.py measures it
(`round trip ... through the proxy`) and prints it next to the results.
Prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import collections
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    due: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = asyncio.Event()

    async def send() -> None:
        while True:
            await ready.wait()
            while due:
                at, data = due[0]
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                due.popleft()
                if not data:
                    writer.close()
                    return
                writer.write(data)
            ready.clear()
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(1 << 16)
            due.append((loop.time() + delay, data))
            ready.set()
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.close()


async def main(listen: int, target: int, delay_ms: float) -> None:
    delay = delay_ms / 1000

    async def serve(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(pipe(c_reader, s_writer, delay), pipe(s_reader, c_writer, 0.0),
                             return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
