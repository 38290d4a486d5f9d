"""The device API: handshakes (and, later, usage reports) from client SDKs."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from datetime import datetime, timedelta

import msgspec
from aiohttp import web

from lts_server import logs, reportkeys
from lts_server import queue as seat_queue
from lts_server.core import handshake as hs
from lts_server.core.alerts import CLONE_ALERT
from lts_server.core.model import Counts, ItemStatus
from lts_server.bindings import ItemBinding
from lts_server.core.times import iso
from lts_server.core.versions import PROTOCOL_VERSIONS
from lts_server.errors import Code, Refusal
from lts_server.ledger import HandshakeOutcome
from lts_server.signer import BatchSigner
from lts_server.web import inputs
from lts_server.web.errors import ApiError, DeviceDecoder, decode_json
from lts_server.web.schemas import MAX_BODY, Authorization, HandshakeBody, SeatCount
from lts_server.web.services import SERVICES, Services

JSON = {"Content-Type": "application/json", "Cache-Control": "no-store"}
_decoder = DeviceDecoder(HandshakeBody)
_generic = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
MAX_FINGERPRINT = 256


async def read_json_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The body of a JSON request, refused with a 400 unless it is UTF-8 JSON text without duplicate keys."""
    if request.content_type != "application/json":
        raise ApiError(400, f"Content-Type must be application/json, not {request.content_type or 'missing'}")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise ApiError(400, f"Content-Type charset must be utf-8 (JSON is UTF-8 text), not {charset}")
    if request.content_length is not None:
        if request.content_length > limit:
            raise ApiError(400, f"the body is {request.content_length} bytes; at most {limit} are accepted")
        body = await request.read()
    else:
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ApiError(400, f"the body is over {limit} bytes; at most {limit} are accepted")
        body = b"".join(chunks)
    check_json_text(body)
    return body


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ApiError(400, f"{key}: the key appears twice in one object; send each key once", key)
        seen[key] = value
    return seen


def check_json_text(body: bytes) -> None:
    """Refuse what a JSON decoder would otherwise guess at: bytes that are not UTF-8, and a key given twice
    (decoders disagree on which of the two wins, so a proxy and this server could read different requests)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8: byte {e.start} (0x{body[e.start]:02x}) "
                            "cannot start or continue a character; JSON must be UTF-8 text") from None
    inputs.check_json(body, text)  # nesting and NUL first: the checks below decode recursively
    if _flat_without_repeats(body):
        return
    try:
        json.loads(text, object_pairs_hook=_refuse_duplicates)
    except ValueError:
        pass  # not JSON at all: the typed decoder names the problem


def _flat_without_repeats(body: bytes) -> bool:
    """True when the body has no duplicate key, shown cheaply (a fifth of the full check's time): a flat
    object written without escapes, each of whose keys appears once in the text as "key". Written
    without escapes, every occurrence of a key is those exact bytes, so a key given twice would appear
    twice. False means: not shown this way (nested, escaped, a value that equals a key): check fully."""
    if b"\\" in body:
        return False
    try:
        value = _generic.decode(body)
    except msgspec.DecodeError:
        return False
    if not isinstance(value, dict):
        return False
    for key, member in value.items():
        if isinstance(member, (dict, list)) or body.count(b'"%s"' % key.encode()) != 1:
            return False
    return True


def to_request(body: HandshakeBody) -> hs.Request:
    return hs.Request(
        client_uuid=body.client_uuid,
        product=body.product,
        deployment_type=body.deployment_type,
        handshake_code=body.handshake_code,
        organization_id=body.organization_id,
        session_password=body.session_password,
        version=body.version,
        edition=body.edition,
        domain=body.domain,
        app_id=body.app_id,
        process_name=body.process_name,
        instances=body.instances,
        protocol_version=body.protocol_version,
        borrow_days=body.borrow_days,
    )


def authorization(services: Services, req: hs.Request, grant: hs.Grant, status: ItemStatus, issued: datetime,
                  authorization_id: str, binding: ItemBinding | None = None, borrowed_until: datetime | None = None,
                  expires_at: datetime | None = None) -> Authorization:
    item = grant.item
    fit = grant.fit
    terms = services.config.authorizations
    refresh, offline = _terms(terms.refresh_minutes, terms.max_offline_hours)
    ends = expires_at or fit.expires_at
    # A borrow is the one authorization meant to outlast max_offline_hours: the device checked its seat out.
    expires = ends if offline is None or borrowed_until is not None else min(ends, issued + offline)
    refresh_by = min(expires, issued + refresh)
    refresh_by = refresh_by.replace(microsecond=refresh_by.microsecond // 1000 * 1000)  # milliseconds, as iso()
    seats = units = None
    if item.rules.counts is Counts.SEATS:
        seats = SeatCount(status.seats_used, item.quantity, fit.limit, max(0, fit.limit - status.seats_used))
    elif item.rules.counts is Counts.UNITS:
        units = SeatCount(status.units_used, item.quantity, fit.limit, max(0, fit.limit - status.units_used))
    return Authorization(
        authorization_id=authorization_id,
        server_uuid=services.identity.server_uuid,
        handshake_code=grant.code.name,
        organization_id=grant.code.organization_id,
        item_id=item.item_id,
        license_id=item.license_id,
        product=item.product,
        deployment_type=item.deployment_type.value,
        license_type=item.license_type.value,
        client_uuid=req.client_uuid,
        issued_at=iso(issued),
        expires_at=iso(expires),
        refresh_by=refresh_by,
        edition=item.edition,
        domain=req.domain if item.domain else None,
        instances=fit.instances if item.rules.counts is Counts.INSTANCES else None,
        seats=seats,
        units=units,
        binding_sha256=binding.sha256 if binding is not None else None,
        borrowed_until=iso(borrowed_until) if borrowed_until else None,
    )


@functools.lru_cache(maxsize=4)
def _terms(refresh_minutes: float, max_offline_hours: float) -> tuple[timedelta, timedelta | None]:
    """[authorizations] as durations, made once rather than per grant."""
    return timedelta(minutes=refresh_minutes), timedelta(hours=max_offline_hours) if max_offline_hours else None


def standby_refusal(services: Services) -> web.Response | None:
    if not services.main_is_up:
        return None
    refusal = Refusal(Code.NOT_SERVING, f"this is a standby and the main server {services.config.server.standby_of} is up")
    return web.Response(status=503, body=b'{"error":' + _encoder.encode(refusal.to_json()) + b"}",
                        headers={**JSON, "Retry-After": "30"})


def clock_refusal(services: Services, now: datetime) -> web.Response | None:
    """503 with 160 while the server's clock is behind its records (lts_server/clock.py): nothing is granted."""
    guard = services.clock
    behind = guard.behind(now) if guard is not None else None
    if behind is None:
        return None
    assert guard is not None
    guard.check()
    refusal = Refusal(Code.CLOCK_BEHIND, f"the clock reads {iso(now)}, {round(behind.total_seconds()):,} s before the "
                                         "latest time this server recorded")
    logs.event_limited("clock.refused", logs.logging.ERROR, behind_seconds=round(behind.total_seconds()))
    return web.Response(status=503, body=b'{"error":' + _encoder.encode(refusal.to_json()) + b"}",
                        headers={**JSON, "Retry-After": "30"})


def fingerprint_hash(fingerprint: str | None) -> str | None:
    """What the server keeps of a device's fingerprint: its SHA-256 (hex); over 256 bytes is a 400."""
    if fingerprint is None:
        return None
    data = fingerprint.encode()
    if len(data) > MAX_FINGERPRINT:
        raise ApiError(400, f"deviceFingerprint: {len(data)} bytes; at most {MAX_FINGERPRINT} bytes of UTF-8 are "
                            "accepted", "deviceFingerprint")
    return hashlib.sha256(data).hexdigest()


def parse_handshake(body: bytes) -> tuple[HandshakeBody, hs.Request, str | None]:
    """A handshake body decoded and checked: the body, the request it makes, its fingerprint's hash."""
    parsed, fingerprint = parse_body(body)
    return parsed, to_request(parsed), fingerprint


def parse_body(body: bytes) -> tuple[HandshakeBody, str | None]:
    """A handshake body decoded and checked, and its fingerprint's hash (a front process: the writer makes
    the request of it)."""
    parsed = decode_json(body, _decoder)
    return parsed, fingerprint_hash(parsed.device_fingerprint)


async def handshake(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if (refused := standby_refusal(services)) is not None:
        return refused
    parsed, req, fingerprint = parse_handshake(await read_json_body(request))
    issued = services.ledger.clock()
    if (refused := clock_refusal(services, issued)) is not None:
        return refused
    if parsed.wait_seconds:
        outcome = await _waiting(request, services, req, parsed.wait_seconds, fingerprint)
        issued = services.ledger.clock()
    else:
        outcome = await services.ledger.handshake(req, fingerprint)
    settled = settle(services, req, outcome, issued)
    if isinstance(settled, web.Response):
        return settled
    assert outcome.report_key is not None
    binding = outcome.binding
    return await signed_answer(services.signer, services.identity.key_id, _encoder.encode(settled),
                               reportkeys.encode_key(outcome.report_key),
                               binding.answer_member if binding is not None else b"")


def settle(services: Services, req: hs.Request, outcome: HandshakeOutcome,
           issued: datetime) -> Authorization | web.Response:
    """What a decided handshake answers: the authorization to sign, or the whole answer (a refusal, a stop)."""
    decision = outcome.decision
    if outcome.stopped:
        return web.Response(status=503, headers={**JSON, "Retry-After": "5"}, body=_encoder.encode({"error": {
            "code": 503, "message": "the server is stopping while this request waited for a seat; retry"}}))
    if isinstance(decision, hs.Refused):
        if outcome.clone:
            services.alerts.raise_now(CLONE_ALERT, req.client_uuid, "clone detected",
                                      f"Client UUID {req.client_uuid} asked for {decision.code_name or 'a code'} "
                                      "from a device with another fingerprint than the one it was first granted on "
                                      "(error 151). Reset its binding if the device was replaced.",
                                      "/portal/devices")
        return web.Response(status=403, body=refusal_body(services, decision, outcome), headers=JSON)
    assert outcome.status is not None and outcome.authorization_id and outcome.report_key
    if services.clock is not None:
        services.clock.recorded(issued)
    return authorization(services, req, decision, outcome.status, issued, outcome.authorization_id,
                         outcome.binding, outcome.borrowed_until, outcome.expires_at)


async def signed_answer(signer: BatchSigner, key_id: str, auth: bytes, report_key: str,
                        binding_member: bytes) -> web.Response:
    """The 200 answer to a granted handshake, around the authorization's encoded bytes."""
    # The signature covers these exact bytes; they are sent verbatim as the
    # first member, so a client can verify without re-serialising. The report
    # key is the device's secret: outside the signed part, never cached by a proxy.
    # The vendor's binding (built once per license revision) goes last, outside the signature: it is signed
    # by the vendor.
    signature = await signer.sign(auth)
    out = b'{"authorization":%s,"signature":"%s","keyId":"%s","reportKey":"%s"%s}' % (
        auth, signature, key_id.encode(), report_key.encode(), binding_member)
    return web.Response(body=out, headers=JSON)


async def _waiting(request: web.Request, services: Services, req: hs.Request, seconds: int,
                   fingerprint: str | None) -> HandshakeOutcome:
    """A handshake that may wait for a seat (lts_server/queue.py): long-polls until granted or the time is up."""
    most = services.config.queue.max_wait_s
    if seconds > most:
        raise ApiError(400, f"waitSeconds: {seconds} is over this server's maximum of {most} seconds "
                            "([queue] max_wait_s)", "waitSeconds")
    deadline = time.monotonic() + seconds
    outcome = await services.ledger.handshake(req, fingerprint, wait_until=deadline)
    if outcome.waiter is None:
        return outcome

    def connected() -> bool:
        return request.transport is not None and not request.transport.is_closing()

    outcome.waiter.connected = connected
    return await seat_queue.wait(outcome.waiter, deadline, services.ledger.give_up)


def refusal_body(services: Services, decision: hs.Refused, outcome: HandshakeOutcome | None = None) -> bytes:
    """The 403 body: the refusal, and what the client can act on (the protocol versions spoken, an item's
    version range, its place in the queue)."""
    error = decision.refusal.to_json()
    code = decision.refusal.code
    if code is Code.BAD_PROTOCOL:
        error["protocolVersions"] = list(PROTOCOL_VERSIONS)
    elif code is Code.INCOMPATIBLE_VERSION and decision.item_id:
        item = services.ledger.items.get(decision.item_id)
        if item is not None and item.versions:
            error["versions"] = item.versions
    if outcome is not None:
        if outcome.queue_position is not None:
            error["queuePosition"] = outcome.queue_position
            error["message"] += f"; waited in the queue, position {outcome.queue_position} when the time ran out"
        if outcome.queue_note:
            error["queueFull"] = True
            error["message"] += f"; {outcome.queue_note}"
    return b'{"error":' + _encoder.encode(error) + b"}"
