"""Session passwords, kept as keyed hashes so a handshake checks one in microseconds."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "hmac-sha256$"


def session_hash(secret: bytes, password: str) -> str:
    return PREFIX + hmac.new(secret, password.encode(), hashlib.sha256).hexdigest()


def session_matches(secret: bytes, stored: str, given: str | None) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(stored, session_hash(secret, given))
