"""lts-client: the device side of lts-server. Handshake with failover, offline verification, a cache,
borrowing a seat for offline use.

It installs without the server: `pip install lts-client` (from `clients/python/`).
"""

from lts_client.client import Authorization, BadSignature, LicenseRefused, LtsClient, ServerUnavailable, verify
from lts_client.protocol import MAC_HEADER, report_mac

__version__ = "0.1.0"

__all__ = ["MAC_HEADER", "Authorization", "BadSignature", "LicenseRefused", "LtsClient", "ServerUnavailable",
           "report_mac", "verify"]
