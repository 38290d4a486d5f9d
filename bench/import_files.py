"""Import benchmark: 1,000 license files from a cold start, and files/s on a live directory.

    .venv/bin/python bench/import_files.py [--files 1000] [--runs 3]

Each file is verified (Ed25519), checked and committed in its own durable
transaction, as in production. Prints the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from common import device_item, license_file, median, vendor_key, write_config

from lts_server import config as config_mod
from lts_server.server import Server


def make_files(key, count: int, prefix: str) -> list[tuple[str, bytes]]:  # noqa: ANN001
    return [
        (f"{prefix}{n:05d}.lic",
         license_file(key, f"{prefix}{n}", [device_item(f"{prefix}{n}-{i}", 10 + i) for i in range(1 + n % 3)]))
        for n in range(count)
    ]


async def cold_start(count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        cfg_path = write_config(folder, pub, port=0)
        for name, data in make_files(key, count, "C"):
            (folder / "import" / name).write_bytes(data)
        server = Server(config_mod.load(cfg_path, environ={}))
        started = time.perf_counter()
        await server.start()
        elapsed = time.perf_counter() - started
        assert server.services is not None
        assert len(server.services.ledger.licenses) == count
        await server.stop()
        return elapsed


async def live_directory(count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        server = Server(config_mod.load(write_config(folder, pub, port=0, watch=True), environ={}))
        await server.start()
        assert server.services is not None
        ledger = server.services.ledger
        files = make_files(key, count, "D")
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        for name, data in files:
            tmp_path = folder / "import" / f".{name}.tmp"
            tmp_path.write_bytes(data)
            tmp_path.rename(folder / "import" / name)
        while len(ledger.licenses) < count:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        await server.stop()
        return count / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    colds = [asyncio.run(cold_start(args.files)) for _ in range(args.runs)]
    lives = [asyncio.run(live_directory(args.files)) for _ in range(args.runs)]
    print(f"cold start, {args.files} files: median {median(colds):.2f} s "
          f"({args.files / median(colds):.0f} files/s; runs: {', '.join(f'{c:.2f}' for c in colds)})")
    print(f"live directory, {args.files} files dropped: median {median(lives):.0f} files/s "
          f"(runs: {', '.join(f'{v:.0f}' for v in lives)})")


if __name__ == "__main__":
    main()
