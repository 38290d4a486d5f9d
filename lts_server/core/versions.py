"""Versions: the protocol versions this server speaks (105) and the client version ranges of items (107).

A range is PEP 440, read with `packaging` (the reference implementation pip uses), so ">=3.0,<5",
"~=4.2" and "==4.*" mean what Python packagers already know. Pre-releases of a version inside the
range are inside it too (a beta of 4.1 passes ">=3.0,<5"); PEP 440's own rule keeps "<5" from
admitting 5.0 betas.
"""

from __future__ import annotations

from functools import lru_cache

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

# What `protocolVersion` may say; a request without it speaks version 1.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
DEFAULT_PROTOCOL = 1
MAX_RANGE = 256


class RangeError(ValueError):
    """A version range that is not PEP 440; the message says what is wrong."""


def protocol_problem(version: int) -> str | None:
    """Why a request's protocol version is not spoken here, or None."""
    if version in PROTOCOL_VERSIONS:
        return None
    spoken = ", ".join(str(v) for v in PROTOCOL_VERSIONS)
    return f"protocolVersion {version} is not spoken by this server; it speaks {spoken}"


def check_range(text: str) -> str:
    """The range as given when it is a valid PEP 440 specifier set, else RangeError."""
    if not text.strip():
        raise RangeError("is empty; give a PEP 440 range such as \">=3.0,<5\", or leave the key out")
    if len(text) > MAX_RANGE:
        raise RangeError(f"is longer than {MAX_RANGE} characters")
    try:
        _spec(text)
    except InvalidSpecifier as e:
        raise RangeError(f"{text!r} is not a PEP 440 version range ({e}); e.g. \">=3.0,<5\" or \"~=4.2\"") from None
    return text


@lru_cache(maxsize=1024)
def _spec(text: str) -> SpecifierSet:
    return SpecifierSet(text)


def version_problem(version: str | None, versions: str) -> str | None:
    """Why a client version is outside an item's range (the range came through check_range), or None."""
    if version is None:
        return f"the request names no version; this item serves versions {versions}"
    try:
        parsed = Version(version)
    except InvalidVersion:
        return f"version {version!r} is not a PEP 440 version; this item serves versions {versions}"
    if _spec(versions).contains(parsed, prereleases=True):
        return None
    return f"version {version} is outside {versions}"
