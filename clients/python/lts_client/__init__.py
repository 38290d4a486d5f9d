"""lts-client: the device side of lts-server. Handshake with failover, offline verification, a cache,
borrowing a seat for offline use.

It installs without the server: `pip install lts-client` (from `clients/python/`).
"""

from lts_client.client import Authorization, LicenseRefused, LtsClient, ServerUnavailable, verify
from lts_client.fingerprint import device_fingerprint
from lts_client.protocol import MAC_HEADER, report_mac
from lts_client.trust import (
    BadBinding,
    BadSignature,
    NotRequested,
    OutsideValidity,
    Trust,
    UntrustedKey,
    verify_answer,
)

__version__ = "0.1.0"

__all__ = ["MAC_HEADER", "Authorization", "BadBinding", "BadSignature", "LicenseRefused", "LtsClient",
           "NotRequested", "OutsideValidity", "ServerUnavailable", "Trust", "UntrustedKey", "device_fingerprint",
           "report_mac", "verify", "verify_answer"]
