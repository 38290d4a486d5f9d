"""Long portal tables are paged: items and codes 50 a page, problems first."""

from __future__ import annotations

from datetime import timedelta

from tests.conftest import NOW, Running, item, license_spec
from tests.test_portal import portal_session


async def test_items_are_paged_50_at_a_time_with_problems_on_the_first_page(running: Running) -> None:
    items = [item(f"I{n:03d}") for n in range(59)]
    items.append(item("Z-expired", expires_at=NOW - timedelta(days=9), starts_at=NOW - timedelta(days=30)))
    await running.drop("many.lic", running.vendor.issue(license_spec("L1", items=items)))
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/items") as resp:
            first = await resp.text()
        async with s.get(running.url + "/portal/items?page=2") as resp:
            second = await resp.text()
        async with s.get(running.url + "/portal/items?page=99") as resp:
            clamped = await resp.text()
    finally:
        await s.close()
    assert first.count('<td data-label="Item">') == 50 and second.count('<td data-label="Item">') == 10
    assert "1-50 of 60 · page 1 of 2" in first and "51-60 of 60 · page 2 of 2" in second
    assert first.index("Z-expired") < first.index("I000")  # the expired item leads
    assert 'href="?page=2">Next' in first and 'href="?page=1">Previous' in second
    assert "51-60 of 60" in clamped
