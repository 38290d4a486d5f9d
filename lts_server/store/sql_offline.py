"""The SQL of borrowing and of seat limits per code (issue 25), as procedures that both stores run.

- `code_item_limits` holds each code's reserved seats and cap on an item and the seats it holds;
  `items.seats_reserved_unused` the sum of the unused reservations, so that a claim of a code without a
  reservation checks one row: seats_used + seats_reserved_unused < limit (core/reservations.py).
- `borrow_slices` holds borrows the statistics still count slice by slice (`count_borrowed_slices`).
"""

from __future__ import annotations

from lts_server.core.model import SeatLimit
from lts_server.core.usage import SLICE_MS, EventFacts, bucket_start
from lts_server.core.times import to_ms
from lts_server.store import BorrowSpan, CodeLimits, Conflict, RollupResult, SeatChange
from lts_server.store import sql

# Borrowed slices marked per call at most (a long downtime leaves many): the caller calls again.
SLICES_PER_CALL = 10_000
_UNUSED = ("SELECT COALESCE(SUM(CASE WHEN reserved_seats > seats_used THEN reserved_seats - seats_used ELSE 0 END), 0)"
           " FROM code_item_limits WHERE item_id = ?")


def load_code_limits() -> sql.Procedure[tuple[dict[str, tuple[SeatLimit, ...]], dict[tuple[str, str], int]]]:
    """Every code's seat limits (code -> limits) and the seats each holds ((code, item) -> seats)."""
    limits: dict[str, list[SeatLimit]] = {}
    held: dict[tuple[str, str], int] = {}
    for code, item_id, reserved, cap, used in (yield sql.Query(
            "SELECT code_name, item_id, reserved_seats, max_seats, seats_used FROM code_item_limits"
            " ORDER BY code_name, item_id")):
        limits.setdefault(code, []).append(SeatLimit(item_id, reserved, cap))
        held[(code, item_id)] = used
    return {code: tuple(found) for code, found in limits.items()}, held


def code_seat_counts(items: set[str]) -> sql.Procedure[dict[tuple[str, str], int]]:
    """(code, item) -> seats held, for the codes with seat limits on these items."""
    if not items:
        return {}
    rows = yield from sql._select_in("SELECT code_name, item_id, seats_used FROM code_item_limits WHERE item_id", items)
    return {(r[0], r[1]): r[2] for r in rows}


def write_code_limits(change: CodeLimits) -> sql.Procedure[None]:
    """A code's limits on the items named: set (the seats it holds counted from the seats table) or removed;
    then each item's sum of unused reservations again."""
    wanted = {lim.item_id: lim for lim in change.limits}
    for item_id in change.items:
        lim = wanted.get(item_id)
        if lim is None:
            yield sql.Exec("DELETE FROM code_item_limits WHERE code_name = ? AND item_id = ?", (change.code, item_id))
        else:
            yield sql.Exec(
                "INSERT INTO code_item_limits (code_name, item_id, reserved_seats, max_seats, seats_used)"
                " VALUES (?, ?, ?, ?, (SELECT COUNT(*) FROM seats WHERE item_id = ? AND code = ?))"
                " ON CONFLICT (code_name, item_id) DO UPDATE SET reserved_seats = excluded.reserved_seats,"
                " max_seats = excluded.max_seats",
                (change.code, item_id, lim.reserved_seats, lim.max_seats, item_id, change.code))
        yield sql.Exec(f"UPDATE items SET seats_reserved_unused = ({_UNUSED}) WHERE item_id = ?", (item_id, item_id))


def claim_code_seat(change: SeatChange) -> sql.Procedure[None]:
    """Count a claim for its code: under its cap, and a reserved seat exactly when the code has some left."""
    s = change.seat
    counted = yield sql.Exec(
        "UPDATE code_item_limits SET seats_used = seats_used + 1 WHERE code_name = ? AND item_id = ?"
        " AND (max_seats IS NULL OR seats_used < max_seats)"
        " AND (CASE WHEN seats_used < reserved_seats THEN 1 ELSE 0 END) = ?",
        (s.code, s.item_id, int(change.reserved)))
    if counted != 1:
        raise Conflict(f"handshake code {s.code} has no seat of item {s.item_id} left under its limits", change.job)


def release_code_seat(change: SeatChange) -> sql.Procedure[None]:
    """Uncount a released seat for its code; a reserved seat given back counts as unused again."""
    s = change.seat
    yield sql.Exec("UPDATE code_item_limits SET seats_used = seats_used - 1 WHERE code_name = ? AND item_id = ?"
                   " AND seats_used > 0", (s.code, s.item_id))
    yield sql.Exec(
        "UPDATE items SET seats_used = seats_used - 1, seats_reserved_unused = seats_reserved_unused + COALESCE("
        "(SELECT CASE WHEN seats_used < reserved_seats THEN 1 ELSE 0 END FROM code_item_limits"
        " WHERE code_name = ? AND item_id = ?), 0) WHERE item_id = ?", (s.code, s.item_id, s.item_id))


def write_borrow_span(span: BorrowSpan) -> sql.Procedure[None]:
    at = to_ms(span.at)
    if span.end:
        yield sql.Exec("UPDATE borrow_slices SET until_ms = ? WHERE item_id = ? AND client_uuid = ? AND until_ms > ?",
                       (at, span.item_id, span.client_uuid, at))
        return
    extended = yield sql.Exec(
        "UPDATE borrow_slices SET until_ms = ? WHERE item_id = ? AND client_uuid = ? AND until_ms > ?",
        (to_ms(span.until), span.item_id, span.client_uuid, at))
    if not extended:
        # The slice of the borrow itself is counted by its handshake event: marking starts with the next one.
        yield sql.Exec(
            "INSERT INTO borrow_slices (item_id, client_uuid, started_ms, code, until_ms, counted_ms)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (item_id, client_uuid, started_ms) DO UPDATE SET"
            " until_ms = excluded.until_ms",
            (span.item_id, span.client_uuid, at, span.code, to_ms(span.until), bucket_start(at, "3m") + SLICE_MS))


def borrowed_count(item_id: str, now_ms: int) -> sql.Procedure[int]:
    """Seats of the item borrowed now (index seats_borrowed)."""
    return (yield sql.Query("SELECT COUNT(*) FROM seats WHERE item_id = ? AND borrowed_until_ms > ?",
                            (item_id, now_ms)))[0][0]


def count_borrowed_slices(now_ms: int, quantities: dict[str, tuple[str, int]],
                          key_ids: dict[sql.Key, int] | None = None) -> sql.Procedure[RollupResult]:
    """Mark each borrowed device active in every 3-minute slice its borrow covered that has begun by now_ms
    (as a usage record of 0 units would), so statistics and overuse count it as used while it is offline.

    Marks are the rollups' own (a device counts once per bucket), so marking a slice twice counts it once.
    """
    _, _, next_client, monthly_from, conversion = (yield sql.Query(sql.ROLLUP_STATE))[0]
    if conversion:  # the marks of the release before are still being converted: count these slices after
        return RollupResult(0, 0, {})
    rows = yield sql.Query("SELECT item_id, client_uuid, started_ms, code, until_ms, counted_ms FROM borrow_slices"
                           " WHERE counted_ms <= ? ORDER BY counted_ms", (now_ms,))
    facts: list[EventFacts] = []
    progress: list[tuple[int, str, str, int]] = []
    finished: list[tuple[str, str, int]] = []
    for item_id, client, started, code, until, counted in rows:
        slot = counted
        while slot <= now_ms and slot < until and len(facts) < SLICES_PER_CALL:
            facts.append(EventFacts(0, slot, "usage.record", code, item_id, client, None, 0, None))
            slot += SLICE_MS
        if slot >= until:
            finished.append((item_id, client, started))
        elif slot != counted:
            progress.append((slot, item_id, client, started))
        if len(facts) >= SLICES_PER_CALL:
            break
    result = RollupResult(0, 0, {})
    if facts:
        overuse, next_client = yield from sql.apply_rollup(facts, quantities, {} if key_ids is None else key_ids,
                                                           next_client, monthly_from)
        yield sql.Exec("UPDATE rollup_state SET next_client = ? WHERE id = 1", (next_client,))
        result = RollupResult(len(facts), 0, overuse)
    if progress:
        yield sql.Many("UPDATE borrow_slices SET counted_ms = ? WHERE item_id = ? AND client_uuid = ? AND started_ms = ?",
                       progress)
    if finished:
        yield sql.Many("DELETE FROM borrow_slices WHERE item_id = ? AND client_uuid = ? AND started_ms = ?", finished)
    return result
