"""server.workers > 1: a supervisor and N worker processes sharing the listening port.

On PostgreSQL each worker is a complete server (a node of the cluster) bound
with SO_REUSEPORT, so the kernel spreads connections over them and one
machine uses all its cores. On SQLite the workers are front processes
(lts_server/front.py) in front of one more process, the writer
(lts_server/writer.py), which owns the database: it is started first, and
the fronts once it listens. The supervisor tells systemd it is ready once
every process listens, passes SIGHUP on, restarts a process that dies, and
stops them all on SIGTERM (the fronts first, so that what they have in
flight is answered by the writer).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

import lts_server
from lts_server import logs
from lts_server.config import Config
from lts_server.sdnotify import Notifier, watchdog

READY_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1
RESTART_PAUSE = 1.0
# A worker must not talk to systemd itself: the supervisor is the service's main process.
PRIVATE = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Supervisor:
    def __init__(self, config_path: str, cfg: Config) -> None:
        self.config_path = config_path
        self.count = cfg.server.workers
        # SQLite: process 0 is the writer behind the N front processes.
        self.has_writer = cfg.storage.backend == "sqlite"
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.stopping = False
        # Once every process has listened, one that dies is restarted, even if it dies starting again.
        self.started = False
        self.env = {k: v for k, v in os.environ.items() if k not in PRIVATE}

    async def spawn(self, worker: int) -> None:
        self.ready[worker] = asyncio.Event()
        role = ["--worker", str(worker)] if worker else ["--writer"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lts_server", "--config", self.config_path, *role,
            stdout=asyncio.subprocess.PIPE, env=self.env, preexec_fn=_die_with_parent)
        self.procs[worker] = proc
        asyncio.create_task(self._watch(worker, proc), name=f"worker-{worker}")

    async def _watch(self, worker: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            text = line.decode(errors="replace").rstrip()
            print(f"[worker {worker}] {text}" if worker else f"[writer] {text}", flush=True)
            if "listening on" in text:
                self.ready[worker].set()
        code = await proc.wait()
        if self.stopping:
            return
        logs.event("workers.exited", logs.logging.ERROR, worker=worker, code=code, restart_in=RESTART_PAUSE)
        if not self.started:
            self.ready[worker].set()  # it died starting: let start() see it
            return
        await asyncio.sleep(RESTART_PAUSE)
        if not self.stopping:
            await self.spawn(worker)

    async def start(self) -> bool:
        try:
            if self.has_writer:
                await self.spawn(0)
                await asyncio.wait_for(self.ready[0].wait(), READY_TIMEOUT)
                if self.procs[0].returncode is not None:
                    return False
            for worker in range(1, self.count + 1):
                await self.spawn(worker)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.ready.values())), READY_TIMEOUT)
        except TimeoutError:
            return False
        self.started = all(p.returncode is None for p in self.procs.values())
        return self.started

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def stop(self) -> int:
        self.stopping = True
        fronts = [p for worker, p in self.procs.items() if worker]
        for proc in fronts:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(p.wait() for p in fronts))
        if (writer := self.procs.get(0)) is not None:
            if writer.returncode is None:
                writer.send_signal(signal.SIGTERM)
            codes.append(await writer.wait())
        return max(codes, default=0)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies, even by kill -9 (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def supervise(config_path: str, cfg: Config) -> int:
    notifier = Notifier()
    supervisor = Supervisor(config_path, cfg)
    if not await supervisor.start():
        await supervisor.stop()
        print("lts-server: cannot start: a worker did not come up (see its lines above)", file=sys.stderr)
        return 1
    behind = " in front of one writer" if supervisor.has_writer else ""
    print(f"lts-server {lts_server.__version__}: {supervisor.count} workers{behind} listening on port "
          f"{cfg.server.port}", flush=True)
    notifier.notify("READY=1", f"STATUS={supervisor.count} workers listening")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: supervisor.signal_all(signal.SIGHUP))
    pinger = loop.create_task(watchdog(notifier, stop)) if notifier.watchdog_interval else None
    await stop.wait()
    notifier.notify("STOPPING=1")
    if pinger:
        pinger.cancel()
    return 0 if await supervisor.stop() == 0 else 1
