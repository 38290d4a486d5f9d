"""The SQL of trust (issue 20), as procedures every store runs (see store/sql.py), and the store methods over them:
license bindings, the usage chain's heads and segments, usage statements, device bindings, the clock.

Writes that must be atomic with a ledger batch are `WriteBatch.extras` (the functions named `*_extra`);
the rest run in small transactions of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from lts_server import usagechain
from lts_server.store import Conflict, StoredEvent
from lts_server.store.sql import EVENT_COLUMNS, Exec, Many, Procedure, Query, stored_event

T = TypeVar("T")
Extra = Callable[[], Generator[Any, Any, None]]


@dataclass(frozen=True)
class BindingRow:
    license_id: str
    revision: int
    key_id: str
    statement: str  # base64
    signature: str  # base64
    item_ids: tuple[str, ...]


@dataclass(frozen=True)
class ClockRow:
    latest_ms: int
    floor_ms: int
    accepted_ms: int | None


@dataclass(frozen=True)
class StatementRow:
    id: int
    created_ms: int
    since_ms: int | None
    until_ms: int
    previous: int | None
    start_heads: dict[str, list[Any]]  # chain -> [chainSeq, base64 hash, event seq]
    heads: dict[str, list[Any]]
    summary: str
    signature: str
    sha256: str


@dataclass(frozen=True)
class ChainedEvent:
    """One event with its place in its chain."""

    stored: StoredEvent
    chain: int | None
    chain_seq: int | None
    hash: bytes | None
    row: tuple[Any, ...]  # the columns its canonical line is made of (usagechain.Row)


@dataclass(frozen=True)
class CloneRow:
    client_uuid: str
    bound_ms: int
    clone_ms: int | None
    clones: int


# -- license bindings --------------------------------------------------------------------------------


def bindings_extra(rows: list[BindingRow]) -> Extra:
    def write() -> Procedure[None]:
        yield Many("INSERT INTO license_bindings (license_id, revision, key_id, statement, signature, item_ids)"
                   " VALUES (?,?,?,?,?,?) ON CONFLICT (license_id, revision) DO NOTHING",
                   [(r.license_id, r.revision, r.key_id, r.statement, r.signature, json.dumps(list(r.item_ids)))
                    for r in rows])
    return write


def load_bindings() -> Procedure[list[BindingRow]]:
    rows = yield Query("SELECT license_id, revision, key_id, statement, signature, item_ids FROM license_bindings"
                       " ORDER BY license_id, revision")
    return [BindingRow(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5]))) for r in rows]


# -- device bindings (clone detection) ----------------------------------------------------------------


def bind_device_extra(client_uuid: str, fingerprint: str, at_ms: int, job: int) -> Extra:
    def write() -> Procedure[None]:
        done = yield Exec("INSERT INTO device_bindings (client_uuid, fingerprint, bound_ms) VALUES (?,?,?)"
                          " ON CONFLICT (client_uuid) DO NOTHING", (client_uuid, fingerprint, at_ms))
        if done != 1:  # bound meanwhile through another node: decided again on the row as it is now
            raise Conflict(f"device {client_uuid} was bound to a fingerprint meanwhile", job)
    return write


def clone_extra(client_uuid: str, at_ms: int) -> Extra:
    def write() -> Procedure[None]:
        yield Exec("UPDATE device_bindings SET clone_ms = ?, clones = clones + 1 WHERE client_uuid = ?",
                   (at_ms, client_uuid))
    return write


def unbind_device_extra(client_uuid: str) -> Extra:
    def write() -> Procedure[None]:
        yield Exec("DELETE FROM device_bindings WHERE client_uuid = ?", (client_uuid,))
    return write


def device_binding(client_uuid: str) -> Procedure[CloneRow | None]:
    rows = yield Query("SELECT client_uuid, bound_ms, clone_ms, clones FROM device_bindings WHERE client_uuid = ?",
                       (client_uuid,))
    return CloneRow(*rows[0]) if rows else None


def recent_clones(since_ms: int, limit: int) -> Procedure[list[CloneRow]]:
    rows = yield Query("SELECT client_uuid, bound_ms, clone_ms, clones FROM device_bindings WHERE clone_ms >= ?"
                       " ORDER BY clone_ms DESC LIMIT ?", (since_ms, limit))
    return [CloneRow(*r) for r in rows]


# -- authorizations that end --------------------------------------------------------------------------


def end_authorizations_extra(*, client_uuid: str | None = None, item_ids: tuple[str, ...] = (),
                             code: str | None = None) -> Extra:
    """Delete the authorizations a release or a code's deletion ends: their report keys die with them
    (by the authorizations' key or their client_uuid index, never a scan)."""
    def write() -> Procedure[None]:
        if code is not None:
            yield Exec("DELETE FROM authorizations WHERE code = ?", (code,))
        if client_uuid is not None:
            for item_id in item_ids:
                yield Exec("DELETE FROM authorizations WHERE client_uuid = ? AND item_id = ?", (client_uuid, item_id))
    return write


def cutoff_extra(item_ids: tuple[str, ...], since_ms: int) -> Extra:
    """Authorizations on these items granted before since_ms have ended (a renewal replaced their license):
    one row per item, however many devices hold one."""
    def write() -> Procedure[None]:
        yield Many("INSERT INTO authorization_cutoffs (item_id, since_ms) VALUES (?,?) ON CONFLICT (item_id)"
                   " DO UPDATE SET since_ms = excluded.since_ms", [(i, since_ms) for i in item_ids])
    return write


def load_cutoffs() -> Procedure[dict[str, int]]:
    return dict((yield Query("SELECT item_id, since_ms FROM authorization_cutoffs")))


# -- the clock -----------------------------------------------------------------------------------------


def clock_tick(now_ms: int) -> Procedure[ClockRow]:
    """Record the clock (the latest time recorded only ever grows); returns the row as it is now."""
    yield Exec("INSERT INTO clock_state (id, latest_ms, floor_ms) VALUES (1, ?, 0) ON CONFLICT (id) DO UPDATE SET"
               " latest_ms = CASE WHEN excluded.latest_ms > clock_state.latest_ms THEN excluded.latest_ms"
               " ELSE clock_state.latest_ms END", (now_ms,))
    return (yield from clock_state())


def clock_state() -> Procedure[ClockRow]:
    rows = yield Query("SELECT latest_ms, floor_ms, accepted_ms FROM clock_state WHERE id = 1")
    return ClockRow(*rows[0]) if rows else ClockRow(0, 0, None)


def clock_accept_extra(now_ms: int, floor_ms: int) -> Extra:
    """The admin accepts the clock as it is: the records' latest time becomes the floor time-limited items are
    judged at, and the clock is the latest time recorded from now on."""
    def write() -> Procedure[None]:
        yield Exec("INSERT INTO clock_state (id, latest_ms, floor_ms, accepted_ms) VALUES (1, ?, ?, ?)"
                   " ON CONFLICT (id) DO UPDATE SET latest_ms = excluded.latest_ms,"
                   " floor_ms = CASE WHEN excluded.floor_ms > clock_state.floor_ms THEN excluded.floor_ms"
                   " ELSE clock_state.floor_ms END, accepted_ms = excluded.accepted_ms", (now_ms, floor_ms, now_ms))
    return write


# -- the usage chain and statements --------------------------------------------------------------------


CHAIN_COLUMNS = f"{EVENT_COLUMNS}, chain, chain_seq, hash"


def chained_event(r: tuple[Any, ...]) -> ChainedEvent:
    # EVENT_COLUMNS: seq, at_ms, type, code, item_id, client_uuid, product, deployment_type, result, detail,
    # units, instances; the canonical line takes at_ms .. detail, units, instances.
    row = (r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11])
    return ChainedEvent(stored_event(r[:12]), r[12], r[13], bytes(r[14]) if r[14] is not None else None, row)


def chain_page(chain: int, after: int, upto: int, limit: int) -> Procedure[list[ChainedEvent]]:
    """Events of one chain with after < chain_seq <= upto, in chain order (index events_chain)."""
    rows = yield Query(f"SELECT {CHAIN_COLUMNS} FROM events WHERE chain = ? AND chain_seq > ? AND chain_seq <= ?"
                       " ORDER BY chain_seq LIMIT ?", (chain, after, upto, limit))
    return [chained_event(r) for r in rows]


def first_in_chain(chain: int, since_ms: int) -> Procedure[int | None]:
    """The chain position before the first event still in the log stamped at or after since_ms."""
    rows = yield Query("SELECT MIN(chain_seq) FROM events WHERE chain = ? AND at_ms >= ?", (chain, since_ms))
    return rows[0][0] - 1 if rows and rows[0][0] is not None else None


def oldest_in_chain(chain: int) -> Procedure[tuple[int, bytes] | None]:
    """The first event of the chain still in the log: (its chain_seq, the hash of its predecessor or None)."""
    rows = yield Query("SELECT chain_seq FROM events WHERE chain = ? ORDER BY chain_seq LIMIT 1", (chain,))
    if not rows:
        return None
    first = rows[0][0]
    before = yield Query("SELECT hash FROM events WHERE chain = ? AND chain_seq = ?", (chain, first - 1))
    return first, bytes(before[0][0]) if before else b""


def event_hash(chain: int, chain_seq: int) -> Procedure[bytes | None]:
    rows = yield Query("SELECT hash FROM events WHERE chain = ? AND chain_seq = ?", (chain, chain_seq))
    return bytes(rows[0][0]) if rows else None


STATEMENT_COLUMNS = "id, created_ms, since_ms, until_ms, previous, start_heads, heads, summary, signature, sha256"


def _statement(r: tuple[Any, ...]) -> StatementRow:
    return StatementRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), r[7], r[8], r[9])


def latest_statement() -> Procedure[StatementRow | None]:
    rows = yield Query(f"SELECT {STATEMENT_COLUMNS} FROM usage_statements ORDER BY id DESC LIMIT 1")
    return _statement(rows[0]) if rows else None


def statement(statement_id: int) -> Procedure[StatementRow | None]:
    rows = yield Query(f"SELECT {STATEMENT_COLUMNS} FROM usage_statements WHERE id = ?", (statement_id,))
    return _statement(rows[0]) if rows else None


def statements() -> Procedure[list[StatementRow]]:
    return [_statement(r) for r in (yield Query(f"SELECT {STATEMENT_COLUMNS} FROM usage_statements ORDER BY id"))]


def record_statement_extra(row: StatementRow, job: int) -> Extra:
    def write() -> Procedure[None]:
        latest = yield Query("SELECT MAX(id) FROM usage_statements")
        if (latest[0][0] if latest else None) != row.previous:
            raise Conflict("another usage statement was exported meanwhile: export again", job)
        yield Exec(f"INSERT INTO usage_statements ({STATEMENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (row.id, row.created_ms, row.since_ms, row.until_ms, row.previous, json.dumps(row.start_heads),
                    json.dumps(row.heads), row.summary, row.signature, row.sha256))
    return write


class TrustOperations:
    """The store methods over these procedures, mixed into both stores (they supply `_call`)."""

    CHAIN_LOCK: int | None = None

    async def _call(self, proc: Procedure[T], lock: int | None = None, busy: Callable[[], T] | None = None) -> T:
        raise NotImplementedError

    async def load_bindings(self) -> list[BindingRow]:
        return await self._call(load_bindings())

    async def load_cutoffs(self) -> dict[str, int]:
        return await self._call(load_cutoffs())

    async def claim_chain(self, name: str, server_uuid: str, now_ms: int) -> usagechain.Head:
        return await self._call(usagechain.claim(name, server_uuid, now_ms), self.CHAIN_LOCK)

    async def chain_heads(self) -> dict[int, usagechain.Head]:
        return await self._call(usagechain.heads())

    async def chain_page(self, chain: int, after: int, upto: int, limit: int) -> list[ChainedEvent]:
        return await self._call(chain_page(chain, after, upto, limit))

    async def first_in_chain(self, chain: int, since_ms: int) -> int | None:
        return await self._call(first_in_chain(chain, since_ms))

    async def oldest_in_chain(self, chain: int) -> tuple[int, bytes] | None:
        return await self._call(oldest_in_chain(chain))

    async def event_hash(self, chain: int, chain_seq: int) -> bytes | None:
        return await self._call(event_hash(chain, chain_seq))

    async def latest_statement(self) -> StatementRow | None:
        return await self._call(latest_statement())

    async def statement(self, statement_id: int) -> StatementRow | None:
        return await self._call(statement(statement_id))

    async def statements(self) -> list[StatementRow]:
        return await self._call(statements())

    async def clock_tick(self, now_ms: int) -> ClockRow:
        return await self._call(clock_tick(now_ms))

    async def clock_state(self) -> ClockRow:
        return await self._call(clock_state())

    async def device_binding(self, client_uuid: str) -> CloneRow | None:
        return await self._call(device_binding(client_uuid))

    async def recent_clones(self, since_ms: int, limit: int = 100) -> list[CloneRow]:
        return await self._call(recent_clones(since_ms, limit))
