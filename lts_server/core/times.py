"""Time helpers: everything is timezone-aware UTC; storage uses ISO text or epoch ms."""

from __future__ import annotations

from datetime import UTC, datetime

from lts_server.core.model import SLICE


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def iso(t: datetime) -> str:
    """RFC 3339 in UTC with a Z, seconds precision unless there are fractions."""
    t = t.astimezone(UTC)
    text = t.isoformat(timespec="milliseconds" if t.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past the last representable instant
        raise ValueError(f"{text!r} is out of range") from None


def slice_start(t: datetime) -> datetime:
    """The start of the absolute 3-minute slice holding t."""
    seconds = int(SLICE.total_seconds())
    epoch = int(t.timestamp())
    return from_ms((epoch - epoch % seconds) * 1000)
