"""The systemd notification protocol: a datagram to $NOTIFY_SOCKET, if any."""

from __future__ import annotations

import asyncio
import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address or None
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(watchdog_usec) / 2_000_000 if watchdog_usec.isdigit() and mine else None
        )

    def notify(self, *lines: str) -> bool:
        if not self._address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self._address)
            except OSError:
                return False
        return True


async def watchdog(notifier: Notifier, stop: asyncio.Event) -> None:
    """WATCHDOG=1 at half the interval systemd asked for, until stop is set."""
    assert notifier.watchdog_interval is not None
    while not stop.is_set():
        notifier.notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), timeout=notifier.watchdog_interval)
        except TimeoutError:
            pass
