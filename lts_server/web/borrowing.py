"""POST /api/v1/handshake/return: a device gives its borrowed seat back before borrowedUntil.

Signed like a usage report: X-LTS-Report-MAC, the HMAC-SHA256 of the exact body under the reportKey of
the device's newest handshake answer for the code. Idempotent: a repeat answers 200 with released false.

A device whose authorization an admin ended (a forced release, the code deleted) holds nothing: it gets
200 with released false too. Its report key died with the authorization, so there is no MAC to check; the
answer changes nothing and tells no more than a refusal would.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from lts_server.core.times import iso
from lts_server.core.versions import protocol_problem
from lts_server.errors import Code, Refusal
from lts_server.ledger import NotFound
from lts_server.reportkeys import MAC_HEADER, mac_matches
from lts_server.web.device import JSON, read_json_body, standby_refusal
from lts_server.web.errors import DeviceDecoder, ProtocolRefused, decode_json
from lts_server.web.schemas import ReturnAnswer, ReturnBody
from lts_server.web.services import SERVICES
from lts_server.web.usage import _check_mac

RETURN = "/api/v1/handshake/return"
_decoder = DeviceDecoder(ReturnBody)
_encoder = msgspec.json.Encoder()

def _refused(refusal: Refusal) -> web.Response:
    return web.Response(status=403, body=_encoder.encode({"error": refusal.to_json()}), headers=JSON)


def _answer(parsed: ReturnBody, item_id: str | None, released: bool, borrowed_until: str | None) -> web.Response:
    answer = ReturnAnswer(parsed.client_uuid, parsed.handshake_code, item_id, True, released, borrowed_until)
    return web.Response(body=_encoder.encode(answer), headers=JSON)


async def return_borrowed(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if (refused := standby_refusal(services)) is not None:
        return refused
    body = await read_json_body(request)
    parsed = decode_json(body, _decoder)
    if (unspoken := protocol_problem(parsed.protocol_version)) is not None:
        raise ProtocolRefused(unspoken)
    ledger = services.ledger
    key = await ledger.report_key(parsed.handshake_code, parsed.client_uuid)
    mac = request.headers.get(MAC_HEADER)
    if services.catch_up is not None and mac and (key is None or not mac_matches(key, body, mac)):
        while not await services.catch_up():  # another node may have granted the borrow
            pass
        key = await ledger.report_key(parsed.handshake_code, parsed.client_uuid)
    if key is None:  # judged after catching up: another node may have made the code
        if parsed.handshake_code not in ledger.codes:
            return _refused(Refusal(Code.UNKNOWN_CODE, repr(parsed.handshake_code)))
        return _answer(parsed, None, False, None)
    _check_mac(request, key, body, parsed.client_uuid)
    try:
        outcome = await ledger.return_borrowed(parsed.handshake_code, parsed.client_uuid)
    except NotFound:  # the authorization went meanwhile (an admin, another node): nothing is held
        return _answer(parsed, None, False, None)
    return _answer(parsed, outcome.item_id, outcome.released,
                   iso(outcome.borrowed_until) if outcome.borrowed_until else None)
