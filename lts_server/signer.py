"""Signs authorizations, many per loop iteration, off the event loop where a spare CPU is likely.

Requests that ask in the same loop iteration (a committed batch resumes
together) are signed together. Ed25519 signing releases the GIL (two
threads sign about twice as fast as one: bench/handshake/micro.py), so on a
thread the signatures run on another core while the loop serves requests,
if a core is free. The hop costs more CPU than the signatures it moves (a
futex wake-up there, the way back to the loop), so with two CPUs or fewer
per process of the daemon the batch is signed on the loop (`use_thread`
False): 4-30% more grants per second in all but one of the targets
measured on two cores (docs/design.md, "Signing on the loop or on a
thread").
"""

from __future__ import annotations

import asyncio
import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lts_server import cpus

# A signing thread only with more CPUs than this per process of the daemon.
THREAD_CPUS_PER_PROCESS = 2.0


def use_thread(workers: int, backend: str) -> bool:
    """Whether a daemon of `workers` (server.workers) on `backend` (storage.backend) signs on a thread: more
    than THREAD_CPUS_PER_PROCESS CPUs (affinity and cgroup quota) for each of its processes (the workers,
    and SQLite's writer beside several)."""
    processes = workers + (1 if backend == "sqlite" and workers > 1 else 0)
    return cpus.available() / processes > THREAD_CPUS_PER_PROCESS


class BatchSigner:
    def __init__(self, key: Ed25519PrivateKey, threaded: bool) -> None:
        self._key = key
        self.threaded = threaded
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
        loop = asyncio.get_running_loop()
        if self.threaded:
            task = loop.run_in_executor(None, self._sign_all, [d for d, _ in batch])
        else:
            task = loop.create_future()
            try:
                task.set_result(self._sign_all([d for d, _ in batch]))
            except Exception as e:  # every request of the batch gets the error, none waits for ever
                task.set_exception(e)
        if task.done():
            self._deliver(task, batch)
        else:
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
