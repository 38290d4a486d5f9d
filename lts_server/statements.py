"""Usage statements: what a licensee's server counted, in a form its vendor can check.

A statement is a text file (docs/authorization-format.md, "Usage statements"):

    LTS-USAGE-STATEMENT 1
    E <base64 hash> <canonical event line>          one per event, each chain's events in chain order
    ...
    S <base64 signature> <summary JSON>             signed by the server's identity key

It holds, for every usage chain (lts_server/usagechain.py), the segment since the previous
statement's heads, and per-item totals of those events. The server records each statement it
exports, so the next one starts exactly where it ended: a database restored from an older backup,
an event deleted, edited or moved, shows at the vendor's next check (`lts-license verify-usage`),
which names the first event where the chain breaks.

`export` runs on the server; `verify` is the vendor's check, which needs only the statement, the
license file (its serverKey) and the vendor's key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lts_server import usagechain
from lts_server.core.times import from_ms, iso, to_ms
from lts_server.identity import Identity, key_id
from lts_server.ledger import Ledger, Undo
from lts_server.store import Event, WriteBatch
from lts_server.store.postgres import EXPORT_LOCK, PostgresStore
from lts_server.store.sql_trust import ChainedEvent, StatementRow, TrustOperations, record_statement_extra

MAGIC = "LTS-USAGE-STATEMENT 1"
SUMMARY_TYPE = "lts-usage-statement"
PAGE = 2000
_compact = msgspec.json.Encoder()


class StatementError(Exception):
    """An export that cannot be made (the message says why)."""


@dataclass
class Totals:
    """Per-item counts over a statement's events (the same function on both sides)."""

    items: dict[str, dict[str, int]] = field(default_factory=dict)
    codes: dict[str, dict[str, int]] = field(default_factory=dict)
    _devices: dict[str, set[str]] = field(default_factory=dict)

    def add(self, body: list[Any]) -> None:
        # [chain, chainSeq, atMs, type, code, itemId, clientUuid, product, deploymentType, result, units, instances,
        #  detail]
        kind, code, item, client, result, units = body[3], body[4], body[5], body[6], body[9], body[10]
        if kind == "handshake":
            outcome = "granted" if result == 0 else "refused"
            if item is not None:
                self._item(item)[outcome] += 1
            if code is not None:
                counts = self.codes.setdefault(code, {"granted": 0, "refused": 0})
                counts[outcome] += 1
            if result == 0 and item is not None and client is not None:
                self._devices.setdefault(item, set()).add(client)
        elif kind == "seat.granted" and item is not None:
            self._item(item)["seatsGranted"] += 1
        elif kind == "usage.record" and item is not None:
            self._item(item)["units"] += int(units or 0)
            if client is not None:
                self._devices.setdefault(item, set()).add(client)

    def _item(self, item: str) -> dict[str, int]:
        return self.items.setdefault(item, {"granted": 0, "refused": 0, "seatsGranted": 0, "units": 0, "devices": 0})

    def to_json(self) -> dict[str, Any]:
        for item, clients in self._devices.items():
            self._item(item)["devices"] = len(clients)
        return {"items": {k: self.items[k] for k in sorted(self.items)},
                "codes": {k: self.codes[k] for k in sorted(self.codes)}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def event_line(event: ChainedEvent) -> tuple[bytes, list[Any]]:
    assert event.chain is not None and event.chain_seq is not None and event.hash is not None
    body = usagechain.line(event.chain, event.chain_seq, event.row)
    return b"E " + _b64(event.hash).encode() + b" " + body + b"\n", msgspec.json.decode(body)


# -- the server's side ---------------------------------------------------------------------------------


Write = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True)
class Segment:
    chain: int
    name: str
    start: tuple[int, bytes]  # the chain position before the segment, and its hash
    upto: int  # the last chain position the segment may reach (the head when the export began)


class Exporter:
    def __init__(self, store: TrustOperations, ledger: Ledger, ident: Identity) -> None:
        self.store = store
        self.ledger = ledger
        self.identity = ident

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One export at a time, across the nodes of a cluster (a session advisory lock)."""
        if isinstance(self.store, PostgresStore):
            async with self.store.exclusive(EXPORT_LOCK):
                yield
        else:
            yield

    async def export(self, write: Write, since: datetime | None, until: datetime, now: datetime) -> StatementRow:
        """Write the next statement: every chain's events since the last statement's heads, up to the last
        event recorded before `until` (since: for the first statement only, where it starts)."""
        async with self._turn():
            previous = await self.store.latest_statement()
            segments = await self._segments(previous, since)
            await write((MAGIC + "\n").encode())
            totals = Totals()
            chains = []
            heads: dict[str, list[Any]] = {}
            starts: dict[str, list[Any]] = {}
            count = 0
            for segment in segments:
                end, n = await self._write_segment(segment, until, write, totals)
                count += n
                chains.append({"chain": segment.chain, "name": segment.name,
                               "start": {"seq": segment.start[0], "hash": _b64(segment.start[1])},
                               "end": {"seq": end[0], "hash": _b64(end[1])}, "events": n})
                starts[str(segment.chain)] = [segment.start[0], _b64(segment.start[1])]
                heads[str(segment.chain)] = [end[0], _b64(end[1])]
            statement_id = (previous.id if previous else 0) + 1
            # A statement after the first starts where the previous one ended, whatever `since` said; the
            # statement and its record (GET /api/v1/admin/usage/statements) say the same.
            start = from_ms(previous.until_ms) if previous else since
            summary = {
                "type": SUMMARY_TYPE, "format": 1, "statementId": statement_id,
                "previous": {"statementId": previous.id, "sha256": previous.sha256} if previous else None,
                "serverUuid": self.identity.server_uuid, "keyId": self.identity.key_id, "createdAt": iso(now),
                "since": iso(start) if start else None,
                "until": iso(until), "events": count, "chains": chains, **totals.to_json(),
            }
            text = _compact.encode(summary)
            signature = self.identity.sign(text)
            row = StatementRow(statement_id, to_ms(now), to_ms(start) if start else None, to_ms(until),
                               previous.id if previous else None, starts, heads, text.decode(), signature,
                               hashlib.sha256(text).hexdigest())
            await self._record(row, count)
            await write(b"S " + signature.encode() + b" " + text + b"\n")
            return row

    async def again(self, row: StatementRow, write: Write) -> None:
        """Write an exported statement once more (the same bytes), from its recorded heads."""
        await write((MAGIC + "\n").encode())
        for chain, (end_seq, _end_hash) in sorted(row.heads.items(), key=lambda kv: int(kv[0])):
            after = row.start_heads[chain][0]
            while after < end_seq:
                page = await self.store.chain_page(int(chain), after, end_seq, PAGE)
                if not page:
                    raise StatementError(f"chain {chain}: events after {after} are no longer in the database "
                                         "(archived or deleted): this statement cannot be written again")
                await write(b"".join(event_line(e)[0] for e in page))
                after = page[-1].chain_seq or after
        await write(b"S " + row.signature.encode() + b" " + row.summary.encode() + b"\n")

    async def _segments(self, previous: StatementRow | None, since: datetime | None) -> list[Segment]:
        segments = []
        for chain, head in (await self.store.chain_heads()).items():
            if previous is not None:
                known = previous.heads.get(str(chain))
                start = (known[0], base64.b64decode(known[1])) if known else (0, usagechain.genesis(
                    self.identity.server_uuid, chain))
            elif since is not None:
                before = await self.store.first_in_chain(chain, to_ms(since))
                start = await self._position(chain, before if before is not None else head.seq, head)
            else:
                oldest = await self.store.oldest_in_chain(chain)
                start = await self._position(chain, oldest[0] - 1 if oldest else head.seq, head)
            segments.append(Segment(chain, head.name, start, head.seq))
        return segments

    async def _position(self, chain: int, seq: int, head: usagechain.Head) -> tuple[int, bytes]:
        """A chain position and its hash: the genesis, the head, or an event still in the log (else the next one)."""
        if seq <= 0:
            return 0, usagechain.genesis(self.identity.server_uuid, chain)
        if seq == head.seq:
            return seq, head.hash
        found = await self.store.event_hash(chain, seq)
        if found is not None:
            return seq, found
        # That event left the log (archived before any statement): start after the first one still there.
        return await self._position(chain, seq + 1, head)

    async def _write_segment(self, segment: Segment, until: datetime, write: Write,
                             totals: Totals) -> tuple[tuple[int, bytes], int]:
        """The segment's events recorded up to `until`, in chain order; returns the end position and the count.

        An event is "recorded" at its time, except a usage record, whose time is its slot: it is recorded with
        the usage.report event that follows it in its chain (the same job), so the cut never splits a report."""
        until_ms = to_ms(until)
        end = segment.start
        count = 0
        held: list[ChainedEvent] = []  # usage records waiting for their report's event
        after = segment.start[0]
        while after < segment.upto:
            page = await self.store.chain_page(segment.chain, after, segment.upto, PAGE)
            if not page:
                break  # the rest was deleted from the log: the vendor's check names where
            chunk: list[bytes] = []
            for event in page:
                after = event.chain_seq or after
                if event.stored.event.type == "usage.record":
                    held.append(event)
                    continue
                if to_ms(event.stored.event.at) > until_ms:
                    await write(b"".join(chunk))
                    return end, count
                for e in (*held, event):
                    line, body = event_line(e)
                    chunk.append(line)
                    totals.add(body)
                    count += 1
                    end = (e.chain_seq or 0, e.hash or b"")
                held = []
            await write(b"".join(chunk))
        return end, count

    async def _record(self, row: StatementRow, events: int) -> None:
        """The statement's row and its event, in one transaction through the ledger (so in the chain)."""

        def run(now: datetime, batch: WriteBatch, undo: Undo) -> None:
            batch.extras.append(record_statement_extra(row, batch.job))
            batch.events.append(Event(at=now, type="usage.statement", detail={
                "statementId": row.id, "sha256": row.sha256, "events": events, "until": iso(from_ms(row.until_ms))}))

        await self.ledger.submit(run)


# -- the vendor's side ---------------------------------------------------------------------------------


class Broken(Exception):
    """The statement does not hold: the message names the first place (line, chain, event) where it breaks."""


@dataclass(frozen=True)
class Checked:
    summary: dict[str, Any]
    summary_bytes: bytes
    # (chain, chainSeq) -> hash, for comparing a later statement with this one
    hashes: dict[tuple[int, int], bytes]


def read_lines(data: bytes) -> list[bytes]:
    if not data.startswith(MAGIC.encode() + b"\n"):
        raise Broken(f"not a usage statement: the first line must be {MAGIC!r}")
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise Broken(f"truncated: line {len(lines)} does not end (the file is incomplete)")
    return lines[1:-1]


def _summary(line: bytes, number: int, server_key: Ed25519PublicKey) -> tuple[dict[str, Any], bytes]:
    parts = line.split(b" ", 2)
    if len(parts) != 3 or parts[0] != b"S":
        raise Broken(f"truncated: the last line ({number}) is not the signed summary (the file is incomplete)")
    text = parts[2]
    try:
        server_key.verify(base64.b64decode(parts[1], validate=True), text)
    except (ValueError, binascii.Error, InvalidSignature):
        raise Broken(f"line {number}: the summary's signature does not verify with the license's serverKey "
                     "(altered, or signed by another server)") from None
    try:
        summary = json.loads(text)
    except ValueError as e:
        raise Broken(f"line {number}: the summary is not JSON: {e}") from None
    if not isinstance(summary, dict) or summary.get("type") != SUMMARY_TYPE or summary.get("format") != 1:
        raise Broken(f"line {number}: not a version-1 usage statement summary")
    return summary, text


def verify(data: bytes, server_uuid: str, server_key: Ed25519PublicKey, previous: Checked | None = None) -> Checked:
    """Check a statement against the licensed server (from the license file) and, when given, the previous
    statement; raise Broken naming the first problem."""
    lines = read_lines(data)
    if not lines:
        raise Broken("truncated: the statement has no summary line")
    summary, summary_bytes = _summary(lines[-1], len(lines) + 1, server_key)
    if summary.get("serverUuid") != server_uuid:
        raise Broken(f"the statement is from server {summary.get('serverUuid')}; the license is bound to server "
                     f"{server_uuid}")
    if summary.get("keyId") != key_id(server_key):
        raise Broken(f"the summary names key {summary.get('keyId')}, the license binds key {key_id(server_key)}")
    try:
        chains = {int(c["chain"]): c for c in summary["chains"]}
        state = {n: (int(c["start"]["seq"]), base64.b64decode(c["start"]["hash"])) for n, c in chains.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise Broken(f"the summary's chains are malformed: {e}") from None
    totals = Totals()
    hashes: dict[tuple[int, int], bytes] = {}
    overlap: str | None = None  # the first event the previous statement already held
    for number, line in enumerate(lines[:-1], start=2):
        parts = line.split(b" ", 2)
        if len(parts) != 3 or parts[0] != b"E":
            raise Broken(f"line {number}: not an event line ('E <hash> <event>')")
        try:
            stated = base64.b64decode(parts[1], validate=True)
            body = json.loads(parts[2])
            chain, seq = int(body[0]), int(body[1])
        except (ValueError, binascii.Error, TypeError, IndexError, KeyError) as e:
            raise Broken(f"line {number}: malformed event line: {e}") from None
        where = f"event {chain}:{seq} (line {number})"
        if chain not in state:
            raise Broken(f"{where}: chain {chain} is not in the summary")
        last, last_hash = state[chain]
        if seq <= last:
            raise Broken(f"{where}: comes after event {chain}:{last}: events are out of order (moved or swapped)")
        if seq > last + 1:
            raise Broken(f"{where}: follows event {chain}:{last}: event {chain}:{last + 1} is missing (deleted)")
        if usagechain.link(last_hash, parts[2]) != stated:
            raise Broken(f"{where}: its content does not match its hash (edited, swapped with another event, or "
                         "not the event that followed the one before)")
        state[chain] = (seq, stated)
        hashes[(chain, seq)] = stated
        totals.add(body)
        if previous is not None and (chain, seq) in previous.hashes:
            if previous.hashes[(chain, seq)] != stated:
                raise Broken(f"{where}: the previous statement holds another event at this place: the chain was "
                             "rewound (a database restored from an older backup, or rewritten) and went on "
                             "differently from here")
            overlap = overlap or where
    for n, c in chains.items():
        seq, digest = state[n]
        end_seq, end_hash = int(c["end"]["seq"]), base64.b64decode(c["end"]["hash"])
        if seq != end_seq:
            raise Broken(f"chain {n} ends at event {n}:{seq}; the summary says {n}:{end_seq}: event {n}:{seq + 1}"
                         " and later are missing (deleted)")
        if digest != end_hash:
            raise Broken(f"chain {n}: the last event's hash is not the summary's end hash")
    if previous is not None:
        _continues(summary, previous, overlap, lines)
    counted = totals.to_json()
    if {"items": summary.get("items"), "codes": summary.get("codes")} != counted:
        raise Broken("the summary's totals do not match its events")
    return Checked(summary, summary_bytes, hashes)


def _first_event(lines: list[bytes], chain: int) -> str:
    for number, line in enumerate(lines[:-1], start=2):
        with contextlib.suppress(ValueError, IndexError, TypeError):
            body = json.loads(line.split(b" ", 2)[2])
            if int(body[0]) == chain:
                return f"; its first event is {chain}:{body[1]} (line {number})"
    return ""


def _continues(summary: dict[str, Any], previous: Checked, overlap: str | None, lines: list[bytes]) -> None:
    prev = previous.summary
    for c in prev["chains"]:
        mine = next((m for m in summary["chains"] if m["chain"] == c["chain"]), None)
        if mine is None:
            raise Broken(f"chain {c['chain']} of the previous statement is missing")
        if mine["start"] != c["end"]:
            start, end = int(mine["start"]["seq"]), int(c["end"]["seq"])
            if start > end:
                raise Broken(f"chain {c['chain']}: the statement starts after event {c['chain']}:{start}, the previous "
                             f"ended at {c['chain']}:{end}: events {c['chain']}:{end + 1} to {c['chain']}:{start} are "
                             "in no statement")
            first = f"; {overlap} was in it already" if overlap else _first_event(lines, int(c["chain"]))
            raise Broken(f"chain {c['chain']}: the statement starts after event {c['chain']}:{start}, before the end "
                         f"of the previous statement ({c['chain']}:{end}): an older statement replayed, or a database "
                         f"restored from a backup{first}")
    expected = {"statementId": prev["statementId"], "sha256": hashlib.sha256(previous.summary_bytes).hexdigest()}
    if summary.get("previous") != expected:
        raise Broken(f"statement {summary.get('statementId')} does not name the previous statement "
                     f"{prev['statementId']} as its predecessor (it names {summary.get('previous')})")


def totals_table(summary: dict[str, Any], licensed: Iterable[str]) -> str:
    mine = set(licensed)
    rows = [("item", "granted", "refused", "new seats", "units", "devices")]
    for item, t in summary["items"].items():
        rows.append((item + ("" if item in mine else " (other license)"), *(f"{t[k]:,}" for k in (
            "granted", "refused", "seatsGranted", "units", "devices"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)

