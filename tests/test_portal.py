"""The management portal over HTTP: sessions, CSRF, security headers, escaping."""

from __future__ import annotations

import re

import aiohttp
import pytest

from lts_server.core.codes import CodeFields
from tests.conftest import ADMIN_PASSWORD, Running, item, license_spec


def csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


async def portal_session(running: Running) -> aiohttp.ClientSession:
    jar = aiohttp.CookieJar(unsafe=True)
    s = aiohttp.ClientSession(cookie_jar=jar)
    async with s.get(running.url + "/portal/login") as resp:
        token = csrf(await resp.text())
    async with s.post(running.url + "/portal/login", data={"csrf": token, "password": ADMIN_PASSWORD}) as resp:
        assert resp.status == 200 and "Open alerts" in await resp.text()
    return s


async def test_pages_need_a_session_and_carry_security_headers(running: Running) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(running.url + "/portal/codes", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/portal/login"
        async with s.get(running.url + "/portal/login") as resp:
            assert resp.status == 200
            csp = resp.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["X-Frame-Options"] == "DENY"


async def test_login_sets_a_strict_httponly_cookie(running: Running) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(running.url + "/portal/login") as resp:
            token = csrf(await resp.text())
        async with s.post(running.url + "/portal/login", data={"csrf": token, "password": ADMIN_PASSWORD},
                          allow_redirects=False) as resp:
            assert resp.status == 303
            cookie = resp.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith("lts_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/portal" in session


async def test_forms_without_the_csrf_token_are_refused(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1")])))
    s = await portal_session(running)
    try:
        async with s.post(running.url + "/portal/codes/216998-L1/delete", data={}) as resp:
            assert resp.status == 403
        async with s.post(running.url + "/portal/codes/216998-L1/delete", data={"csrf": "forged"}) as resp:
            assert resp.status == 403
        assert "216998-L1" in running.ledger.codes
        async with s.get(running.url + "/portal/codes") as resp:
            token = csrf(await resp.text())
        async with s.post(running.url + "/portal/codes/216998-L1/delete", data={"csrf": token, "confirm": "default"}) as resp:
            assert resp.status == 200 and "deleted" in await resp.text()
        assert "216998-L1" not in running.ledger.codes
    finally:
        await s.close()


async def test_values_from_license_files_and_users_are_escaped(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("L1-1", product="<script>alert(1)</script>")])))
    await running.ledger.create_code("216998", CodeFields(custom="x", process_names=('"><img src=x onerror=1>',)))
    s = await portal_session(running)
    try:
        for page in ("/portal/items", "/portal/codes", "/portal/codes/216998-x/edit"):
            async with s.get(running.url + page) as resp:
                html = await resp.text()
            assert "<script>alert(1)" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html or "&#34;&gt;&lt;img" in html
    finally:
        await s.close()


@pytest.mark.parametrize("page", ["/portal/", "/portal/items", "/portal/codes", "/portal/codes/new",
                                  "/portal/security", "/portal/devices", "/portal/stats/code/216998-L1",
                                  "/portal/stats/item/L1-1", "/portal/codes/216998-L1/order"])
async def test_pages_render_under_200_kb(running: Running, page: str) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1"), item("L1-2")])))
    s = await portal_session(running)
    try:
        async with s.get(running.url + page) as resp:
            assert resp.status == 200
            body = await resp.read()
        assert len(body) < 200_000
        assert b"Traceback" not in body
    finally:
        await s.close()


async def test_the_devices_page_lists_clones_and_resets_a_binding(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1")])))
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-a"))[0] == 200
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-b"))[0] == 403
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/") as resp:
            home = await resp.text()
        assert running.server.services.identity.public_key_b64 in home
        async with s.get(running.url + "/portal/devices") as resp:
            html = await resp.text()
        assert "device-1" in html
        async with s.post(running.url + "/portal/devices/reset", data={"csrf": csrf(html), "client": "device-1"}) as resp:
            assert resp.status == 200 and "is reset" in await resp.text()
        async with s.post(running.url + "/portal/devices/reset", data={"csrf": csrf(html), "client": "nobody"}) as resp:
            assert "not bound" in await resp.text()
    finally:
        await s.close()
    assert (await running.handshake(handshakeCode="216998-L1", deviceFingerprint="machine-b"))[0] == 200
