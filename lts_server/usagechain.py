"""The usage chain: every event commits to its predecessor, so a gap, an edit or a reorder shows.

Each writer appends to a chain of its own: SQLite has one writer, so one chain; on PostgreSQL every
node process (each worker is a node) has one, named by the node's id in its state folder and its
worker number, and continues it after a restart from the head stored in `usage_chains`. So the
chain never depends on a cluster-wide commit order: nodes that commit in parallel extend different
chains. Within a chain:

    hash(0) = SHA-256("lts-usage-chain-1" 0x00 server UUID 0x00 chain number)      (genesis)
    hash(n) = SHA-256(hash(n-1) || body(n))

where body(n) is the event's canonical line (`line`): a compact JSON array of the chain number,
n, and the event's columns. The head (n, hash(n)) is updated in the same transaction as the events,
with `WHERE seq = <the head this writer knew>`: two processes that find themselves on one chain
(a misconfiguration) still extend it one after the other, never both from the same head.

A usage statement (lts_server/statements.py) hands a vendor the bodies and hashes of each chain's
segment since the previous statement's heads; docs/authorization-format.md says how to check it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from lts_server.store import StoreError

# store/sql.py runs `append` in every batch's transaction and imports this module: the statement types are
# reached through the module at call time.
from lts_server.store import sql as _sql

GENESIS_TAG = b"lts-usage-chain-1"
# Rows of events as the store inserts them: at_ms, type, code, item_id, client_uuid, product,
# deployment_type, result, detail (compact JSON text or None), units, instances.
Row = tuple[Any, ...]
_encode = msgspec.json.Encoder().encode
_Raw = msgspec.Raw
_sha256 = hashlib.sha256
# Tries to extend a head another process moved meanwhile (only when two processes share a chain).
APPEND_TRIES = 5


@dataclass(frozen=True)
class Head:
    chain: int
    name: str
    seq: int
    hash: bytes


def genesis(server_uuid: str, chain: int) -> bytes:
    return hashlib.sha256(GENESIS_TAG + b"\x00" + server_uuid.encode() + b"\x00" + str(chain).encode()).digest()


def line(chain: int, chain_seq: int, row: Row) -> bytes:
    """The canonical bytes of one event: [chain, chainSeq, atMs, type, code, itemId, clientUuid, product,
    deploymentType, result, units, instances, detail], compact JSON, UTF-8, the detail as its stored JSON."""
    at_ms, kind, code, item_id, client, product, deployment, result, detail, units, instances = row
    return _encode((chain, chain_seq, at_ms, kind, code, item_id, client, product, deployment, result, units,
                    instances, None if detail is None else _Raw(detail.encode() if isinstance(detail, str) else detail)))


def link(previous: bytes, body: bytes) -> bytes:
    return _sha256(previous + body).digest()


def linked(head: Head, rows: Sequence[Row]) -> tuple[Head, list[Row]]:
    """The rows linked onto the chain after `head` (with their chain, chain_seq and hash), and the new head."""
    chain, seq, digest = head.chain, head.seq, head.hash
    out = []
    for row in rows:
        seq += 1
        digest = _sha256(digest + line(chain, seq, row)).digest()
        out.append((*row, chain, seq, digest))
    return Head(chain, head.name, seq, digest), out


def append(head: Head, rows: Sequence[Row], now_ms: int) -> _sql.Procedure[tuple[Head, list[Row]]]:
    """Link the rows onto the chain and move its head, in the caller's transaction; returns the new head
    and the rows with their chain, chain_seq and hash."""
    for _ in range(APPEND_TRIES):
        moved, out = linked(head, rows)
        if (yield _sql.Exec("UPDATE usage_chains SET seq = ?, head = ?, updated_ms = ? WHERE chain = ? AND seq = ?",
                       (moved.seq, moved.hash, now_ms, head.chain, head.seq))) == 1:
            return moved, out
        found = yield _sql.Query("SELECT seq, head FROM usage_chains WHERE chain = ?", (head.chain,))
        if not found:
            raise StoreError(f"usage chain {head.chain} ({head.name}) is missing from usage_chains")
        head = Head(head.chain, head.name, found[0][0], bytes(found[0][1]))
    raise StoreError(f"usage chain {head.chain} ({head.name}) keeps moving under this writer: another process writes "
                     "it; give each node its own storage.state_dir")


def claim(name: str, server_uuid: str, now_ms: int) -> _sql.Procedure[Head]:
    """The chain named `name`, created (with the next free number) when this is its first writer."""
    for _ in range(APPEND_TRIES):
        rows = yield _sql.Query("SELECT chain, seq, head FROM usage_chains WHERE name = ?", (name,))
        if rows:
            return Head(rows[0][0], name, rows[0][1], bytes(rows[0][2]))
        number = (yield _sql.Query("SELECT COALESCE(MAX(chain), 0) + 1 FROM usage_chains"))[0][0]
        yield _sql.Exec("INSERT INTO usage_chains (chain, name, seq, head, created_ms, updated_ms) VALUES (?,?,?,?,?,?)"
                   " ON CONFLICT DO NOTHING", (number, name, 0, genesis(server_uuid, number), now_ms, now_ms))
    raise StoreError(f"cannot register usage chain {name}")


def heads() -> _sql.Procedure[dict[int, Head]]:
    return {r[0]: Head(r[0], r[1], r[2], bytes(r[3]))
            for r in (yield _sql.Query("SELECT chain, name, seq, head FROM usage_chains ORDER BY chain"))}
