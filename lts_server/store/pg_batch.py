"""A plain batch of the ledger as one PostgreSQL statement: one round trip, whatever the number of grants.

A plain batch (`plain`) holds only what the handshakes and usage reports of devices make in the common
case: seat claims, refreshes and releases of codes without reservations or caps on the item, their
authorizations, usage reports, unit charges and events (linked onto the node's usage chain). Its arrays,
one per column, are unnested into data-modifying CTEs (authorizations, events) and handed to
`lts_write_v3` (store/pg_functions.sql) for what must be checked change by change. The statement text
never changes (its arrays do), so asyncpg prepares it once per connection; outside an explicit
transaction it is its own transaction, so the commit costs no round trip of its own.

Every other batch (imports and admin changes, a code's reservation or cap, borrowing, a device's
fingerprint binding or clone, authorizations ended, usage statements) is written by store/sql.py
`write_batch`, statement by statement, in one transaction: the same rows, more round trips.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from importlib import resources
from typing import Any

from lts_server import usagechain
from lts_server.core.times import to_ms, utcnow
from lts_server.store import SeatOp, WriteBatch
from lts_server.store.sql import event_rows
from lts_server.store.sql_leases import Leasing

_OPS = {SeatOp.CLAIM: 1, SeatOp.REFRESH: 2, SeatOp.RELEASE: 3}
# The function's arguments after the node: (name, PostgreSQL type), in order.
_FUNCTION_ARGS = (
    ("s_op", "smallint[]"), ("s_item", "text[]"), ("s_client", "text[]"), ("s_granted", "bigint[]"),
    ("s_refreshed", "bigint[]"), ("s_expires", "bigint[]"), ("s_code", "text[]"), ("s_borrowed", "bigint[]"),
    ("s_limit", "integer[]"), ("s_job", "integer[]"), ("s_block", "integer[]"), ("s_held", "boolean[]"),
    ("s_excl", "text[]"),
    ("r_id", "text[]"), ("r_client", "text[]"), ("r_code", "text[]"), ("r_received", "bigint[]"),
    ("r_job", "integer[]"),
    ("u_item", "text[]"), ("u_units", "bigint[]"),
    ("c_chain", "bigint"), ("c_old", "bigint"), ("c_new", "bigint"), ("c_hash", "bytea"), ("c_now", "bigint"),
)
_AUTH_COLUMNS = (("code", "text"), ("client_uuid", "text"), ("item_id", "text"), ("instances", "integer"),
                 ("granted_ms", "bigint"), ("expires_ms", "bigint"))
_EVENT_COLUMNS = (("at_ms", "bigint"), ("type", "text"), ("code", "text"), ("item_id", "text"),
                  ("client_uuid", "text"), ("product", "text"), ("deployment_type", "text"), ("result", "integer"),
                  ("detail", "text"), ("units", "bigint"), ("instances", "integer"))
_CHAIN_COLUMNS = (("chain", "bigint"), ("chain_seq", "bigint"), ("hash", "bytea"))
# The fields of a plain batch; any other field set makes the batch go the general way.
_PLAIN_FIELDS = {"seat_changes", "authorizations", "usage_reports", "unit_charges", "events", "at", "job",
                 "job_starts"}
# SQLSTATEs lts_write_v3 raises: a job's change refused (DETAIL: the job's index); the chain's head moved.
CONFLICT = "LT409"
CHAIN_MOVED = "LT412"


def functions_sql() -> str:
    return (resources.files("lts_server.store") / "pg_functions.sql").read_text(encoding="utf-8")


def plain(b: WriteBatch) -> bool:
    """Whether the batch can be the one statement: only the plain rows, no seat change of a code with
    limits on its item (their counters are written the general way)."""
    return (all(not getattr(b, f.name) for f in dataclasses.fields(b) if f.name not in _PLAIN_FIELDS)
            and not any(c.limited or c.reserved for c in b.seat_changes))


@lru_cache(maxsize=2)
def statement(chained: bool) -> str:
    n = 1  # $1 is the node

    def take(columns: tuple[tuple[str, str], ...]) -> list[str]:
        nonlocal n
        out = []
        for _, kind in columns:
            n += 1
            out.append(f"${n}::{kind}")
        return out

    function = take(_FUNCTION_ARGS)
    auth = take(tuple((c, f"{t}[]") for c, t in _AUTH_COLUMNS))
    event_columns = _EVENT_COLUMNS + (_CHAIN_COLUMNS if chained else ())
    events = take(tuple((c, f"{t}[]") for c, t in event_columns))
    auth_names = ", ".join(c for c, _ in _AUTH_COLUMNS)
    event_names = ", ".join(c for c, _ in event_columns)
    return (
        f"WITH a AS (INSERT INTO authorizations ({auth_names}) SELECT * FROM unnest({', '.join(auth)})"
        " ON CONFLICT (code, client_uuid) DO UPDATE SET item_id = excluded.item_id,"
        " instances = excluded.instances, granted_ms = excluded.granted_ms, expires_ms = excluded.expires_ms),"
        f" e AS (INSERT INTO events ({event_names}) SELECT {event_names}"
        f" FROM unnest({', '.join(events)}) WITH ORDINALITY AS u ({event_names}, ord) ORDER BY ord)"
        f" SELECT lts_write_v3($1::bigint, {', '.join(function)})"
    )


def arguments(b: WriteBatch, leasing: Leasing,
              chain: usagechain.Head | None) -> tuple[list[Any], usagechain.Head | None]:
    """The statement's arguments for plain batch `b`, and the chain's head once it is committed."""
    changes = b.seat_changes
    seats = [c.seat for c in changes]
    # One row per (code, device), the last one (a device asking twice in a batch): an upsert of one
    # statement may not touch a row twice.
    auths = list({(a.code, a.client_uuid): a for a in b.authorizations}.values())
    rows = event_rows(b.events)
    moved = None
    chain_args: list[Any] = [None, None, None, None, None]
    if chain is not None and rows:
        moved, rows = usagechain.linked(chain, rows)
        chain_args = [chain.chain, chain.seq, moved.seq, moved.hash, to_ms(b.at or utcnow())]
    columns = len(_EVENT_COLUMNS) + (len(_CHAIN_COLUMNS) if moved is not None else 0)
    events = [list(column) for column in zip(*rows)] if rows else [[] for _ in range(columns)]
    reports = b.usage_reports
    return [
        leasing.node,
        [_OPS[c.op] for c in changes], [s.item_id for s in seats], [s.client_uuid for s in seats],
        [to_ms(s.granted_at) for s in seats], [to_ms(s.refreshed_at) for s in seats],
        [to_ms(s.expires_at) for s in seats], [s.code for s in seats],
        [to_ms(s.borrowed_until) if s.borrowed_until else None for s in seats],
        [c.limit for c in changes], [c.job for c in changes],
        [leasing.blocks.get(c.seat.item_id, 0) if c.op is SeatOp.CLAIM and c.leasable else None for c in changes],
        [c.seat.item_id in leasing.held for c in changes],
        [json.dumps(list(c.exclusive_of)) if c.exclusive_of else None for c in changes],
        [r.report_id for _, r in reports], [r.client_uuid for _, r in reports], [r.code for _, r in reports],
        [to_ms(r.received_at) for _, r in reports], [job for job, _ in reports],
        list(b.unit_charges), list(b.unit_charges.values()),
        *chain_args,
        [a.code for a in auths], [a.client_uuid for a in auths], [a.item_id for a in auths],
        [a.instances for a in auths], [to_ms(a.granted_at) for a in auths], [to_ms(a.expires_at) for a in auths],
        *events,
    ], moved
