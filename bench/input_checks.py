"""The request checks of web/inputs.py (JSON depth, NUL), side by side with the check they join.

    .venv/bin/python bench/input_checks.py

Times check_json_text (web/device.py: UTF-8, duplicate keys, and now inputs.check_json) on a typical
handshake body and on 16-20 KB bodies built to make a depth scan work hard, with inputs.check_json and
with it replaced by a no-op, in one run: medians of 7 repeats, in microseconds per body.
"""

import json
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lts_server.web import device, inputs
orig = inputs.check_json
hs = json.dumps({"handshakeCode":"216998-100028117","clientUuid":"3f2a9c0d-1e4b-5a68-9c0d-1e4b5a689c0d","product":"barcode-reader","deploymentType":"browser","version":"10.4.2","domain":"www.example.com"}).encode()
big = json.dumps({"x": ["[" * 50] * 300}).encode()
wide = json.dumps([[] for _ in range(4000)]).encode()
esc = json.dumps({"x": ['\\"[' * 20] * 200}).encode()
deep = b'{"a":' + b"[" * 990 + b"]" * 990 + b"}"
def t(f, n):
    return statistics.median(timeit.repeat(f, number=n, repeat=7))/n*1e6
for name, b, n in (("handshake", hs, 20000), ("16KB brackets in strings", big, 300), ("16KB wide", wide, 300), ("20KB escapes", esc, 300)):
    inputs.check_json = orig
    t1 = t(lambda: device.check_json_text(b), n)
    inputs.check_json = lambda body, text: None
    t0 = t(lambda: device.check_json_text(b), n)
    print(f"{name}: {len(b)} bytes, check_json_text without {t0:.1f} us, with {t1:.1f} us, ratio {t1/t0:.2f}")
inputs.check_json = orig
print("2 KB nested 990 deep refused in (us)", round(t(lambda: inputs.json_too_deep(deep), 2000), 1))
