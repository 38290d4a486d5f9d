"""The portal's Alerts page over HTTP: the same settings, webhooks, test and check as the admin API."""

from __future__ import annotations

import re

from tests.conftest import Running, item, license_spec
from tests.test_portal import csrf, portal_session


async def test_alerts_page_saves_recipients_kinds_and_webhooks(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[item("L1-1", quantity=2)])))
    s = await portal_session(running)
    try:
        async with s.get(running.url + "/portal/alerts") as resp:
            page = await resp.text()
        assert resp.status == 200 and "No condition is met" in page and "No SMTP server is configured" in page
        token = csrf(page)
        async with s.post(running.url + "/portal/alerts/settings", data={
                "csrf": token, "recipients": "ops@example.com ; lead@example.com",
                "kinds": ["seats", "expiry"]}) as resp:
            page = await resp.text()
        assert "Saved: 2 recipient(s), 2 kind(s) of condition on." in page
        settings = await running.server.services.store.alert_settings()
        assert settings.recipients == "ops@example.com; lead@example.com"
        assert settings.disabled_kinds == {"units", "overuse", "failures", "import"}
        async with s.post(running.url + "/portal/alerts/settings", data={"csrf": token, "recipients": "nope"}) as resp:
            assert "is not an e-mail address" in await resp.text()

        async with s.post(running.url + "/portal/alerts/webhooks",
                          data={"csrf": token, "url": "https://hooks.example.com/lts"}) as resp:
            page = await resp.text()
        secret = re.search(r"shown only now: (\S+?)</div>", page)
        assert secret and len(secret.group(1)) >= 32
        assert "https://hooks.example.com/lts" in page
        hook = (await running.server.services.store.alert_settings()).webhooks[0]
        assert hook.secret == secret.group(1)
        async with s.post(running.url + f"/portal/alerts/webhooks/{hook.id}/delete", data={"csrf": token}) as resp:
            assert f"Webhook {hook.id} removed." in await resp.text()

        for n in range(2):
            assert (await running.handshake(handshakeCode="216998-L1", clientUuid=f"d{n}"))[0] == 200
        async with s.post(running.url + "/portal/alerts/check", data={"csrf": token}) as resp:
            page = await resp.text()
        assert "1 new condition(s)." in page and "has 2 of 2 seats in use" in page
        async with s.post(running.url + "/portal/alerts/test", data={"csrf": token}) as resp:
            page = await resp.text()
        assert "Test notification" in page and "[lts-server] test notification" in page
        assert "ops@example.com: pending" in page
        async with s.post(running.url + "/portal/alerts/test", data={"csrf": "forged"}) as resp:
            assert resp.status == 403
    finally:
        await s.close()
