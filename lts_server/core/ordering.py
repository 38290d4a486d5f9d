"""License usage order: which of a handshake code's items is consumed first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lts_server.core.model import Counts, Item

# Least restrictive first: an unlimited permit before one that limits
# concurrency, before a consumable quota, before a seat held for a period.
RESTRICTIVENESS: dict[Counts, int] = {
    Counts.NOTHING: 0,
    Counts.CONCURRENCY: 1,
    Counts.INSTANCES: 2,
    Counts.UNITS: 3,
    Counts.SEATS: 4,
}


def specificity(item: Item) -> int:
    """How narrowly the permit is bound: an edition or a domain makes it more specific."""
    return (item.edition is not None) + (item.domain is not None)


def default_key(item: Item) -> tuple:
    """Closest expiry first; then the most specific; then the least restrictive; then the largest."""
    return (
        item.expires_at,
        -specificity(item),
        RESTRICTIVENESS[item.rules.counts],
        -item.quantity,
        item.item_id,
    )


def usage_order(item_ids: Iterable[str], items: Mapping[str, Item], custom: bool) -> list[str]:
    """The code's item ids in the order a handshake tries them.

    A custom order is kept as given. The default order sorts the items that
    exist; ids of missing items go last, so the walk can report them (124).
    """
    ids = list(item_ids)
    if custom:
        return ids
    present = sorted((i for i in ids if i in items), key=lambda i: default_key(items[i]))
    return present + [i for i in ids if i not in items]
