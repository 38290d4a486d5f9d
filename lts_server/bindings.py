"""The vendor's bindings of licenses to this server, ready for the hot path.

A license file with `serverKey` carries the vendor's signed binding statement (licensefile.py,
docs/authorization-format.md). Every authorization from one of its items carries that statement, so
a device holding only the vendor's key can verify the answer. The answer's bytes for it are built
once per license revision, at import or start-up, never per grant: a grant looks its item up here
and appends the bytes, whatever the size of the license file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from lts_server.store.sql_trust import BindingRow


@dataclass(frozen=True)
class ItemBinding:
    # `,"binding":{...}`: what the handshake answer appends after its other members.
    answer_member: bytes
    # SHA-256 (hex) of the statement's bytes: the authorization names its binding by it (bindingSha256).
    sha256: str
    license_id: str
    revision: int


def item_binding(row: BindingRow) -> ItemBinding:
    member = b',"binding":' + json.dumps({"keyId": row.key_id, "statement": row.statement,
                                          "signature": row.signature}, separators=(",", ":")).encode()
    return ItemBinding(member, hashlib.sha256(base64.b64decode(row.statement)).hexdigest(), row.license_id,
                       row.revision)


def index(rows: Iterable[BindingRow], bound: set[str]) -> dict[str, ItemBinding]:
    """Item id -> the binding of the latest revision of its license that lists it (a renewal keeps items it no
    longer lists, with the binding of the revision that did). Only licenses in `bound` (whose imported
    revision has a serverKey): a renewal without one ends the binding of all the license's items."""
    found: dict[str, ItemBinding] = {}
    for row in sorted((r for r in rows if r.license_id in bound), key=lambda r: (r.license_id, r.revision)):
        binding = item_binding(row)
        for item_id in row.item_ids:
            found[item_id] = binding
    return found
