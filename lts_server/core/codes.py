"""Handshake-code rules: names, membership, validation fields and custom usage order."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from lts_server.core.borrowing import MAX_DAYS
from lts_server.core.model import HandshakeCode, Item, SeatLimit
from lts_server.core.reservations import limit_problems

CUSTOM_PART = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DOMAIN = re.compile(r"^(\*\.)?([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}$")
MAX_VALUES = 100


class CodeError(Exception):
    """A code change that cannot be made; names the field."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class Keep(Enum):
    """A field the edit leaves as it is (where None means: remove)."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class CodeFields:
    """What an admin sets on a code; None leaves a field as it is."""

    custom: str | None = None
    items: tuple[str, ...] | None = None
    domains: tuple[str, ...] | None = None
    app_ids: tuple[str, ...] | None = None
    process_names: tuple[str, ...] | None = None
    # "" removes the password; the shell hashes a new one before it gets here.
    password_hash: str | None = None
    # None removes the code's own limit (the items' limits apply); 0 forbids borrowing through the code.
    borrow_max_days: int | None | Keep = KEEP
    # Replaces every seat limit of the code (() removes them all); None leaves them.
    seat_limits: tuple[SeatLimit, ...] | None = None


def code_name(organization_id: str, custom: str) -> str:
    return f"{organization_id}-{custom}"


def _check_custom(organization_id: str, custom: str | None) -> str:
    if not custom:
        raise CodeError("custom", "required: give the part of the name after the organization id, 1 to 64 of "
                                  "A-Z a-z 0-9 . _ -")
    if not CUSTOM_PART.match(custom):
        raise CodeError("custom", f"{custom!r} is not a valid custom part: give 1 to 64 of A-Z a-z 0-9 . _ -")
    prefix = f"{organization_id}-"
    if custom.startswith(prefix):
        # The organization id is put in front by the server; typed again, it would be there twice.
        raise CodeError("custom", f"{custom!r} already starts with the organization id: the code would be named "
                                  f"{code_name(organization_id, custom)}. Give only the part after {prefix!r}, "
                                  f"e.g. {custom[len(prefix):] or 'fleet'!r}")
    return custom


def _check_values(field: str, values: tuple[str, ...], pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    if len(values) > MAX_VALUES:
        raise CodeError(field, f"at most {MAX_VALUES} values")
    seen: list[str] = []
    for i, v in enumerate(values):
        if not v or len(v) > 253 or (pattern is not None and not pattern.match(v)):
            raise CodeError(f"{field}[{i}]", f"{v!r} is not a valid value")
        if v not in seen:
            seen.append(v)
    return tuple(seen)


def _check_items(items: tuple[str, ...], organization_id: str, known: Mapping[str, Item]) -> tuple[str, ...]:
    if len(set(items)) != len(items):
        raise CodeError("items", "an item is listed twice")
    for i, item_id in enumerate(items):
        item = known.get(item_id)
        if item is None:
            raise CodeError(f"items[{i}]", f"no imported item has id {item_id!r}; `ltsctl items list` shows the items",
                            status=400)
        if item.organization_id != organization_id:
            # A code spends its own organization's licenses only (docs/design.md).
            raise CodeError(f"items[{i}]", f"item {item_id} belongs to organization {item.organization_id}, "
                                           f"not to {organization_id}", status=400)
    return items


def _check_borrow(days: int | None) -> int | None:
    if days is not None and not 0 <= days <= MAX_DAYS:
        raise CodeError("borrowMaxDays", f"must be 0 (no borrowing) to {MAX_DAYS} days, or null for the items' own")
    return days


def _normal_limits(limits: tuple[SeatLimit, ...]) -> tuple[SeatLimit, ...]:
    """One limit per item, in item order; a limit that reserves nothing and caps nothing is no limit."""
    seen: dict[str, SeatLimit] = {}
    for lim in limits:
        if lim.item_id in seen:
            raise CodeError(f"itemLimits.{lim.item_id}", "the item is given twice")
        seen[lim.item_id] = lim
    return tuple(seen[i] for i in sorted(seen) if seen[i].reserved_seats or seen[i].max_seats is not None)


def _check_limits(code: HandshakeCode, known: Mapping[str, Item], existing: Mapping[str, HandshakeCode],
                  replaced: HandshakeCode | None = None) -> HandshakeCode:
    others = [c for c in existing.values() if c.name not in (code.name, replaced.name if replaced else None)]
    found = limit_problems(code, known, others, replaced.seat_limits if replaced else ())
    if found:
        field, message = found[0]
        raise CodeError(field, message)
    return code


def create(organization_id: str, fields: CodeFields, known: Mapping[str, Item],
           existing: Mapping[str, HandshakeCode]) -> HandshakeCode:
    name = code_name(organization_id, _check_custom(organization_id, fields.custom))
    if name in existing:
        raise CodeError("custom", f"a handshake code named {name} already exists", status=409)
    code = HandshakeCode(
        name=name,
        organization_id=organization_id,
        items=_check_items(fields.items or (), organization_id, known),
        domains=_check_values("domains", tuple(d.lower() for d in fields.domains or ()), DOMAIN),
        app_ids=_check_values("appIds", fields.app_ids or ()),
        process_names=_check_values("processNames", fields.process_names or ()),
        password_hash=fields.password_hash or None,
        borrow_max_days=_check_borrow(None if fields.borrow_max_days is KEEP else fields.borrow_max_days),
        seat_limits=_normal_limits(fields.seat_limits or ()),
    )
    return _check_limits(code, known, existing)


def edit(code: HandshakeCode, fields: CodeFields, known: Mapping[str, Item],
         existing: Mapping[str, HandshakeCode]) -> HandshakeCode:
    changes: dict[str, object] = {}
    if fields.custom is not None:
        name = code_name(code.organization_id, fields.custom)
        if name != code.name:
            _check_custom(code.organization_id, fields.custom)
            if code.is_default:
                raise CodeError("custom", "a default code's name cannot change", status=409)
            if name in existing:
                raise CodeError("custom", f"a handshake code named {name} already exists", status=409)
            if code.seat_limits or fields.seat_limits:
                # The seats a code holds are counted under its name (store/sql_offline.py).
                raise CodeError("custom", f"{code.name} has seat limits (itemLimits): remove them, rename the code, "
                                          "then set them again", status=409)
            changes["name"] = name
    if fields.items is not None:
        items = _check_items(fields.items, code.organization_id, known)
        changes["items"] = _keep_order(code, items)
        if fields.seat_limits is None:  # limits of items the code no longer draws on end with them
            changes["seat_limits"] = tuple(lim for lim in code.seat_limits if lim.item_id in items)
    if fields.seat_limits is not None:
        changes["seat_limits"] = _normal_limits(fields.seat_limits)
    if fields.borrow_max_days is not KEEP:
        changes["borrow_max_days"] = _check_borrow(fields.borrow_max_days)
    if fields.domains is not None:
        changes["domains"] = _check_values("domains", tuple(d.lower() for d in fields.domains), DOMAIN)
    if fields.app_ids is not None:
        changes["app_ids"] = _check_values("appIds", fields.app_ids)
    if fields.process_names is not None:
        changes["process_names"] = _check_values("processNames", fields.process_names)
    if fields.password_hash is not None:
        changes["password_hash"] = fields.password_hash or None
    edited = dataclasses.replace(code, **changes)  # type: ignore[arg-type]
    return _check_limits(edited, known, existing, replaced=code) if edited.seat_limits else edited


def _keep_order(code: HandshakeCode, items: tuple[str, ...]) -> tuple[str, ...]:
    """With a custom order, kept items keep their places and new ones go last."""
    if not code.custom_order:
        return items
    kept = tuple(i for i in code.items if i in items)
    return kept + tuple(i for i in items if i not in kept)


def reorder(code: HandshakeCode, order: tuple[str, ...]) -> HandshakeCode:
    if sorted(order) != sorted(code.items) or len(set(order)) != len(order):
        raise CodeError("items", f"must list each of the code's items exactly once: {', '.join(code.items)}")
    return dataclasses.replace(code, items=order, custom_order=True)


def default_order(code: HandshakeCode) -> HandshakeCode:
    return dataclasses.replace(code, custom_order=False)
