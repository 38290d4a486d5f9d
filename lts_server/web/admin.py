"""The admin API: handshake codes, licenses, items, devices and server status."""

from __future__ import annotations

import hashlib
import os
import time

import msgspec
from aiohttp import web

from datetime import datetime

import lts_server
from lts_server.core.codes import KEEP, CodeFields
from lts_server.core.model import HandshakeCode, SeatLimit
from lts_server.core.times import iso, to_ms
from lts_server.core.usage import bucket_start
from lts_server.ledger import limits_json
from lts_server.licensefile import MAX_FILE_BYTES
from lts_server.store import ImportRecord, Seat
from lts_server.store.sql_alerts import NO_BOUND
from lts_server.web.device import read_json_body
from lts_server.web.errors import ApiError, decode_json, query_int
from lts_server.web.schemas import CodeCreateBody, CodeEditBody, ImportDismissBody, ItemLimitBody, UsageOrderBody
from lts_server.web.services import SERVICES, Services
from lts_server.web.stats import item_status, problems_first

DEVICES_PAGE = 1000
MAX_DEVICES_PAGE = 10_000


async def requests_today(services: Services) -> dict[str, int]:
    """Granted plus refused handshakes today, per code, in one query."""
    day = bucket_start(to_ms(services.ledger.clock()), "1d")
    return {k: r.granted + r.refused for k, r in (await services.store.rollups_at("code", "1d", day)).items()}


async def code_json(services: Services, code: HandshakeCode, today: dict[str, int] | None = None) -> dict:
    ledger = services.ledger
    out = {
        "name": code.name,
        "organizationId": code.organization_id,
        "custom": code.name[len(code.organization_id) + 1:],
        "default": code.is_default,
        "sourceLicenseId": code.source_license_id,
        "items": ledger.ordered_items(code),
        "customOrder": code.custom_order,
        "missingItems": [i for i in code.items if i not in ledger.items],
        "domains": list(code.domains),
        "appIds": list(code.app_ids),
        "processNames": list(code.process_names),
        "passwordSet": code.password_hash is not None,
        "requestsToday": (today if today is not None else await requests_today(services)).get(code.name, 0),
        "borrowMaxDays": code.borrow_max_days,
        "itemLimits": {item_id: {**limit, "held": ledger.code_seats.get((code.name, item_id), 0)}
                       for item_id, limit in limits_json(code).items()},
    }
    over = [f"holds {limit['held']} seats of item {item_id}, more than its maxSeats of {limit['maxSeats']}: it "
            "takes none until it holds fewer (nothing is released)"
            for item_id, limit in out["itemLimits"].items()
            if limit["maxSeats"] is not None and limit["held"] > limit["maxSeats"]]
    if over:
        out["limitsWarning"] = "; ".join(over)
    return out


def seat_limits(body: dict[str, ItemLimitBody]) -> tuple[SeatLimit, ...]:
    return tuple(SeatLimit(item_id, lim.reserved_seats, lim.max_seats) for item_id, lim in body.items())


async def list_codes(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    codes = sorted(services.ledger.codes.values(), key=lambda c: c.name)
    today = await requests_today(services)
    return web.json_response({"codes": [await code_json(services, c, today) for c in codes]})


async def create_code(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body: CodeCreateBody = decode_json(await read_json_body(request), CodeCreateBody)
    fields = CodeFields(
        custom=body.custom, items=tuple(body.items), domains=tuple(body.domains), app_ids=tuple(body.app_ids),
        process_names=tuple(body.process_names),
        password_hash=services.ledger.hash_session_password(body.session_password) if body.session_password else None,
        borrow_max_days=body.borrow_max_days, seat_limits=seat_limits(body.item_limits),
    )
    code = await services.ledger.create_code(body.organization_id, fields)
    return web.json_response(await code_json(services, code), status=201)


def _code(services: Services, name: str) -> HandshakeCode:
    code = services.ledger.codes.get(name)
    if code is None:
        raise ApiError(404, f"no such handshake code {name}; `ltsctl codes list` shows what exists")
    return code


async def get_code(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(await code_json(services, _code(services, request.match_info["name"])))


async def edit_code(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["name"]
    _code(services, name)
    body: CodeEditBody = decode_json(await read_json_body(request), CodeEditBody)
    password = body.session_password
    fields = CodeFields(
        custom=body.custom,
        items=tuple(body.items) if body.items is not None else None,
        domains=tuple(body.domains) if body.domains is not None else None,
        app_ids=tuple(body.app_ids) if body.app_ids is not None else None,
        process_names=tuple(body.process_names) if body.process_names is not None else None,
        password_hash=None if password is None else (services.ledger.hash_session_password(password) if password else ""),
        borrow_max_days=KEEP if body.borrow_max_days is msgspec.UNSET else body.borrow_max_days,
        seat_limits=seat_limits(body.item_limits) if body.item_limits is not None else None,
    )
    code = await services.ledger.edit_code(name, fields)
    return web.json_response(await code_json(services, code))


def default_code_refusal(code: HandshakeCode) -> str:
    """Why deleting a default code needs a confirmation, and how to undo it."""
    return (f"{code.name} is the default code of license {code.source_license_id}: devices that send only "
            f"organization id {code.organization_id} use it (they get error 101 or 121 without it). Confirm with "
            f"?confirm=default; it can be restored with POST /api/v1/admin/licenses/{code.source_license_id}"
            "/default-code")


async def delete_code(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["name"]
    code = _code(services, name)
    if code.is_default and request.query.get("confirm") != "default":
        raise ApiError(409, default_code_refusal(code))
    await services.ledger.delete_code(name)
    return web.json_response({"deleted": name})


async def restore_default_code(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    code = await services.ledger.restore_default_code(request.match_info["license_id"])
    return web.json_response(await code_json(services, code), status=201)


async def set_order(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["name"]
    _code(services, name)
    body: UsageOrderBody = decode_json(await read_json_body(request), UsageOrderBody)
    code = await services.ledger.set_usage_order(name, tuple(body.items))
    return web.json_response(await code_json(services, code))


async def reset_order(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["name"]
    _code(services, name)
    code = await services.ledger.set_usage_order(name, None)
    return web.json_response(await code_json(services, code))


def license_json(services: Services, license_id: str, with_text: bool = False) -> dict:
    record = services.ledger.licenses[license_id]
    lic = record.license
    out = {
        "licenseId": lic.license_id, "alias": lic.alias, "organizationId": lic.organization_id,
        "licenseTextVersion": lic.license_text_version, "status": lic.status, "revision": lic.revision,
        "serverUuid": lic.server_uuid, "issuedAt": iso(lic.issued_at), "keyId": record.key_id,
        "sha256": record.sha256, "firstImportedAt": iso(record.first_imported_at),
        "updatedAt": iso(record.updated_at), "items": [i.item_id for i in lic.items],
    }
    if with_text:
        out["fileText"] = record.file_text
    return out


async def list_licenses(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response({"licenses": [license_json(services, i) for i in sorted(services.ledger.licenses)]})


async def get_license(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    license_id = request.match_info["license_id"]
    if license_id not in services.ledger.licenses:
        raise ApiError(404, f"no such license {license_id}; `ltsctl licenses list` shows what exists")
    return web.json_response(license_json(services, license_id, with_text=True))


async def upload_license(request: web.Request) -> web.Response:
    """The raw .lic file as the body; same checks and states as the import directory."""
    services = request.app[SERVICES]
    if request.content_length is not None and request.content_length > MAX_FILE_BYTES:
        raise ApiError(400, f"the file is over {MAX_FILE_BYTES} bytes")
    data = await request.read()
    if not data:
        raise ApiError(400, "the body must be the license file")
    name = os.path.basename(request.query.get("name", "")) or f"{hashlib.sha256(data).hexdigest()[:16]}.lic"
    outcome = await services.importer.import_bytes(f"upload:{name}", data)
    body = {"state": outcome.state, "licenseId": outcome.license_id, "reason": outcome.reason}
    if outcome.state == "rejected":
        reason = outcome.reason or "rejected"
        return web.json_response({"error": {"code": 422, "message": reason, "reason": reason.split(":")[0]},
                                  **body}, status=422)
    status = 201 if outcome.state in ("imported", "renewed") else 200
    if outcome.license_id:
        body["license"] = license_json(services, outcome.license_id)
    return web.json_response(body, status=status)


async def list_items(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response({"items": problems_first([item_status(services, i) for i in services.ledger.items])})


def _item(services: Services, item_id: str) -> str:
    if item_id not in services.ledger.items:
        raise ApiError(404, f"no such item {item_id}; `ltsctl items list` shows what exists")
    return item_id


async def revoke_item(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    item_id = _item(services, request.match_info["item_id"])
    await services.ledger.set_revoked(item_id, True)
    return web.json_response(item_status(services, item_id))


async def restore_item(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    item_id = _item(services, request.match_info["item_id"])
    await services.ledger.set_revoked(item_id, False)
    return web.json_response(item_status(services, item_id))


async def list_devices(request: web.Request) -> web.Response:
    """The item's seats in the order they were granted, a page at a time (an item may hold millions)."""
    services = request.app[SERVICES]
    item_id = _item(services, request.match_info["item_id"])
    limit = query_int(request, "limit", DEVICES_PAGE, 1, MAX_DEVICES_PAGE)
    offset = query_int(request, "offset", 0, 0, NO_BOUND)
    assert limit is not None and offset is not None
    seats = await services.store.item_seats(item_id, limit, offset)
    total = services.ledger.status(item_id).seats_used
    more = len(seats) == limit and offset + limit < total
    now = services.ledger.clock()
    borrowed = await services.store.borrowed_count(item_id, to_ms(now))
    return web.json_response({"itemId": item_id, "total": total, "borrowed": borrowed,
                              "next": offset + limit if more else None,
                              "devices": [seat_json(s, now) for s in seats]})


def seat_json(seat: Seat, now: datetime) -> dict:
    """One seat holder as the admin API, ltsctl and the portal show it."""
    borrowed = seat.borrowed_until is not None and seat.borrowed_until > now
    return {"clientUuid": seat.client_uuid, "grantedAt": iso(seat.granted_at), "refreshedAt": iso(seat.refreshed_at),
            "expiresAt": iso(seat.expires_at), "code": seat.code, "borrowed": borrowed,
            "borrowedUntil": iso(seat.borrowed_until) if borrowed and seat.borrowed_until else None}


def release_warning(seat: Seat, now: datetime) -> str | None:
    """What the admin must know before force-releasing a borrowed seat (the portal's confirmation says it)."""
    if seat.borrowed_until is None or seat.borrowed_until <= now:
        return None
    return (f"device {seat.client_uuid} borrowed this seat until {iso(seat.borrowed_until)}: it is offline and keeps "
            "working with its signed authorization until then; releasing frees the seat for another device now")


def release_answer(client_uuid: str, item_id: str, seat: Seat | None, now: datetime) -> dict:
    """What a force-release answers (either endpoint): the borrow it cut short, and the warning about it."""
    warning = release_warning(seat, now) if seat is not None else None
    return {"released": client_uuid, "itemId": item_id,
            "borrowedUntil": iso(seat.borrowed_until) if warning and seat and seat.borrowed_until else None,
            "warning": warning}


async def release_device(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    item_id = _item(services, request.match_info["item_id"])
    client = request.match_info["client_uuid"]
    seat = await services.ledger.release_seat(item_id, client)
    return web.json_response(release_answer(client, item_id, seat, services.ledger.clock()))


async def status_json(services: Services) -> dict:
    ledger = services.ledger
    directory = services.config.import_dir
    try:
        files = sum(1 for p in directory.iterdir() if p.suffix == ".lic")
        dir_state = {"path": str(directory), "exists": True, "files": files}
    except OSError as e:
        dir_state = {"path": str(directory), "exists": False, "error": e.strerror}
    dir_state["lastScanError"] = services.importer.last_scan_error
    dir_state["rejected"] = len(ledger.open_rejections())
    return {
        "serverUuid": services.identity.server_uuid,
        "identityKey": services.identity.public_key_b64,
        "keyId": services.identity.key_id,
        "clock": services.clock.status().to_json() if services.clock is not None else None,
        "version": lts_server.__version__,
        "uptimeSeconds": round(time.monotonic() - services.started),
        "databaseBytes": await services.store.size_bytes(),
        "importDirectory": dir_state,
        "counts": {"licenses": len(ledger.licenses), "items": len(ledger.items), "codes": len(ledger.codes),
                   "seats": sum(s.seats_used for s in ledger.statuses.values())},
        "servers": services.config.server.servers,
        "rollupLagEvents": await services.store.rollup_lag(),
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(await status_json(request.app[SERVICES]))


async def list_imports(request: web.Request) -> web.Response:
    ledger = request.app[SERVICES].ledger
    files = [import_json(r) for r in sorted(ledger.imports.values(), key=lambda r: r.path)]
    return web.json_response({"files": files})


def import_json(r: ImportRecord) -> dict:
    return {"path": r.path, "state": r.state, "reason": r.reason, "sha256": r.sha256, "licenseId": r.license_id,
            "revision": r.revision, "seenAt": iso(r.seen_at)}


async def dismiss_import(request: web.Request) -> web.Response:
    """Dismiss a rejection (by path or file name): it stops alerting and counting; a changed file is tried again."""
    body: ImportDismissBody = decode_json(await read_json_body(request), ImportDismissBody)
    record = await request.app[SERVICES].ledger.dismiss_rejection(body.name)
    request.app[SERVICES].alerts.request_check()
    return web.json_response(import_json(record))
