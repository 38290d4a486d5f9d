"""The framing between front processes and the writer (server.workers > 1 on SQLite): what a front asks, what
the writer answers, and the bytes on the Unix socket.

A frame is a 4-byte big-endian length and that many bytes of MessagePack: a list of asks (front to writer)
or of replies (writer to front), as many as were ready in one turn of the sender's event loop. Each ask has
an id of its front's choosing; its reply carries the same id, in any order.

The writer trusts no front: an ask carries the handshake as the HTTP body's schema (web/schemas.py
HandshakeBody), so decoding it checks the same lengths, patterns and ranges as the HTTP edge did, and text
holding a NUL (which the edge refuses in the JSON) is refused here too. An ask that fails makes its whole frame
a BadFrame: nothing of it is decided, and the connection it came on is closed.
"""

from __future__ import annotations

import struct
from typing import Annotated

import msgspec

from lts_server.core import handshake as hs
from lts_server.web.schemas import Authorization, HandshakeBody

# A frame over this is refused unread: no front sends one (a handshake body is at most MAX_BODY bytes).
MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")


class Ask(msgspec.Struct, array_like=True, frozen=True):
    """A handshake the front process validated (not one that waits for a seat: those go to the writer whole)."""
    id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    # The body as decoded, less its deviceFingerprint (the hash below stands for it) and waitSeconds.
    request: HandshakeBody
    # SHA-256 (hex) of the device's fingerprint, as the ledger keeps it.
    fingerprint: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] | None = None

    def decided(self) -> hs.Request:
        """The request the ledger decides: the body's fields by name (msgspec, in C: 1.2 us against 2.1 for
        web.device.to_request, which gives the same)."""
        return msgspec.convert(self.request, hs.Request, from_attributes=True)


class Reply(msgspec.Struct, array_like=True, frozen=True):
    """The answer to an ask: a grant to sign (status 200), or the whole HTTP answer (status and body)."""
    id: int
    status: int
    # Not a grant: the JSON body, and the Retry-After seconds of a 503 (0: none).
    body: bytes = b""
    retry_after: int = 0
    # A grant: the authorization to sign, the device's report key (base64url) and the binding member.
    authorization: Authorization | None = None
    report_key: str = ""
    binding: bytes = b""


class BadFrame(Exception):
    """Bytes that are not a frame of this protocol: the connection they came on is closed."""


_encoder = msgspec.msgpack.Encoder()
_asks = msgspec.msgpack.Decoder(list[Ask])
_replies = msgspec.msgpack.Decoder(list[Reply])


def frame(messages: list[Ask] | list[Reply]) -> bytes:
    body = _encoder.encode(messages)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The length a frame's header announces; BadFrame past MAX_FRAME."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise BadFrame(f"a frame of {length:,} bytes announced; at most {MAX_FRAME:,} are accepted")
    return length


def decode_asks(body: bytes) -> list[Ask]:
    try:
        asks = _asks.decode(body)
    except (msgspec.DecodeError, ValueError) as e:
        raise BadFrame(f"not a list of asks: {e}") from None
    for ask in asks:
        request = ask.request
        if request.device_fingerprint is not None or request.wait_seconds is not None:
            raise BadFrame(f"ask {ask.id}: deviceFingerprint and waitSeconds do not travel in an ask")
        # The client UUID's pattern already excludes a NUL; the other texts, joined (twice as fast as a loop).
        if "\x00" in "".join(text for text in (
                request.product, request.handshake_code, request.organization_id, request.session_password,
                request.version, request.edition, request.domain, request.app_id, request.process_name) if text):
            raise BadFrame(f"ask {ask.id}: a text field holds the NUL character")
    return asks


def decode_replies(body: bytes) -> list[Reply]:
    try:
        return _replies.decode(body)
    except (msgspec.DecodeError, ValueError) as e:
        raise BadFrame(f"not a list of replies: {e}") from None
