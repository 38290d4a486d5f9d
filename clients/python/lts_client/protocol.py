"""The wire facts a device and the server share: the usage-report MAC and its header.

The server imports these from here, so the two sides cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

# The header that carries a usage report's MAC.
MAC_HEADER = "X-LTS-Report-MAC"


def report_mac(key: bytes, body: bytes) -> str:
    """What a device sends in the X-LTS-Report-MAC header: base64 HMAC-SHA256 of the body bytes."""
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()


def mac_matches(key: bytes, body: bytes, mac: str) -> bool:
    return hmac.compare_digest(report_mac(key, body).encode(), mac.strip().encode())
