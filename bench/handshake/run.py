"""Handshake benchmark: lts-server's granted, durable handshakes against a bare aiohttp endpoint.

    .venv/bin/python bench/handshake/run.py [--duration 10] [--connections 64] [--rounds 3]

Both servers run as their own process on loopback and are driven by wrk
(Debian package `wrk`) with the same connection count, alternating rounds, so
the ratio is measured side by side on the same (noisy, shared) machine. Every
lts-server request is a new device claiming a seat, committed with
synchronous=FULL before the answer. Prints medians over the rounds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import device_item, license_file, vendor_key, write_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def wrk(url: str, duration: int, connections: int, script: Path | None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    else:
        cmd += ["-s", str(HERE / "post.lua")]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"LATENCY p50=([\d.]+) p99=([\d.]+)", out)
    status = re.search(r"STATUS non2xx=(\d+) errors=(\d+)", out)
    return {"rps": rps, "p50": float(m.group(1)), "p99": float(m.group(2)),
            "non2xx": int(status.group(1)), "errors": int(status.group(2))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key, pub = vendor_key(folder / "vendor")
        port = free_port()
        cfg = write_config(folder, pub, port)
        (folder / "import" / "bench.lic").write_bytes(
            license_file(key, "BENCH", [device_item("BENCH-1", 50_000_000)]))
        lts = subprocess.Popen([sys.executable, "-m", "lts_server", "--config", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, str(HERE / "bare.py"), str(bare_port), "600"])
        try:
            wait_listening(port, lts)
            wait_listening(bare_port, bare)
            results: dict[str, list[dict[str, float]]] = {"lts": [], "bare": []}
            for _ in range(args.rounds):
                results["lts"].append(wrk(f"http://127.0.0.1:{port}", args.duration, args.connections,
                                          HERE / "handshake.lua"))
                results["bare"].append(wrk(f"http://127.0.0.1:{bare_port}/api/v1/handshake", args.duration, args.connections,
                                           HERE / "post.lua"))
        finally:
            lts.terminate()
            bare.terminate()
            lts.wait(30)
            bare.wait(30)
        con = sqlite3.connect(folder / "state" / "lts-server.sqlite3")
        seats = con.execute("SELECT COUNT(*) FROM seats").fetchone()[0]
        events = con.execute("SELECT COUNT(*) FROM events WHERE type = 'handshake' AND result = 0").fetchone()[0]
        lag = con.execute("SELECT MAX(seq) - (SELECT last_seq FROM rollup_state) FROM events").fetchone()[0]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"wrk -t2 -c{args.connections} -d{args.duration}s, {args.rounds} alternating rounds, medians:")
    for name, label in (("lts", "lts-server granted handshakes"), ("bare", "bare aiohttp JSON endpoint")):
        print(f"  {label:32} {med(name, 'rps'):9.0f} req/s   p50 {med(name, 'p50'):6.2f} ms   "
              f"p99 {med(name, 'p99'):6.2f} ms   non-2xx {sum(r['non2xx'] for r in results[name])}")
    print(f"  ratio lts/bare: {med('lts', 'rps') / med('bare', 'rps'):.2f}")
    print(f"  durable: {seats} seats and {events} granted-handshake events committed")
    print(f"  statistics rollups trailing the event log at shutdown: {lag} events")


if __name__ == "__main__":
    main()
