"""Every portal page at 390 px (a phone) and 1366 px (a laptop): no table runs off-screen.

Screenshots of each page at both widths go to test-output/screenshots/<page>-<width>.png.
Under CI=true a missing Chromium fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from lts_server.core.times import iso, slice_start
from tests.conftest import ADMIN_PASSWORD, NOW, Running, item, license_spec, unavailable

CHROMIUM = os.environ.get("LTS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = Path(os.environ.get("LTS_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output")) / "screenshots"
WIDTHS = (390, 1366)
PAGES = {
    "home": "/portal/",
    "items": "/portal/items",
    "codes": "/portal/codes",
    "code-new": "/portal/codes/new",
    "code-edit": "/portal/codes/216998-fleet/edit",
    "usage-order": "/portal/codes/216998-fleet/order",
    "stats-code": "/portal/stats/code/216998-fleet",
    "stats-item-units": "/portal/stats/item/scans",
    "alerts": "/portal/alerts",
    "security": "/portal/security",
    "devices": "/portal/devices",
    "not-found": "/portal/no-such-page",
    "unknown-code": "/portal/stats/code/216998-never",
}
OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('table')]
      .filter(t => t.getBoundingClientRect().right > width + 1).map(t => t.id || t.className || 'table');
  if (document.documentElement.scrollWidth > width + 1) wide.push('page is ' + document.documentElement.scrollWidth + 'px wide');
  return wide;
}"""


def chromium_or_skip() -> None:
    if shutil.which(CHROMIUM):
        return
    unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")


async def fill(running: Running) -> None:
    """Items in several states, two codes, a week of traffic every 2 hours, units, and an open alert."""
    await running.drop("fleet.lic", running.vendor.issue(license_spec("100028117", items=[
        item("soon", quantity=5, expires_at=NOW + timedelta(days=5)),
        item("late", quantity=100),
        item("scans", license_type="per-scan", quantity=10_000, product="scanner"),
        item("gone", expires_at=NOW - timedelta(days=10), starts_at=NOW - timedelta(days=40)),
    ])))
    async with running.session.post(running.url + "/api/v1/admin/handshake-codes", json={
            "organizationId": "216998", "custom": "fleet", "items": ["soon", "late", "scans"],
            "domains": ["*.a-rather-long-customer-domain-name.example.com"]}) as resp:
        assert resp.status == 201, await resp.text()
    end = running.clock.now
    running.clock.now = end - timedelta(days=7)
    # A week of history, made by setting the clock back: the server grants nothing until it is accepted.
    async with running.session.post(running.url + "/api/v1/admin/clock/accept") as resp:
        assert resp.status == 200, await resp.text()
    n = 0
    while running.clock.now < end:
        await running.handshake(handshakeCode="216998-fleet", clientUuid=f"dev-{n % 7}",
                                domain="gps.a-rather-long-customer-domain-name.example.com")
        n += 1
        running.clock.advance(hours=2)
    running.clock.now = end
    assert (await running.handshake(handshakeCode="216998-fleet", clientUuid="scanner-1", product="scanner",
                                    domain="x.a-rather-long-customer-domain-name.example.com"))[0] == 200
    status, answer = await running.report({
        "reportId": "r1", "clientUuid": "scanner-1", "handshakeCode": "216998-fleet",
        "records": [{"slot": iso(slice_start(end)), "product": "scanner", "operation": "scan",
                     "count": 8_700, "itemId": "scans"}]})
    assert status == 200, answer
    await running.server.roll_up()
    await running.server.services.alerts.check()


async def test_every_page_fits_a_phone_and_a_laptop(running: Running) -> None:
    chromium_or_skip()
    from playwright.async_api import async_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    await fill(running)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for width in WIDTHS:
                page = await browser.new_page(viewport={"width": width, "height": 900})
                await page.goto(running.url + "/portal/login")
                await page.screenshot(path=str(OUT / f"login-{width}.png"), full_page=True)
                assert await page.evaluate(OVERFLOW) == [], f"login at {width} px"
                await page.fill("#password", ADMIN_PASSWORD)
                await page.keyboard.press("Enter")
                await page.wait_for_url(running.url + "/portal/")
                for name, path in PAGES.items():
                    await page.goto(running.url + path)
                    await page.screenshot(path=str(OUT / f"{name}-{width}.png"), full_page=True)
                    assert await page.evaluate(OVERFLOW) == [], f"{name} at {width} px"
                # On a phone the row actions stay on screen.
                await page.goto(running.url + "/portal/codes")
                for label in ("Edit", "Delete"):
                    box = await page.locator(f"#codes >> text={label}").first.bounding_box()
                    assert box is not None and box["x"] + box["width"] <= width, f"{label} off-screen at {width} px"
                await page.close()
        finally:
            await browser.close()


async def test_pages_say_what_is_wrong_and_what_is_empty(running: Running) -> None:
    chromium_or_skip()
    from playwright.async_api import async_playwright

    await fill(running)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 900})
            await page.goto(running.url + "/portal/login")
            await page.fill("#password", ADMIN_PASSWORD)
            await page.keyboard.press("Enter")
            await page.wait_for_url(running.url + "/portal/")
            # Home: open alerts, each linking to its cause.
            alerts = page.locator("#open-alerts li")
            texts = [await alerts.nth(i).inner_text() for i in range(await alerts.count())]
            assert any("soon" in t and "expires within 7 days" in t for t in texts)
            assert any("scans" in t and "80%" in t for t in texts)
            await page.click("#open-alerts a[href='/portal/stats/item/scans']")
            assert "Statistics of item scans" in await page.inner_text("h1")
            # Units are charted, with values readable on the axis.
            assert await page.locator("#trend-units svg polyline").count() == 1
            assert "10,000" in (await page.locator("#trend-units svg").text_content() or "")
            # Items: problems first, each with its state.
            await page.goto(running.url + "/portal/items")
            first = await page.inner_text("#items tbody tr:first-child")
            assert first.startswith("gone") and "expired" in first
            # A week of 2-hour buckets is paged.
            await page.goto(running.url + "/portal/stats/code/216998-fleet")
            shown = await page.inner_text("#rows-shown")
            assert shown.startswith("Buckets with activity 1-24 of ") and "page 1 of" in shown
            assert await page.locator("#buckets tbody tr").count() == 24
            await page.click("text=Next")
            assert "25-48" in await page.inner_text("#rows-shown")
            # Unknown pages and codes: an HTML page that says so, with a way back.
            response = await page.goto(running.url + "/portal/stats/code/216998-never")
            assert response is not None and response.status == 404
            assert "no handshake code 216998-never" in await page.inner_text("#error-message")
            response = await page.goto(running.url + "/portal/nothing-here")
            assert response is not None and response.status == 404
            assert "Back to Home" in await page.inner_text("main")
        finally:
            await browser.close()
