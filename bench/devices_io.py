"""What one handshake costs a daemon on the states bench/devices.py kept: CPU and I/O per handshake.

    .venv/bin/python bench/devices_io.py --keep /tmp/devbench/10m [--devices 10000000] [--mode refresh]

For the big state and the 10,000-device one in --keep (built by `bench/devices.py --keep DIR`, SQLite), one
daemon at a time: a warm-up wrk round, then a measured one; per handshake, the daemon's user and system CPU
(/proc/PID/stat) and its I/O (/proc/PID/io: bytes and calls through read(2) and write(2), bytes the kernel
wrote to the disk for it). Refreshes cycle over the same 5,000 devices as bench/devices.py. The figures
say where the big state's handshakes differ from the small one's (docs/design.md, "Ten million devices
against ten thousand").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import devices  # noqa: E402  (bench/devices.py)
from common import TICK_US  # noqa: E402

IO = ("rchar", "syscr", "wchar", "syscw", "write_bytes")


def sample(pid: int) -> dict[str, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"user": int(fields[11]) * TICK_US, "system": int(fields[12]) * TICK_US,
            **{k: float(io[k]) for k in IO}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", type=Path, required=True, help="the folder bench/devices.py --keep built")
    p.add_argument("--devices", type=int, default=10_000_000)
    p.add_argument("--mode", choices=("refresh", "new"), default="refresh")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    args = p.parse_args()
    pub = args.keep / "vendor" / "vendor.pub"
    print(f"per {args.mode} handshake, wrk -c{args.connections} -d{args.duration}s after a warm-up round:")
    print(f"  {'state':>12} {'req/s':>7} {'user us':>8} {'sys us':>7} {'read B':>8} {'reads':>6} {'written B':>10}"
          f" {'writes':>7} {'disk B':>8}")
    for n in (args.devices, devices.SMALL):
        state = devices.State(f"sqlite {n:,}", args.keep / f"sqlite-{n}", n)
        if not (state.folder / "built").exists():
            raise SystemExit(f"{state.folder} is not a state bench/devices.py --keep built")
        script = args.keep / f"io-{args.mode}-{n}.lua"
        script.write_text(devices.lua_refresh(devices.refreshed_devices(n)) if args.mode == "refresh"
                          else devices.lua_new(devices.CODE_OF[devices.ITEMS[0]]))
        devices.start(state, pub)
        try:
            assert state.proc is not None
            devices.run_wrk(state.port, script, args.duration, args.connections, f"io-warm-{os.getpid()}")
            before = sample(state.proc.pid)
            result = devices.run_wrk(state.port, script, args.duration, args.connections, f"io-{os.getpid()}")
            after = sample(state.proc.pid)
        finally:
            devices.stop(state)
        per = {k: (after[k] - before[k]) / max(1, result["requests"]) for k in after}
        print(f"  {n:>12,} {result['rps']:7.0f} {per['user']:8.0f} {per['system']:7.0f} {per['rchar']:8.0f}"
              f" {per['syscr']:6.1f} {per['wchar']:10.0f} {per['syscw']:7.1f} {per['write_bytes']:8.0f}")


if __name__ == "__main__":
    main()
