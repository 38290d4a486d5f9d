"""The client library now lives in its own distribution, `lts-client` (clients/python/): import `lts_client`.

This name stays so that scripts written against `lts_server.client` keep working.
"""

from lts_client import (
    Authorization,
    BadBinding,
    BadSignature,
    LicenseRefused,
    LtsClient,
    NotRequested,
    OutsideValidity,
    ServerUnavailable,
    Trust,
    UntrustedKey,
    verify,
)

__all__ = ["Authorization", "BadBinding", "BadSignature", "LicenseRefused", "LtsClient", "NotRequested",
           "OutsideValidity", "ServerUnavailable", "Trust", "UntrustedKey", "verify"]
