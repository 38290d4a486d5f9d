"""The device marks the rollups keep (core/usage.py `fold`): who was already counted where, so that a device
counts once per bucket however late its records come; and their stored form: one day row per device and
day, one row per device.

A day row (`rollup_days.marks`) holds, for each code and item the device was active on that day, in key
id order:

    varint(key_id << 2 | flags)      flags: 1 = the same body as the entry before (none follows),
                                            2 = instance counts follow the body
    hours: 3 bytes, little-endian    bit h: active in hour h (0-23)
    n: 1 byte, then n bytes          the 3-minute slices it was active in, a little-endian bitmap of the
                                     day's 480 (bit s: slice s), without its high zero bytes
    with flag 2: per active slice, ascending: varint(instances)

So a device that handshakes once an hour takes 3 + 1 + 60 bytes a day for its item (less until the day
is over), and one byte for its code (the same body); reading and writing a row are a few C calls
(int.from_bytes, int.to_bytes), not a loop over its hours. A client row (`rollup_clients.marks`) holds,
per key id the device was ever active on: varint(key_id), varint((latest month + 1) << 2 | mask) with mask
bit 0 (1): also the month before, bit 1 (2): also two months before; 0 when no month is recent (converted
from all-time marks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SAME, INSTANCES = 1, 2


@dataclass(slots=True)
class KeyDay:
    """What one device did on one code or item in one UTC day: the day row's part for that key."""

    hours: int = 0  # bit h: active in hour h (0-23)
    slices: int = 0  # bit s: active in 3-minute slice s of the day (0-479); bit s sets bit s // 20 of hours
    instances: dict[int, int] = field(default_factory=dict)  # slice -> the most instances run in it


class ClientMarks:
    """Per device for good: its number, the codes and items it was ever active on (key ids), and for each the
    months it was active in, the latest three at most (a record comes at most 30 days late). Read from the
    stored row only when asked: a device already counted that day on that key needs none of it."""

    __slots__ = ("id", "_keys", "_raw")

    def __init__(self, id: int, raw: bytes = b"") -> None:  # noqa: A002 - the column's name
        self.id = id
        self._raw = raw
        self._keys: dict[int, set[int]] | None = None if raw else {}

    @property
    def keys(self) -> dict[int, set[int]]:
        if self._keys is None:
            self._keys = decode_client(self._raw)
        return self._keys


# A device's day row: key id -> KeyDay.
DayMarks = dict[int, KeyDay]


@dataclass
class Marks:
    """The marks a fold reads and updates, per client UUID and per (client UUID, day number since 1970), as
    the store read them (an absent one: nothing recorded yet); `changed_*` say which to write back."""

    clients: dict[str, ClientMarks] = field(default_factory=dict)
    days: dict[tuple[str, int], DayMarks] = field(default_factory=dict)
    changed_clients: set[str] = field(default_factory=set)
    changed_days: set[tuple[str, int]] = field(default_factory=set)


def _varint(n: int, out: bytearray) -> None:
    if n < 0x80:
        out.append(n)
        return
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def _bits(n: int) -> list[int]:
    """The set bits of n, ascending."""
    out = []
    while n:
        low = n & -n
        out.append(low.bit_length() - 1)
        n ^= low
    return out


def _body(kd: KeyDay) -> bytes:
    slices = kd.slices.to_bytes((kd.slices.bit_length() + 7) // 8, "little")
    out = kd.hours.to_bytes(3, "little") + bytes((len(slices),)) + slices
    if not kd.instances:
        return out
    tail = bytearray(out)
    for s in _bits(kd.slices):
        _varint(kd.instances.get(s, 0), tail)
    return bytes(tail)


def encode_day(row: DayMarks) -> bytes:
    out = bytearray()
    previous = b""
    for kid in sorted(row):
        kd = row[kid]
        body = _body(kd)
        flags = INSTANCES if kd.instances else 0
        if body == previous and flags == 0:
            _varint(kid << 2 | SAME, out)
            continue
        _varint(kid << 2 | flags, out)
        out += body
        previous = body if not flags else b""
    return bytes(out)


def decode_day(data: bytes) -> DayMarks:
    row: DayMarks = {}
    last: KeyDay | None = None
    i, end = 0, len(data)
    while i < end:
        head = data[i]
        if head < 0x80:
            i += 1
        else:
            head, i = _read_varint(data, i)
        kid, flags = head >> 2, head & 3
        if flags & SAME:
            assert last is not None
            row[kid] = KeyDay(last.hours, last.slices)
            continue
        n = data[i + 3]
        kd = KeyDay(int.from_bytes(data[i:i + 3], "little"), int.from_bytes(data[i + 4:i + 4 + n], "little"))
        i += 4 + n
        if flags & INSTANCES:
            for s in _bits(kd.slices):
                count, i = _read_varint(data, i)
                if count:
                    kd.instances[s] = count
        row[kid] = kd
        last = kd
    return row


def encode_client(keys: dict[int, set[int]]) -> bytes:
    out = bytearray()
    for kid in sorted(keys):
        months = keys[kid]
        _varint(kid, out)
        if not months:
            out.append(0)
            continue
        latest = max(months)
        mask = (1 if latest - 1 in months else 0) | (2 if latest - 2 in months else 0)
        _varint((latest + 1) << 2 | mask, out)
    return bytes(out)


def decode_client(data: bytes) -> dict[int, set[int]]:
    keys: dict[int, set[int]] = {}
    i, end = 0, len(data)
    while i < end:
        kid, i = (data[i], i + 1) if data[i] < 0x80 else _read_varint(data, i)
        packed, i = _read_varint(data, i)
        months: set[int] = set()
        if packed:
            latest = (packed >> 2) - 1
            months.add(latest)
            if packed & 1:
                months.add(latest - 1)
            if packed & 2:
                months.add(latest - 2)
        keys[kid] = months
    return keys
