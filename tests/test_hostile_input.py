"""Hostile or malformed requests get a 4xx naming the problem, change nothing and log no traceback."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re

import aiohttp
import pytest

from lts_server import logs
from lts_server.store import StoreUnavailable
from lts_server.store.postgres import PostgresStore
from tests.conftest import Running, license_spec
from tests.test_portal import portal_session

JSON_ENDPOINTS = ["/api/v1/handshake", "/api/v1/usage", "/api/v1/admin/login", "/api/v1/admin/setup",
                  "/api/v1/admin/password", "/api/v1/admin/handshake-codes"]


async def _post(running: Running, path: str, body: bytes, content_type: str = "application/json"):
    async with running.session.post(f"{running.url}{path}", data=body,
                                    headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_invalid_utf8_in_a_json_body_is_a_400_without_traceback(running: Running, path: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"clientUuid":"a","product":"\xff","deploymentType":"browser"}'
    with caplog.at_level(logging.INFO, logger="lts_server"):
        status, answer = await _post(running, path, body)
    assert status == 400, answer
    assert "UTF-8" in answer["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info], "a malformed body must not log a traceback"


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_a_json_key_given_twice_is_refused(running: Running, path: str) -> None:
    body = b'{"password":"x","password":"correct horse battery staple"}'
    status, answer = await _post(running, path, body)
    assert status == 400, answer
    assert answer["error"]["field"] == "password"
    assert "twice" in answer["error"]["message"]


@pytest.mark.parametrize("body", [
    rb'{"clientUuid":"a","product":"p","deploymentType":"browser","\u0063lientUuid":"b"}',  # the same key, escaped
    b'{"clientUuid":"a","product":"p","deploymentType":"browser","clientUuid" : "b"}',
    b'{"clientUuid":"clientUuid","product":"p","deploymentType":"browser","clientUuid":"b"}',
])
async def test_a_handshake_key_given_twice_is_refused_however_it_is_spelled(running: Running, body: bytes) -> None:
    status, answer = await _post(running, "/api/v1/handshake", body)
    assert status == 400, answer
    assert answer["error"]["field"] == "clientUuid" and "twice" in answer["error"]["message"]


async def test_a_non_utf8_charset_is_refused_instead_of_guessed(running: Running) -> None:
    body = '{"clientUuid":"a","product":"caf\u00e9","deploymentType":"browser"}'.encode("latin-1")
    status, answer = await _post(running, "/api/v1/handshake", body, "application/json; charset=latin-1")
    assert status == 400, answer
    assert "charset" in answer["error"]["message"]
    status, answer = await _post(running, "/api/v1/handshake", b'{"clientUuid":"a","product":"p",'
                                 b'"deploymentType":"browser","handshakeCode":"1-x"}', "application/json; charset=UTF-8")
    assert status == 403, answer  # utf-8, spelled either way, is fine


async def test_a_refused_body_records_no_event(running: Running) -> None:
    await _post(running, "/api/v1/handshake", b'{"clientUuid":"a","clientUuid":"b","product":"p",'
                b'"deploymentType":"browser","handshakeCode":"216998-x"}')
    async with running.session.get(f"{running.url}/api/v1/admin/events") as resp:
        assert (await resp.read()) == b""


@pytest.mark.parametrize("query", ["to=0001-01-01T00:00:00Z", "from=0001-01-01T00:00:00Z",
                                   "to=9999-12-31T23:59:59-01:00", "to=9999-12-31T23:59:59Z&bucket=1d"])
async def test_statistics_dates_out_of_range_are_a_400(running: Running, query: str) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec()))
    async with running.session.get(f"{running.url}/api/v1/admin/stats/codes/216998-L1?{query}") as resp:
        assert resp.status == 400, await resp.text()
        assert "out of range" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("query", ["to=9999-12-31T23:59:59-01:00", "from=0001-01-01T00:00:00Z"])
async def test_event_export_dates_out_of_range_are_a_400(running: Running, query: str) -> None:
    async with running.session.get(f"{running.url}/api/v1/admin/events?{query}") as resp:
        assert resp.status == 400, await resp.text()


@pytest.mark.parametrize("query", ["day=9999-12-31", "day=0001-01-01", "to=9999-12-31", "from=0001-01-01"])
async def test_portal_statistics_dates_out_of_range_are_a_400(running: Running, query: str) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec()))
    s = await portal_session(running)
    async with s:
        async with s.get(f"{running.url}/portal/stats/code/216998-L1?{query}", allow_redirects=False) as resp:
            assert resp.status == 400, await resp.text()


async def test_portal_statistics_range_is_limited_like_the_api(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec()))
    s = await portal_session(running)
    async with s:
        url = f"{running.url}/portal/stats/code/216998-L1?from=1970-01-01&to=8999-12-31"
        async with s.get(url, allow_redirects=False) as resp:
            assert resp.status == 303, resp.status
            assert resp.headers["Location"] == "/portal/stats/code/216998-L1"
        async with s.get(url) as resp:  # the redirect shows the default period and says why
            page = await resp.text()
            assert resp.status == 200 and len(page) < 500_000
            assert "at most 10,000 days" in page


async def test_a_client_dropping_mid_body_is_not_an_internal_error(running: Running,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_last_logged", {})  # rate-limited: start from a clean slate
    host, port = running.url.removeprefix("http://").split(":")
    with caplog.at_level(logging.INFO, logger="lts_server"):
        for path in ("/api/v1/handshake", "/api/v1/admin/licenses"):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Authorization: {running.session.headers['Authorization']}\r\n"
                         "Content-Length: 100\r\n\r\n{\"clientUuid\"".encode())
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.exc_info or r.getMessage() == "http.internal_error"], caplog.text
    assert [r for r in caplog.records if r.getMessage() == "http.client_gone"], caplog.text


async def test_a_503_does_not_tell_clients_the_database_path(running: Running, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec()))
    store = running.server.services.store
    where = store.where if isinstance(store, PostgresStore) else str(store.path)  # the URL, without a password

    async def locked(batch, pipeline=None):  # noqa: ANN001, ANN202
        raise StoreUnavailable(f"database {where} is locked by another process: database is locked")

    monkeypatch.setattr(store, "write", locked)
    monkeypatch.setattr(logs, "_last_logged", {})
    with caplog.at_level(logging.INFO, logger="lts_server"):
        status, body = await running.handshake(handshakeCode="216998-L1")
        for _ in range(20):
            assert (await running.handshake(handshakeCode="216998-L1"))[0] == 503
    assert status == 503, body
    assert where not in json.dumps(body) and str(running.folder) not in json.dumps(body)
    assert "storage unavailable" in body["error"]["message"]
    logged = [r.fields for r in caplog.records if r.getMessage() == "http.store_unavailable"]
    assert where in logged[0]["error"]  # the operator still learns which database
    assert len(logged) == 1  # and once, not once per refused request


async def test_csv_export_escapes_cells_a_spreadsheet_would_run_as_formulas(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec()))
    for client, product in (("-dev1", '=HYPERLINK("http://x")'), ("dev2", "@SUM(A1)"), ("dev3", "+1")):
        status, body = await running.handshake(handshakeCode="216998-L1", clientUuid=client, product=product)
        assert status == 403, body  # refused (wrong product), and recorded as an event
    async with running.session.get(f"{running.url}/api/v1/admin/events", headers={"Accept": "text/csv"}) as resp:
        rows = list(csv.reader(io.StringIO(await resp.text())))
    cells = [cell for row in rows[1:] for cell in row]
    assert "'=HYPERLINK(\"http://x\")" in cells and "'-dev1" in cells and "'@SUM(A1)" in cells and "'+1" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    async with running.session.get(f"{running.url}/api/v1/admin/events") as resp:  # NDJSON keeps the data as it is
        assert b'"clientUuid":"-dev1"' in await resp.read()


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded",
                                          "application/x-www-form-urlencoded; charset=no-such-charset"])
async def test_a_portal_form_that_is_not_text_is_a_400(running: Running, content_type: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{running.url}/portal/login") as resp:
            token = re.search(r'name="csrf" value="([^"]+)"', await resp.text()).group(1)
        with caplog.at_level(logging.INFO, logger="lts_server"):
            async with s.post(f"{running.url}/portal/login", data=f"csrf={token}&password=".encode() + b"\xff\xfe",
                              headers={"Content-Type": content_type}, allow_redirects=False) as resp:
                assert resp.status == 400, await resp.text()
    assert not [r for r in caplog.records if r.exc_info]
