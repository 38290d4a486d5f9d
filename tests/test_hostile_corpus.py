"""A fixed corpus of hostile requests, against each backend: never a 5xx, a traceback or an error line.

The corpus gathers what broke under outside testing (a NUL in any string, which PostgreSQL refuses;
JSON nested a thousand deep; a request head over 8 KB) and the cases of tests/test_hostile_input.py
and the fuzzer's kinds of input. Every case names the answer it must get, the same on both backends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from lts_server import logs
from lts_server.web.inputs import MAX_JSON_DEPTH
from tests.conftest import NOW, Running, item, license_spec

HANDSHAKE = {"handshakeCode": "216998-L1", "clientUuid": "hostile-1", "product": "barcode-reader",
             "deploymentType": "browser"}
HANDSHAKE_FIELDS = ("handshakeCode", "product", "organizationId", "sessionPassword", "version", "edition",
                    "domain", "appId", "processName")
USAGE = {"reportId": "r-1", "clientUuid": "hostile-1", "handshakeCode": "216998-L1",
         "records": [{"slot": NOW.isoformat(), "product": "barcode-reader", "operation": "scan", "count": 1}]}
JSON_ENDPOINTS = ["/api/v1/handshake", "/api/v1/usage", "/api/v1/admin/login", "/api/v1/admin/setup",
                  "/api/v1/admin/password", "/api/v1/admin/handshake-codes", "/api/v1/admin/alerts/recipients",
                  "/api/v1/admin/alerts/webhooks", "/api/v1/admin/events/archive"]


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    status: int = 400
    content_type: str = "application/json"
    # What the error's field or message must name (a 400 that says why).
    says: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def corpus() -> list[Case]:
    cases: list[Case] = []
    # A NUL in every string of a device request: refused at the edge, named, on every backend.
    for name in HANDSHAKE_FIELDS:
        cases.append(Case(f"handshake {name} with NUL", "POST", "/api/v1/handshake",
                          _json({**HANDSHAKE, name: "216998-L1\x00x"}), says=name))
    cases.append(Case("handshake key with NUL", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "a\x00b": "x"}), says="NUL"))
    cases.append(Case("handshake clientUuid with NUL", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "clientUuid": "x\x00"}), says="clientUuid"))
    for name in ("handshakeCode",):
        cases.append(Case(f"usage {name} with NUL", "POST", "/api/v1/usage", _json({**USAGE, name: "a\x00"}),
                          says=name))
    for name in ("product", "operation", "itemId"):
        record = {**USAGE["records"][0], name: "scan\x00"}
        cases.append(Case(f"usage record {name} with NUL", "POST", "/api/v1/usage",
                          _json({**USAGE, "records": [record]}), says=f"records[0].{name}"))
    cases.append(Case("code with a NUL domain", "POST", "/api/v1/admin/handshake-codes",
                      _json({"organizationId": "216998", "custom": "x", "domains": ["a\x00.example"]}),
                      says="domains[0]"))
    cases.append(Case("code edit with a NUL process name", "PATCH", "/api/v1/admin/handshake-codes/216998-L1",
                      _json({"processNames": ["a\x00"]}), says="processNames[0]"))
    cases.append(Case("login with a NUL password", "POST", "/api/v1/admin/login", _json({"password": "\x00"}),
                      says="password"))
    cases.append(Case("alert recipients with NUL", "PUT", "/api/v1/admin/alerts/recipients",
                      _json({"recipients": "a@b.example\x00"}), says="recipients"))
    cases.append(Case("a lone surrogate", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "product": "\ud800"})))
    # A NUL in the URL: the upload's file name, a path segment, a query parameter.
    license_file = b"LTS-LICENSE-FILE 1\n"
    cases.append(Case("upload named with NUL", "POST", "/api/v1/admin/licenses?name=%00x.lic", license_file,
                      content_type="application/octet-stream", says="name"))
    cases.append(Case("code name with NUL", "GET", "/api/v1/admin/handshake-codes/216998-L1%00", says="path"))
    cases.append(Case("stats of a code with NUL", "GET", "/api/v1/admin/stats/codes/a%00b", says="path"))
    cases.append(Case("events of a code with NUL", "GET", "/api/v1/admin/events?code=%00", says="code"))
    cases.append(Case("item devices with NUL", "GET", "/api/v1/admin/items/L1-1%00/devices", says="path"))
    # Deeply nested JSON: 400 before any recursive decoding, on every JSON endpoint.
    for path in JSON_ENDPOINTS:
        cases.append(Case(f"{path} nested 990 deep", "POST" if "recipients" not in path else "PUT", path,
                          _nested(990), says="levels deep"))
    cases.append(Case("nested one level too deep", "POST", "/api/v1/handshake", _nested(MAX_JSON_DEPTH + 1),
                      says="levels deep"))
    cases.append(Case("brackets inside strings do not count", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "product": "[" * 100}), status=403))
    # The kinds of input tests/test_hostile_input.py and the fuzzer send.
    cases.append(Case("invalid UTF-8", "POST", "/api/v1/handshake",
                      b'{"clientUuid":"a","product":"\xff","deploymentType":"browser"}', says="UTF-8"))
    cases.append(Case("a key twice", "POST", "/api/v1/admin/login",
                      b'{"password":"x","password":"correct horse battery staple"}', says="password"))
    cases.append(Case("an escaped key twice", "POST", "/api/v1/handshake",
                      rb'{"clientUuid":"a","product":"p","deploymentType":"browser","\u0063lientUuid":"b"}',
                      says="clientUuid"))
    cases.append(Case("latin-1 charset", "POST", "/api/v1/handshake",
                      '{"clientUuid":"a","product":"caf\u00e9","deploymentType":"browser"}'.encode("latin-1"),
                      content_type="application/json; charset=latin-1", says="charset"))
    cases.append(Case("not JSON", "POST", "/api/v1/handshake", b"{", says="JSON"))
    cases.append(Case("a number too large", "POST", "/api/v1/handshake", _json({**HANDSHAKE, "instances": 10**30})))
    cases.append(Case("a body over 16 KB", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "product": "p" * 20_000})))
    cases.append(Case("wrong content type", "POST", "/api/v1/handshake", _json(HANDSHAKE), content_type="text/plain",
                      says="Content-Type"))
    cases.append(Case("stats out of range", "GET", "/api/v1/admin/stats/codes/216998-L1?to=0001-01-01T00:00:00Z",
                      says="out of range"))
    cases.append(Case("events out of range", "GET", "/api/v1/admin/events?to=9999-12-31T23:59:59-01:00"))
    cases.append(Case("a garbage license file", "POST", "/api/v1/admin/licenses?name=g.lic", _nested(990),
                      status=422, content_type="application/octet-stream"))
    cases.append(Case("a formula as a product", "POST", "/api/v1/handshake",
                      _json({**HANDSHAKE, "product": '=HYPERLINK("http://x")'}), status=403))
    return cases


async def _send(running: Running, session: aiohttp.ClientSession, case: Case) -> tuple[int, str]:
    headers = {"Content-Type": case.content_type, **case.headers} if case.body is not None else case.headers
    async with session.request(case.method, f"{running.url}{case.path}", data=case.body, headers=headers) as resp:
        return resp.status, await resp.text()


async def _raw(running: Running, data: bytes) -> bytes:
    host, port = running.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return answer


def _problems(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.levelname} {r.name} {r.getMessage()}" for r in records if r.levelno >= logging.ERROR or r.exc_info]


async def test_the_hostile_corpus_gets_its_4xx_and_logs_no_error(running: Running, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1")])))
    monkeypatch.setattr(logs, "_last_logged", {})
    wrong: list[str] = []
    with caplog.at_level(logging.INFO):
        for case in corpus():
            status, text = await _send(running, running.session, case)
            if status != case.status or "Traceback" in text or (case.says and case.says not in text):
                wrong.append(f"{case.name}: {status} {text[:300]}")
        # The same without a token, where the paths allow it: the edge refuses before the login does.
        async with aiohttp.ClientSession() as anonymous:
            for case in corpus():
                if case.path.startswith("/api/v1/admin/") and case.path not in ("/api/v1/admin/login",
                                                                                 "/api/v1/admin/setup"):
                    status, text = await _send(running, anonymous, case)
                    if status >= 500 or "Traceback" in text:
                        wrong.append(f"without a token, {case.name}: {status} {text[:300]}")
        # A request head over 8 KB: aiohttp's 400, and one warning line instead of an error with a traceback.
        for _ in range(3):
            answer = await _raw(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.") or b" 400 " not in answer.split(b"\r\n")[0]:
                wrong.append(f"head over 8 KB: {answer[:200]!r}")
        answer = await _raw(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        if b" 400 " not in answer.split(b"\r\n")[0]:
            wrong.append(f"malformed header: {answer[:200]!r}")
        # The portal's forms: a NUL in a field, bytes that are not text.
        wrong += await _portal_cases(running)
        # And the server still serves.
        status, body = await running.handshake(handshakeCode="216998-L1", clientUuid="after-the-corpus")
        if status != 200:
            wrong.append(f"a plain handshake after the corpus: {status} {body}")
    assert not wrong, "\n".join(wrong)
    assert not _problems(caplog.records), _problems(caplog.records)
    assert [r for r in caplog.records if r.getMessage() == "http.bad_request" and r.levelno == logging.WARNING]
    # Nothing of the refused requests was recorded.
    assert await running.sql_value("SELECT COUNT(*) FROM events WHERE type = 'handshake'") == 3  # the 403s, the 200


async def _portal_cases(running: Running) -> list[str]:
    wrong = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{running.url}/portal/login") as resp:
            token = re.search(r'name="csrf" value="([^"]+)"', await resp.text()).group(1)
        for body, content_type in ((f"csrf={token}&password=%00".encode(), "application/x-www-form-urlencoded"),
                                   (f"csrf={token}&password=".encode() + b"\xff\xfe",
                                    "application/x-www-form-urlencoded")):
            async with s.post(f"{running.url}/portal/login", data=body, headers={"Content-Type": content_type},
                              allow_redirects=False) as resp:
                text = await resp.text()
                if resp.status != 400 or "Traceback" in text:
                    wrong.append(f"portal login {body[-12:]!r}: {resp.status}")
    return wrong


async def test_a_nul_is_refused_alike_on_every_backend_and_names_the_field(running: Running) -> None:
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1")])))
    status, body = await running.handshake(**{**HANDSHAKE, "product": "barcode-reader\x00"})
    assert status == 400, body
    assert body["error"] == {"code": 400, "field": "product",
                             "message": "product: must not contain the NUL character (U+0000)"}
    async with running.session.post(f"{running.url}/api/v1/admin/licenses?name=%00x.lic",
                                    data=running.vendor.issue(license_spec("L2"))) as resp:
        answer = await resp.json()
        assert resp.status == 400 and answer["error"]["field"] == "name", answer
    assert "L2" not in running.ledger.licenses


async def test_json_nested_too_deep_is_a_400_and_one_log_line(running: Running, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_last_logged", {})
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            async with running.session.post(f"{running.url}/api/v1/handshake", data=_nested(990),
                                            headers={"Content-Type": "application/json"}) as resp:
                answer = await resp.json()
                assert resp.status == 400, answer
                assert answer["error"]["message"] == (f"the body nests arrays and objects more than {MAX_JSON_DEPTH} "
                                                      f"levels deep; at most {MAX_JSON_DEPTH} are accepted")
    deep = [r for r in caplog.records if r.getMessage() == "http.json_too_deep"]
    assert len(deep) == 1 and deep[0].levelno == logging.WARNING and not deep[0].exc_info
    assert not _problems(caplog.records)
    # At the limit the body is decoded as usual (and here refused for what it holds, not for its depth).
    async with running.session.post(f"{running.url}/api/v1/handshake", data=_nested(MAX_JSON_DEPTH),
                                    headers={"Content-Type": "application/json"}) as resp:
        answer = await resp.json()
        assert resp.status == 400 and "levels deep" not in answer["error"]["message"], answer


async def test_hostile_requests_among_good_ones_cost_them_nothing(running: Running) -> None:
    """The outside test's flood: requests with a NUL, sent in among good ones (so they would share batches),
    used to make PostgreSQL refuse whole batches and the good requests got 503."""
    await running.drop("l1.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1", quantity=1000)])))
    calls = []
    for n in range(200):
        calls.append(running.handshake(handshakeCode="216998-L1", clientUuid=f"good-{n}"))
        if n % 2 == 0:
            calls.append(running.handshake(handshakeCode="216998-L1", clientUuid=f"bad-{n}",
                                           product=f"barcode-reader\x00{n}"))
    answers = await asyncio.gather(*calls)
    good = [status for status, body in answers if "authorization" in body or body["error"].get("field") != "product"]
    bad = [body for status, body in answers if status == 400 and body["error"].get("field") == "product"]
    assert good == [200] * 200 and len(bad) == 100
    assert await running.sql_value("SELECT COUNT(*) FROM events WHERE type = 'handshake'") == 200


@pytest.mark.parametrize(("body", "deep"), [
    (b"[]", False), (b'{"a":' + b"[" * 15 + b"]" * 15 + b"}", False), (b'{"a":' + b"[" * 16 + b"]" * 16 + b"}", True),
    (b"[" + b"[]," * 5000 + b"[]]", False),  # wide, not deep
    (b"[[]" * 20 + b"]" * 20, True),  # deep without a long run of brackets
    (b'{"a":"' + b"[" * 100 + b'"}', False),  # brackets inside a string
    (rb'{"a":"\"' + b"[" * 100 + b'"}', False),  # after an escaped quote, still inside the string
    (rb'{"a":"\\"' + b"," * 3 + b"[" * 20 + b"0" + b"]" * 20 + b"}", True),  # an escaped backslash ends it
    (b"[" * 40, True),  # never closed
    (b"]" * 40, False),  # not JSON, but not deep: the decoder says what is wrong
])
def test_json_depth_is_measured_on_the_bytes(body: bytes, deep: bool) -> None:
    from lts_server.web.inputs import json_too_deep

    assert json_too_deep(body) is deep
