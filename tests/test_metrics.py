"""GET /metrics: scraped and parsed with prometheus-client's own parser; who may read it."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lts_server import config as config_mod
from lts_server.core.times import iso, slice_start
from lts_server.server import Server
from tests.conftest import Running, Vendor, item, license_spec, write_config

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items()))


async def scrape(running: Running) -> tuple[str, dict]:
    async with running.session.get(running.url + "/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return text, parse(text)


async def test_metrics_count_handshakes_usage_imports_commits_and_item_use(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("L1-1", quantity=10), item("L1-S", license_type="per-scan", quantity=1000, product="scanner")])))
    await running.drop("bad.lic", b"garbage")
    for n in range(3):
        assert (await running.handshake(handshakeCode="216998-L1", clientUuid=f"secret-device-{n}"))[0] == 200
    assert (await running.handshake(handshakeCode="216998-nope", clientUuid="secret-device-x"))[0] == 403
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="secret-device-s", product="scanner"))[0] == 200
    slot = iso(slice_start(running.clock()))
    report = {"reportId": "r1", "clientUuid": "secret-device-s", "handshakeCode": "216998-L1",
              "records": [{"slot": slot, "product": "scanner", "operation": "scan", "count": 70}] * 2}
    for _ in range(2):
        assert (await running.report(report))[0] == 200
    async with running.session.post(running.url + "/api/v1/handshake", data=b"{") as resp:
        assert resp.status == 400

    text, m = await scrape(running)
    assert value(m, "lts_handshakes_total", outcome="granted", code="0") == 4
    assert value(m, "lts_handshakes_total", outcome="refused", code="101") == 1
    assert value(m, "lts_handshakes_total", outcome="invalid", code="400") == 1
    assert value(m, "lts_handshake_duration_seconds_count") == 6
    assert value(m, "lts_handshake_duration_seconds_bucket", le="+Inf") == 6
    assert value(m, "lts_usage_reports_total", outcome="accepted") == 1
    assert value(m, "lts_usage_reports_total", outcome="duplicate") == 1
    assert value(m, "lts_usage_records_total") == 2
    assert value(m, "lts_imports_total", result="imported") == 1
    assert value(m, "lts_imports_total", result="rejected") == 1
    assert value(m, "lts_item_seats_used", item="L1-1") == 3
    assert value(m, "lts_item_seats_quantity", item="L1-1") == 10
    assert value(m, "lts_item_seats_limit", item="L1-1") == 11
    assert value(m, "lts_item_units_used", item="L1-S") == 140
    assert value(m, "lts_item_units_limit", item="L1-S") == 1050
    assert 364 * 86400 < value(m, "lts_item_seconds_to_expiry", item="L1-1") <= 365 * 86400
    assert value(m, "lts_commit_batch_events_count") >= 6
    assert value(m, "lts_commit_duration_seconds_sum") > 0
    assert "lts_ledger_queue_depth" in m
    assert "lts_alert_checks_total" in m
    # No label carries a client UUID.
    assert "secret-device" not in text


async def test_alert_deliveries_are_counted(running: Running) -> None:
    async with running.session.post(running.url + "/api/v1/admin/alerts/webhooks",
                                    json={"url": "http://127.0.0.1:9/unreachable"}) as resp:
        assert resp.status == 201
    async with running.session.post(running.url + "/api/v1/admin/alerts/test") as resp:
        assert resp.status == 202
    await running.server.services.alerts.deliver_due()
    _, m = await scrape(running)
    assert value(m, "lts_alert_deliveries_total", channel="webhook", result="failed") >= 1
    assert value(m, "lts_alerts_total", type="test") == 1


async def test_metrics_need_a_token_on_the_shared_listener(tmp_path: Path, vendor: Vendor) -> None:
    (tmp_path / "scrape-token").write_text("prometheus-scrape-token-1234\n")
    server = Server(config_mod.load(write_config(tmp_path, vendor, metrics={"token_file": "scrape-token"}),
                                    environ={}))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.urls[0] + "/metrics") as resp:
                assert resp.status == 401
                assert "token_file" in (await resp.json())["error"]["message"]
            async with s.get(server.urls[0] + "/metrics",
                             headers={"Authorization": "Bearer prometheus-scrape-token-1234"}) as resp:
                assert resp.status == 200 and "lts_ledger_queue_depth" in await resp.text()
            async with s.get(server.urls[0] + "/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
    finally:
        await server.stop()


async def test_metrics_are_served_on_the_admin_listener_only(tmp_path: Path, vendor: Vendor) -> None:
    server = Server(config_mod.load(write_config(tmp_path, vendor, admin={"port": 0}), environ={}))
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.urls[0] + "/metrics") as resp:
                assert resp.status == 404
            async with s.get(server.admin_url + "/metrics") as resp:
                assert resp.status == 200
                parse(await resp.text())
    finally:
        await server.stop()


def _metric_names_in_expressions(exprs: list[str]) -> set[str]:
    import re

    return {n for e in exprs for n in re.findall(r"\b(lts_[a-z_]+)\b", e)}


async def test_grafana_dashboard_and_alert_rules_use_only_metrics_that_exist(running: Running) -> None:
    await running.drop("a.lic", running.vendor.issue(license_spec("L1", items=[
        item("L1-1"), item("L1-S", license_type="per-scan", quantity=1000, product="scanner"),
        item("L1-C", license_type="per-concurrent-device", quantity=5)])))
    assert (await running.handshake(handshakeCode="216998-L1", clientUuid="d"))[0] == 200
    text, m = await scrape(running)
    families = {f.name for f in text_string_to_metric_families(text)}
    known = set(m) | families
    dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules_text = (ROOT / "contrib" / "prometheus-rules.yml").read_text()
    rule_exprs = [line.split("expr:", 1)[1] for line in rules_text.splitlines() if "expr:" in line]
    used = _metric_names_in_expressions(exprs + rule_exprs)
    assert exprs and rule_exprs and used
    assert used <= known, f"not exported: {sorted(used - known)}"
