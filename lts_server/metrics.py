"""Prometheus metrics: counters the shell bumps, and gauges read from the live state at each scrape.

One registry per running server (not prometheus-client's global one), so
several servers in one process (the tests) never share figures. Names follow
Prometheus conventions: `lts_` prefix, `_total` counters, seconds, and no
label with unbounded values (never a client UUID; item ids and code names
are bounded by the licenses imported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lts_server.core.model import Counts, Item, ItemStatus, hard_limit
from lts_server.core.usage import tolerance

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class LiveState:
    """What the gauges read at scrape time; the shell passes functions over the ledger."""

    items: Callable[[], Mapping[str, Item]]
    statuses: Callable[[], Mapping[str, ItemStatus]]
    queue_depth: Callable[[], int]
    clock: Callable[[], datetime]
    # Requests waiting for a seat, per item (lts_server/queue.py).
    seat_queues: Callable[[], Mapping[str, int]] = dict
    # PostgreSQL: batches written per path ("one_statement", "statements"; store/pg_batch.py).
    store_batches: Callable[[], Mapping[str, int]] = dict


class _LiveCollector(Collector):
    def __init__(self, live: LiveState) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        items, statuses, now = self.live.items(), self.live.statuses(), self.live.clock()
        seats_used = GaugeMetricFamily("lts_item_seats_used", "Seats (devices or servers) held on an item.",
                                       labels=["item"])
        seats_quantity = GaugeMetricFamily("lts_item_seats_quantity", "Seats an item was bought with.",
                                           labels=["item"])
        seats_limit = GaugeMetricFamily("lts_item_seats_limit", "Seats an item grants with its grace; at this "
                                        "value new devices are refused.", labels=["item"])
        units_used = GaugeMetricFamily("lts_item_units_used", "Units (scans, pages) consumed from an item.",
                                       labels=["item"])
        units_quantity = GaugeMetricFamily("lts_item_units_quantity", "Units an item was bought with.",
                                           labels=["item"])
        units_limit = GaugeMetricFamily("lts_item_units_limit", "Units an item allows with its grace; at this "
                                        "value every device is refused.", labels=["item"])
        overuse_used = GaugeMetricFamily("lts_item_overuse_slices", "Over-quantity slices an item has used of "
                                         "its overuse allowance.", labels=["item"])
        overuse_allowance = GaugeMetricFamily("lts_item_overuse_allowance_slices", "An item's overuse allowance "
                                              "(1000 x quantity).", labels=["item"])
        expiry = GaugeMetricFamily("lts_item_expiry_timestamp_seconds", "When an item expires (Unix time).",
                                   labels=["item"])
        to_expiry = GaugeMetricFamily("lts_item_seconds_to_expiry", "Seconds until an item expires; negative "
                                      "once expired (divide by 86400 for days).", labels=["item"])
        revoked = GaugeMetricFamily("lts_item_revoked", "1 when an item is revoked.", labels=["item"])
        for item_id, item in items.items():
            status = statuses.get(item_id) or ItemStatus()
            counts = item.rules.counts
            if counts is Counts.SEATS:
                seats_used.add_metric([item_id], status.seats_used)
                seats_quantity.add_metric([item_id], item.quantity)
                seats_limit.add_metric([item_id], hard_limit(item.license_type, item.quantity))
            elif counts is Counts.UNITS:
                units_used.add_metric([item_id], status.units_used)
                units_quantity.add_metric([item_id], item.quantity)
                units_limit.add_metric([item_id], hard_limit(item.license_type, item.quantity))
            elif counts in (Counts.CONCURRENCY, Counts.INSTANCES):
                overuse_used.add_metric([item_id], status.overuse_used)
                overuse_allowance.add_metric([item_id], tolerance(item.quantity))
            expiry.add_metric([item_id], item.expires_at.timestamp())
            to_expiry.add_metric([item_id], (item.expires_at - now).total_seconds())
            revoked.add_metric([item_id], int(status.revoked))
        yield from (seats_used, seats_quantity, seats_limit, units_used, units_quantity, units_limit, overuse_used,
                    overuse_allowance, expiry, to_expiry, revoked)
        depth = GaugeMetricFamily("lts_ledger_queue_depth", "Jobs waiting for the ledger's writer.")
        depth.add_metric([], self.live.queue_depth())
        yield depth
        waiting = GaugeMetricFamily("lts_item_queue_waiting", "Handshakes waiting for a seat of an item "
                                    "(waitSeconds), on this node.", labels=["item"])
        lengths = self.live.seat_queues()
        for item_id in items:
            waiting.add_metric([item_id], lengths.get(item_id, 0))
        yield waiting
        batches = CounterMetricFamily("lts_store_batches", "Ledger commits on PostgreSQL by how they were sent: "
                                      "one_statement (one round trip) or statements.", labels=["path"])
        for path, n in sorted(self.live.store_batches().items()):
            batches.add_metric([path], n)
        yield batches


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.handshakes = Counter("lts_handshakes", "Handshake requests by outcome (granted, refused, invalid, "
                                  "unavailable, error) and licensing error code (0 when granted).",
                                  ["outcome", "code"], registry=r)
        self.handshake_latency = Histogram("lts_handshake_duration_seconds", "Time to answer a handshake.",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.usage_reports = Counter("lts_usage_reports", "Usage reports by outcome (accepted, duplicate, "
                                     "refused, invalid, unavailable, error).", ["outcome"], registry=r)
        self.usage_records = Counter("lts_usage_records", "Usage records accepted.", registry=r)
        self.imports = Counter("lts_imports", "License files processed by result (imported, renewed, unchanged, "
                               "rejected).", ["result"], registry=r)
        self.commit_events = Histogram("lts_commit_batch_events", "Events made durable per ledger commit.",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.commit_latency = Histogram("lts_commit_duration_seconds", "Time one ledger commit takes.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.alert_deliveries = Counter("lts_alert_deliveries", "Alert deliveries by channel (email, webhook) "
                                        "and result (sent, failed: a failed try is retried).",
                                        ["channel", "result"], registry=r)
        self.alerts = Counter("lts_alerts", "Notifications raised by alert checks (type alert or test).",
                              ["type"], registry=r)
        self.alert_checks = Counter("lts_alert_checks", "Alert checks run.", registry=r)
        self.returns = Counter("lts_borrow_returns", "Returns of borrowed seats by outcome (granted: answered "
                               "200, refused, invalid, unavailable, error).", ["outcome"], registry=r)
        self.alert_check_latency = Histogram("lts_alert_check_duration_seconds", "Time one alert check takes.",
                                             buckets=LATENCY_BUCKETS, registry=r)

        # Series known in advance start at 0, so rate() and alert rules work before the first event.
        # Bound once: looking a child up by its labels costs microseconds on every granted handshake.
        self.handshakes_granted = self.handshakes.labels("granted", "0")
        for outcome in ("accepted", "duplicate", "refused", "invalid", "unavailable", "error"):
            self.usage_reports.labels(outcome)
        for result in ("imported", "renewed", "unchanged", "rejected"):
            self.imports.labels(result)
        for channel in ("email", "webhook"):
            for result in ("sent", "failed"):
                self.alert_deliveries.labels(channel, result)
        for kind in ("alert", "test"):
            self.alerts.labels(kind)

    def watch(self, live: LiveState) -> None:
        self.registry.register(_LiveCollector(live))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
