"""The stored form of the device marks (core/usage.py): one day row per device and day, one row per device.

A day row (`rollup_days.marks`) holds, for each code and item the device was active on that day, in key
id order:

    varint(key_id << 2 | flags)         flags: 1 = the same body as the entry before (none follows),
                                               2 = instance counts follow the body
    hours: 3 bytes, little-endian       bit h: active in hour h (0-23)
    per active hour, ascending:         0-19: the one slice of the hour it was active in
                                        0xFF + 3 bytes (little-endian): the slices of the hour, a 20-bit mask
    with flag 2: per active slice, ascending: varint(instances)

A device that handshakes once an hour takes 3 + 24 bytes a day for its item, and one byte for its code
(the same body). A client row (`rollup_clients.marks`) holds, per key id the device was ever active on:
varint(key_id), varint((latest month + 1) << 2 | mask) with mask bit 0 (1): also the month before,
bit 1 (2): also two months before; 0 when no month is recent (converted from all-time marks).
"""

from __future__ import annotations

from functools import lru_cache

from lts_server.core.usage import SLICES_PER_HOUR, DayMarks, KeyDay

SAME, INSTANCES = 1, 2
MASK = 0xFF
HOUR_MASK = (1 << SLICES_PER_HOUR) - 1


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
    if not kd.instances:
        return _slices_body(kd.hours, kd.slices)
    out = bytearray(_slices_body(kd.hours, kd.slices))
    for s in _bits(kd.slices):
        _varint(kd.instances.get(s, 0), out)
    return bytes(out)


@lru_cache(maxsize=1 << 16)  # devices active in the same slices share a body (all of a slice's new devices)
def _slices_body(hours: int, slices: int) -> bytes:
    out = bytearray(hours.to_bytes(3, "little"))
    for hour in _bits(hours):
        mask = (slices >> (hour * SLICES_PER_HOUR)) & HOUR_MASK
        if mask and not mask & (mask - 1):
            out.append(mask.bit_length() - 1)
        else:
            out.append(MASK)
            out += mask.to_bytes(3, "little")
    return bytes(out)


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
        head, i = _read_varint(data, i)
        kid, flags = head >> 2, head & 3
        if flags & SAME:
            assert last is not None
            row[kid] = KeyDay(last.hours, last.slices)
            continue
        hours = int.from_bytes(data[i:i + 3], "little")
        i += 3
        slices = 0
        for hour in _bits(hours):
            b = data[i]
            i += 1
            if b == MASK:
                slices |= int.from_bytes(data[i:i + 3], "little") << (hour * SLICES_PER_HOUR)
                i += 3
            else:
                slices |= 1 << (hour * SLICES_PER_HOUR + b)
        kd = KeyDay(hours, slices)
        if flags & INSTANCES:
            for s in _bits(slices):
                n, i = _read_varint(data, i)
                if n:
                    kd.instances[s] = n
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
        kid, i = _read_varint(data, i)
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
