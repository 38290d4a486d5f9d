"""Signs authorizations off the event loop, many per thread hop.

Ed25519 signing releases the GIL, so signatures made in a worker thread run
on another core while the event loop goes on serving requests. Requests that
ask in the same loop iteration (a committed batch resumes together) share one
hop to the thread.
"""

from __future__ import annotations

import asyncio
import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class BatchSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []

    async def sign(self, data: bytes) -> bytes:
        """The base64 signature of data."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((data, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().run_in_executor(None, self._sign_all, [d for d, _ in batch])
        task.add_done_callback(lambda t: self._deliver(t, batch))

    def _sign_all(self, items: list[bytes]) -> list[bytes]:
        return [base64.b64encode(self._key.sign(d)) for d in items]

    @staticmethod
    def _deliver(task: asyncio.Future[list[bytes]], batch: list[tuple[bytes, asyncio.Future[bytes]]]) -> None:
        error = task.exception()
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(task.result()[i])
