"""Whether Ed25519 signing releases the GIL here: N signatures on one thread, then the same N split over two.

    .venv/bin/python bench/signing.py [--count 40000]

Two threads near half the one thread's time: signing runs in parallel with other Python code (what a
signing thread relies on; lts_server/signer.py).
"""

from __future__ import annotations

import argparse
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40_000)
    args = parser.parse_args()
    key, data = Ed25519PrivateKey.generate(), b"x" * 300

    def sign(n: int) -> None:
        for _ in range(n):
            key.sign(data)

    started = time.perf_counter()
    sign(args.count)
    one = time.perf_counter() - started
    threads = [threading.Thread(target=sign, args=(args.count // 2,)) for _ in range(2)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = time.perf_counter() - started
    print(f"{args.count} signatures: one thread {one:.2f} s ({one / args.count * 1e6:.1f} us each),"
          f" two threads {two:.2f} s: {one / two:.2f} x")


if __name__ == "__main__":
    main()
