"""POST /api/v1/usage: usage reports from devices, counted once per reportId."""

from __future__ import annotations

import msgspec
from aiohttp import web

from lts_server.core.usage import slot_problem
from lts_server.core.versions import protocol_problem
from lts_server.ledger import UsageRecord, UsageReport
from lts_server.reportkeys import MAC_HEADER, mac_matches
from lts_server.web.device import JSON, clock_refusal, read_json_body, standby_refusal
from lts_server.web.errors import ApiError, DeviceDecoder, ProtocolRefused, decode_json
from lts_server.web.schemas import UsageBody
from lts_server.web.services import SERVICES

# A report carries up to MAX_RECORDS records; allow their size.
MAX_USAGE_BODY = 256 * 1024
_decoder = DeviceDecoder(UsageBody)
_encoder = msgspec.json.Encoder()


async def report_usage(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if (refused := standby_refusal(services)) is not None:
        return refused
    body = await read_json_body(request, MAX_USAGE_BODY)
    parsed = decode_json(body, _decoder)
    if (unspoken := protocol_problem(parsed.protocol_version)) is not None:
        raise ProtocolRefused(unspoken)
    now = services.ledger.clock()
    if (refused := clock_refusal(services, now)) is not None:  # a slot would be judged by a wrong clock
        return refused
    for i, record in enumerate(parsed.records):
        problem = slot_problem(record.slot, now)
        if problem:
            raise ApiError(400, f"records[{i}].slot: {record.slot.isoformat()} {problem}", f"records[{i}].slot")
    key = await services.ledger.report_key(parsed.handshake_code, parsed.client_uuid)
    mac = request.headers.get(MAC_HEADER)
    if services.catch_up is not None and mac and (key is None or not mac_matches(key, body, mac)
                                                  or parsed.handshake_code not in services.ledger.codes):
        # Another node may have granted the device (a new report key), or imported the license of its code,
        # since this one last followed the cluster.
        while not await services.catch_up():
            pass
        key = await services.ledger.report_key(parsed.handshake_code, parsed.client_uuid)
    if key is not None:  # without an authorization the ledger refuses the report (403, code 104 or 101)
        _check_mac(request, key, body, parsed.client_uuid)
    if await services.store.report_seen(parsed.report_id):
        return _answer(parsed.report_id, duplicate=True)
    report = UsageReport(
        report_id=parsed.report_id,
        client_uuid=parsed.client_uuid,
        handshake_code=parsed.handshake_code,
        records=tuple(UsageRecord(r.slot, r.product, r.operation, r.count, r.item_id) for r in parsed.records),
    )
    outcome = await services.ledger.report_usage(report)
    services.alerts.after_usage(outcome.charged)
    if outcome.refusal is not None:
        return web.Response(status=403, body=b'{"error":' + _encoder.encode(outcome.refusal.to_json()) + b"}",
                            headers=JSON)
    return _answer(parsed.report_id, duplicate=outcome.duplicate, accepted=outcome.accepted)


def _check_mac(request: web.Request, key: bytes, body: bytes, client_uuid: str) -> None:
    mac = request.headers.get(MAC_HEADER)
    if not mac:
        raise ApiError(401, f"the {MAC_HEADER} header is missing: sign the report's bytes with the reportKey "
                            "of the device's handshake answer (docs/api.md)")
    if not mac_matches(key, body, mac):
        raise ApiError(403, f"the {MAC_HEADER} header does not match the report: it must be the HMAC-SHA256 of "
                            f"the exact body under the reportKey of device {client_uuid}'s latest handshake")


def _answer(report_id: str, duplicate: bool, accepted: int = 0) -> web.Response:
    return web.Response(
        body=_encoder.encode({"reportId": report_id, "duplicate": duplicate, "accepted": 0 if duplicate else accepted}),
        headers=JSON,
    )
