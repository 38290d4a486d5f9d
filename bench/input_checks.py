"""The request checks of web/inputs.py (JSON depth, NUL), side by side with the check they join.

    .venv/bin/python bench/input_checks.py

Times check_json_text (web/device.py: UTF-8, duplicate keys, and inputs.check_json) on a typical
handshake body and on 16-20 KB bodies built to make a depth scan work hard, with inputs.check_json
and with it replaced by a no-op, in one run: medians of 7 repeats, in microseconds per body.
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lts_server.web import device, inputs  # noqa: E402

HANDSHAKE = json.dumps({"handshakeCode": "216998-100028117", "clientUuid": "3f2a9c0d-1e4b-5a68-9c0d-1e4b5a689c0d",
                        "product": "barcode-reader", "deploymentType": "browser", "version": "10.4.2",
                        "domain": "www.example.com"}).encode()
BODIES = [
    ("handshake", HANDSHAKE, 20_000),
    ("16 KB, brackets inside strings", json.dumps({"x": ["[" * 50] * 300}).encode(), 300),
    ("16 KB, 4,000 empty arrays (wide)", json.dumps([[] for _ in range(4000)]).encode(), 300),
    ("20 KB, escaped quotes and brackets", json.dumps({"x": ['\\"[' * 20] * 200}).encode(), 300),
]
DEEP = b'{"a":' + b"[" * 990 + b"]" * 990 + b"}"


def per_call(fn: Callable[[], object], number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    check = inputs.check_json
    for name, body, number in BODIES:
        inputs.check_json = check
        with_checks = per_call(lambda b=body: device.check_json_text(b), number)
        inputs.check_json = lambda body, text: None
        without = per_call(lambda b=body: device.check_json_text(b), number)
        print(f"{name}: {len(body)} bytes, check_json_text {without:.1f} us without the checks, "
              f"{with_checks:.1f} us with them ({with_checks / without:.2f}x)")
    inputs.check_json = check
    print(f"2 KB nested 990 deep: refused in {per_call(lambda: inputs.json_too_deep(DEEP), 2000):.1f} us")


if __name__ == "__main__":
    main()
