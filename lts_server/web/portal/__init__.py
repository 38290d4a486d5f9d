"""The management portal: server-rendered pages under /portal/, for a browser on the intranet.

Pages call the same ledger operations and importer as the admin API. A
session is an admin token kept in an HttpOnly, SameSite=Strict cookie;
every form carries a CSRF token bound to the session (before login, a
double-submit cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape
from aiohttp import web

from lts_server import logs

from lts_server.core.codes import CodeError, CodeFields
from lts_server.core.model import Counts, SeatLimit
from lts_server.core.state import ItemState
from lts_server.core.times import from_ms, iso, parse_iso, to_ms
from lts_server.ledger import LedgerClosed, NotFound
from lts_server.licensefile import MAX_FILE_BYTES
from lts_server.store import StoreError
from lts_server.web import auth, inputs
from lts_server.web.admin import code_json, default_code_refusal, requests_today, status_json
from lts_server.web.errors import CLIENT_GONE, ApiError, client_gone, error_answer
from lts_server.web.portal.charts import DEVICES, GRANTED, REFUSED, UNITS, Line, Slice, donut, trend
from lts_server.web.services import SERVICES, Services
from lts_server.web.stats import (
    EARLIEST,
    LATEST,
    MAX_BUCKETS,
    check_span,
    compute_stats,
    item_status,
    problems_first,
    query_time,
    usage_text,
)

HERE = Path(__file__).parent
SESSION = "lts_session"
PRE_CSRF = "lts_csrf"
FLASH = "lts_flash"
ROWS_PER_PAGE = 24
ITEMS_PER_PAGE = 50
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
_env.filters["num"] = lambda value: f"{value:,}" if isinstance(value, int) else value


def _words(value: Any) -> Markup:
    """Text whose hyphenated words (ids, dates, product names) never break at their hyphens: on a laptop a
    table sizes its columns to whole words (portal.css: .w); on a phone the card layout may still wrap them."""
    return Markup("".join(f'<span class="w">{escape(part)}</span>' if "-" in part else escape(part)
                          for part in re.split(r"(\s+)", str(value))))


_env.filters["words"] = _words


# Sent with every answer: browsers must not guess another content type than the one declared.
NOSNIFF = ("X-Content-Type-Options", "nosniff")


@web.middleware
async def security_headers(request: web.Request, handler):  # noqa: ANN001, ANN201
    response = await handler(request)
    response.headers.setdefault(*NOSNIFF)
    if request.path.startswith("/portal"):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
    return response


ERROR_HEADINGS = {400: "That request is not valid", 403: "Not allowed", 404: "Not found",
                  405: "Not allowed here", 413: "Too large", 500: "Something went wrong"}


@web.middleware
async def html_errors(request: web.Request, handler):  # noqa: ANN001, ANN201
    """Portal failures as HTML pages (not the API's JSON): 404 for unknown pages, codes and items, 500 for bugs."""
    if not request.path.startswith("/portal"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else (
            "There is no such page in the portal." if e.status == 404 else e.reason)
        return _error_page(request, e.status, message)
    except ApiError as e:  # a refusal from the shared operations (the API's JSON errors)
        return _error_page(request, e.status, e.message)
    except (StoreError, LedgerClosed) as e:  # the database away or full: the API's status, words and Retry-After
        answer = error_answer(request, e)
        page = _error_page(request, answer.status, json.loads(answer.text or "{}")["error"]["message"])
        if "Retry-After" in answer.headers:
            page.headers["Retry-After"] = answer.headers["Retry-After"]
        return page
    except Exception as e:  # the admin gets a page, the log gets the traceback
        if client_gone(request, e):
            return _error_page(request, 400, CLIENT_GONE)
        logs.log.exception("portal.internal_error", extra={"fields": {"path": request.path}})
        return _error_page(request, 500, "The server failed on this page; the server log has the details.")


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    logged_in = bool(request.cookies.get(SESSION))
    return _render(request, "error.html", ERROR_HEADINGS.get(status, f"Error {status}"), http_status=status,
                   heading=ERROR_HEADINGS.get(status, f"Error {status}"), message=message, logged_in=logged_in,
                   csrf="", back="/portal/" if logged_in else "/portal/login",
                   back_label="Back to Home" if logged_in else "Log in")


def _csrf_for(services: Services, token_hash: str) -> str:
    return hmac.new(services.identity.secret, b"portal-csrf:" + token_hash.encode(), hashlib.sha256).hexdigest()[:32]


async def _session(request: web.Request) -> str | None:
    """The session's token hash when the cookie holds a live token."""
    token = request.cookies.get(SESSION)
    return await auth.live_token(request.app[SERVICES], token) if token else None


def _render(request: web.Request, template: str, title: str, http_status: int = 200, **context: Any) -> web.Response:
    flash = request.cookies.get(FLASH)
    parsed = None
    if flash:
        kind, _, text = urllib.parse.unquote(flash).partition(":")
        parsed = {"kind": "error" if kind == "error" else "ok", "text": text}
    html = _env.get_template(template).render(title=title, flash=parsed, **context)
    response = web.Response(text=html, content_type="text/html", status=http_status)
    if flash:
        response.del_cookie(FLASH, path="/portal")
    return response


def _redirect(location: str, flash: tuple[str, str] | None = None) -> web.HTTPSeeOther:
    response = web.HTTPSeeOther(location)
    if flash:
        response.set_cookie(FLASH, urllib.parse.quote(f"{flash[0]}:{flash[1]}"), path="/portal", httponly=True,
                            samesite="Strict", max_age=60)
    return response


def _pre_login_csrf(request: web.Request) -> tuple[str, bool]:
    value = request.cookies.get(PRE_CSRF)
    return (value, False) if value else (secrets.token_urlsafe(24), True)


def _with_pre_csrf(request: web.Request, response: web.Response, value: str, new: bool) -> web.Response:
    if new:
        response.set_cookie(PRE_CSRF, value, path="/portal", httponly=True, samesite="Strict",
                            secure=request.secure)
    return response


def _require_csrf(expected: str, form: Any) -> None:
    if not expected or not hmac.compare_digest(expected, str(form.get("csrf", ""))):
        raise web.HTTPForbidden(text="the form has expired or did not come from this site; reload the page")


def _sentence(text: str) -> str:
    """A message as a sentence: capitalised, unless it starts with a field's name (`itemLimits.x.maxSeats: ...`),
    which must stay as the API spells it."""
    return text if _FIELD_FIRST.match(text) else text[:1].upper() + text[1:]


_FIELD_FIRST = re.compile(r"[a-z][\w.\[\]-]*: ")


def _flash_refusal(refused: ApiError) -> tuple[str, str]:
    return "error", _sentence(refused.message) + "."


async def _logged_in(request: web.Request) -> dict[str, Any]:
    """The page context for a logged-in admin, or a redirect to setup or login."""
    services = request.app[SERVICES]
    hashed = await _session(request)
    if hashed is not None:  # a live session implies setup is done
        return {"logged_in": True, "csrf": _csrf_for(services, hashed), "token_hash": hashed}
    raise _redirect("/portal/setup" if await services.store.admin_password_hash() is None else "/portal/login")


async def _post(request: web.Request) -> Any:
    """The submitted form; bytes that are not text in the form's charset are a 400, not a 500."""
    try:
        form = await request.post()
    except (UnicodeDecodeError, LookupError):
        raise ApiError(400, "the form is not valid text in its charset (UTF-8 expected)") from None
    inputs.check_form(form)
    return form


async def _form(request: web.Request) -> tuple[dict[str, Any], Any]:
    page = await _logged_in(request)
    form = await _post(request)
    _require_csrf(page["csrf"], form)
    return page, form


# -- setup, login, logout, password ---------------------------------------------------

async def index(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    status = await status_json(services)  # the same figures as the API
    _, met = await services.alerts.current()  # the same conditions the alert checks see
    seconds = status["uptimeSeconds"]
    uptime = f"{seconds // 86400} d {seconds % 86400 // 3600} h {seconds % 3600 // 60} min"
    return _render(request, "home.html", "Home", nav="home", status=status, met=met, uptime=uptime, **page)


async def setup_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if await services.store.admin_password_hash() is not None:
        raise _redirect("/portal/login")
    value, new = _pre_login_csrf(request)
    return _with_pre_csrf(request, _render(request, "setup.html", "Set up", csrf=value, logged_in=False), value, new)


async def setup_submit(request: web.Request) -> web.Response:
    form = await _post(request)
    _require_csrf(request.cookies.get(PRE_CSRF, ""), form)
    password = str(form.get("password", ""))
    if password != str(form.get("confirm", "")):
        raise _redirect("/portal/setup", ("error", "The two passwords differ."))
    try:
        await auth.set_up(request.app[SERVICES], password)
    except ApiError as e:
        raise _redirect("/portal/login" if e.status == 409 else "/portal/setup", _flash_refusal(e)) from None
    raise _redirect("/portal/login", ("ok", "Password set. Log in with it."))


async def login_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if await services.store.admin_password_hash() is None:
        raise _redirect("/portal/setup")
    if await _session(request):
        raise _redirect("/portal/")
    value, new = _pre_login_csrf(request)
    return _with_pre_csrf(request, _render(request, "login.html", "Log in", csrf=value, logged_in=False), value, new)


async def login_submit(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    form = await _post(request)
    _require_csrf(request.cookies.get(PRE_CSRF, ""), form)
    try:
        token = (await auth.log_in(request.app, auth.client_address(request), str(form.get("password", ""))))["token"]
    except ApiError as e:
        raise _redirect("/portal/login", _flash_refusal(e)) from None
    response = _redirect("/portal/")
    response.set_cookie(SESSION, token, path="/portal", httponly=True, samesite="Strict", secure=request.secure,
                        max_age=int(services.config.admin.token_ttl_hours * 3600))
    response.del_cookie(PRE_CSRF, path="/portal")
    raise response


async def logout(request: web.Request) -> web.Response:
    page, _ = await _form(request)
    await request.app[SERVICES].store.delete_admin_token(page["token_hash"])
    response = _redirect("/portal/login", ("ok", "Logged out."))
    response.del_cookie(SESSION, path="/portal")
    raise response


async def security_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    return _render(request, "security.html", "Security", nav="security", **page)


async def security_submit(request: web.Request) -> web.Response:
    _, form = await _form(request)
    try:
        token = (await auth.change(request.app, auth.client_address(request), str(form.get("current", "")),
                                   str(form.get("new", ""))))["token"]
    except ApiError as e:
        raise _redirect("/portal/security", _flash_refusal(e)) from None
    response = _redirect("/portal/security", ("ok", "Password changed; other sessions were logged out."))
    response.set_cookie(SESSION, token, path="/portal", httponly=True, samesite="Strict", secure=request.secure)
    raise response


# -- devices (clone detection) ---------------------------------------------------------------

CLONES_DAYS = 30


async def devices_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    since = services.ledger.clock() - timedelta(days=CLONES_DAYS)
    rows = await services.store.recent_clones(to_ms(since))  # type: ignore[attr-defined]
    clones = [{"clientUuid": r.client_uuid, "lastCloneAt": iso(from_ms(r.clone_ms or 0)),
               "boundAt": iso(from_ms(r.bound_ms)), "clones": r.clones} for r in rows]
    return _render(request, "devices.html", "Devices", nav="devices", clones=clones, days=CLONES_DAYS, **page)


async def devices_reset(request: web.Request) -> web.Response:
    _, form = await _form(request)
    client = str(form.get("client", "")).strip()
    if not client or len(client) > 128:
        raise _redirect("/portal/devices", ("error", "Give the device's client UUID (1-128 characters)."))
    try:
        await request.app[SERVICES].ledger.reset_device_binding(client)
    except NotFound:
        raise _redirect("/portal/devices", ("error", f"Device {client} is not bound to a fingerprint.")) from None
    raise _redirect("/portal/devices", ("ok", f"The binding of {client} is reset: its next grant binds it again."))


# -- items -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pager:
    total: int
    first: int  # 1-based index of the first row shown
    last: int
    page: int
    pages: int
    previous: str | None  # link, when there is such a page
    next: str | None


def _paged(request: web.Request, rows: list[Any], per_page: int) -> tuple[list[Any], Pager]:
    """The rows of the page named by ?page= (other query parameters kept in the links)."""
    pages = max(1, -(-len(rows) // per_page))
    raw = request.query.get("page", "1")
    number = min(pages, max(1, int(raw))) if raw.isdigit() else 1
    shown = rows[(number - 1) * per_page:number * per_page]
    query = {k: v for k, v in request.query.items() if k != "page"}

    def link(n: int) -> str | None:
        return "?" + urllib.parse.urlencode({**query, "page": n}) if 1 <= n <= pages else None

    first = (number - 1) * per_page + 1
    return shown, Pager(len(rows), first, first + len(shown) - 1, number, pages, link(number - 1), link(number + 1))


def _for_people(status: dict[str, Any]) -> dict[str, Any]:
    return {**status, "usage": usage_text(status), "stateLabel": ItemState(status["state"]).label}


def _items(services: Services) -> list[dict[str, Any]]:
    return [_for_people(s) for s in problems_first([item_status(services, i) for i in services.ledger.items])]


async def items_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    rejected = [{"path": r.path, "reason": r.reason, "seenAt": iso(r.seen_at)[:19].replace("T", " ")}
                for r in services.ledger.open_rejections()]
    items, pager = _paged(request, _items(services), ITEMS_PER_PAGE)
    return _render(request, "items.html", "License items", nav="items", items=items, pager=pager, rejected=rejected,
                   **page)


async def items_import(request: web.Request) -> web.Response:
    _, form = await _form(request)
    services = request.app[SERVICES]
    upload = form.get("file")
    if upload is None or not hasattr(upload, "file"):
        raise _redirect("/portal/items", ("error", "Choose a license file to import."))
    data = upload.file.read(MAX_FILE_BYTES + 1)
    name = Path(upload.filename or "upload.lic").name
    outcome = await services.importer.import_bytes(f"upload:{name}", data)
    if outcome.state == "rejected":
        raise _redirect("/portal/items", ("error", f"{name} was rejected: {outcome.reason}"))
    raise _redirect("/portal/items", ("ok", f"{name}: license {outcome.license_id} {outcome.state}."))


async def item_action(request: web.Request) -> web.Response:
    _, _ = await _form(request)
    services = request.app[SERVICES]
    item_id, action = request.match_info["item_id"], request.match_info["action"]
    try:
        await services.ledger.set_revoked(item_id, action == "revoke")
    except NotFound:
        raise _redirect("/portal/items", ("error", f"No item {item_id}.")) from None
    raise _redirect("/portal/items", ("ok", f"Item {item_id} {'revoked' if action == 'revoke' else 'restored'}."))


# -- handshake codes ------------------------------------------------------------------------

async def codes_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    today = await requests_today(services)
    names, pager = _paged(request, sorted(services.ledger.codes), ITEMS_PER_PAGE)
    codes = [await code_json(services, services.ledger.codes[n], today) for n in names]
    return _render(request, "codes.html", "Handshake codes", nav="codes", codes=codes, pager=pager, **page)


def _lines(value: Any) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value or "").replace(",", "\n").splitlines() if v.strip())


def _form_number(form: Any, name: str, what: str) -> int | None:
    """A whole number from a form field; empty: None."""
    raw = str(form.get(name, "")).strip()
    if not raw:
        return None
    if not raw.lstrip("-").isdigit():
        raise CodeError(name, f"{what}: {raw!r} is not a whole number")
    return int(raw)


def _borrow_and_limits(form: Any) -> tuple[int | None, tuple[SeatLimit, ...]]:
    """The code's borrowing limit and its seat limits per item, from the code form."""
    borrow = _form_number(form, "borrowMaxDays", "Borrowing days")
    limits = []
    for item_id in form.getall("items", []):
        reserved = _form_number(form, f"reservedSeats.{item_id}", f"Reserved seats of {item_id}")
        cap = _form_number(form, f"maxSeats.{item_id}", f"Most seats of {item_id}")
        if reserved or cap is not None:
            limits.append(SeatLimit(item_id, reserved or 0, cap))
    return borrow, tuple(limits)


def _code_form_context(services: Services, code: dict | None, form: dict) -> dict[str, Any]:
    """The form's context. The item picker holds the items of the code's organization only (a new code: of
    the organization chosen, the others hidden until it is chosen instead - portal.js)."""
    orgs = sorted({lic.license.organization_id for lic in services.ledger.licenses.values()})
    org = code["organizationId"] if code else (form.get("organizationId") or (orgs[0] if orgs else ""))
    items = [{**i, "organizationId": services.ledger.items[i["itemId"]].organization_id} for i in _items(services)]
    if code:
        items = [i for i in items if i["organizationId"] == org]
    return {"code": code, "form": form, "organizations": orgs, "all_items": items, "organization": org}


def _typed(form: Any) -> dict[str, Any]:
    """What the admin typed, to show again when the server refuses it (the session password is not)."""
    limits: dict[str, dict[str, str]] = {}
    for key in form:
        field, _, item_id = str(key).partition(".")
        if field in ("reservedSeats", "maxSeats") and item_id and str(form.get(key, "")).strip():
            limits.setdefault(item_id, {})[field] = str(form.get(key, "")).strip()
    borrow = str(form.get("borrowMaxDays", "")).strip()
    return {"custom": str(form.get("custom", "")), "organizationId": str(form.get("organizationId", "")),
            "domains": str(form.get("domains", "")), "appIds": str(form.get("appIds", "")),
            "processNames": str(form.get("processNames", "")), "items": [str(i) for i in form.getall("items", [])],
            "borrowMaxDays": borrow or None, "limits": limits}


def _refused_form(request: web.Request, page: dict[str, Any], title: str, action: str, code: dict | None,
                  form: Any, error: Exception) -> web.Response:
    """The form again, as typed, with the refusal on top (400): nothing typed is lost."""
    text = str(error)
    services = request.app[SERVICES]
    return _render(request, "code_form.html", title, http_status=400, nav="codes", action=action,
                   refusal=f"Not saved: {_sentence(text)}", **_code_form_context(services, code, _typed(form)),
                   **page)


async def code_new_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    form = {"custom": "", "organizationId": request.query.get("organizationId", ""), "domains": "", "appIds": "",
            "processNames": "", "items": [], "borrowMaxDays": None, "limits": {}}
    return _render(request, "code_form.html", "Add a handshake code", nav="codes", action="/portal/codes/new",
                   **_code_form_context(services, None, form), **page)


async def code_new_submit(request: web.Request) -> web.Response:
    page, form = await _form(request)
    services = request.app[SERVICES]
    password = str(form.get("sessionPassword", ""))
    try:
        borrow, limits = _borrow_and_limits(form)
        fields = CodeFields(custom=str(form.get("custom", "")), items=tuple(form.getall("items", [])),
                            domains=_lines(form.get("domains")), app_ids=_lines(form.get("appIds")),
                            process_names=_lines(form.get("processNames")),
                            password_hash=services.ledger.hash_session_password(password) if password else None,
                            borrow_max_days=borrow, seat_limits=limits)
        code = await services.ledger.create_code(str(form.get("organizationId", "")), fields)
    except CodeError as e:
        return _refused_form(request, page, "Add a handshake code", "/portal/codes/new", None, form, e)
    raise _redirect("/portal/codes", ("ok", f"Handshake code {code.name} created."))


async def code_edit_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    code = services.ledger.codes.get(request.match_info["name"])
    if code is None:
        raise _redirect("/portal/codes", ("error", "No such handshake code."))
    data = await code_json(services, code)
    form = {"custom": data["custom"], "domains": "\n".join(code.domains), "appIds": "\n".join(code.app_ids),
            "processNames": "\n".join(code.process_names), "items": list(code.items),
            "borrowMaxDays": code.borrow_max_days, "limits": data["itemLimits"]}
    return _render(request, "code_form.html", f"Edit {code.name}", nav="codes",
                   action=f"/portal/codes/{code.name}/edit", **_code_form_context(services, data, form), **page)


async def code_edit_submit(request: web.Request) -> web.Response:
    page, form = await _form(request)
    services = request.app[SERVICES]
    name = request.match_info["name"]
    password = str(form.get("sessionPassword", ""))
    password_hash = "" if form.get("removePassword") else (
        services.ledger.hash_session_password(password) if password else None)
    try:
        borrow, limits = _borrow_and_limits(form)
        fields = CodeFields(custom=str(form.get("custom", "")) or None, items=tuple(form.getall("items", [])),
                            domains=_lines(form.get("domains")), app_ids=_lines(form.get("appIds")),
                            process_names=_lines(form.get("processNames")), password_hash=password_hash,
                            borrow_max_days=borrow, seat_limits=limits)
        code = await services.ledger.edit_code(name, fields)
    except NotFound:
        raise _redirect("/portal/codes", ("error", f"No handshake code {name}.")) from None
    except CodeError as e:
        old = services.ledger.codes.get(name)
        data = await code_json(services, old) if old else None
        return _refused_form(request, page, f"Edit {name}", f"/portal/codes/{name}/edit", data, form, e)
    raise _redirect("/portal/codes", ("ok", f"Handshake code {code.name} saved."))


async def code_delete(request: web.Request) -> web.Response:
    _, form = await _form(request)
    name = request.match_info["name"]
    code = request.app[SERVICES].ledger.codes.get(name)
    if code is None:
        raise _redirect("/portal/codes", ("error", f"No handshake code {name}."))
    if code.is_default and form.get("confirm") != "default":
        raise _redirect("/portal/codes", ("error", default_code_refusal(code)))
    await request.app[SERVICES].ledger.delete_code(name)
    restore = (f" Restore it with `ltsctl codes restore-default {code.source_license_id}`."
               if code.is_default else "")
    raise _redirect("/portal/codes", ("ok", f"Handshake code {name} deleted; its statistics stay.{restore}"))


async def order_page(request: web.Request) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    code = services.ledger.codes.get(request.match_info["name"])
    if code is None:
        raise _redirect("/portal/codes", ("error", "No such handshake code."))
    items = [item_status(services, i) for i in services.ledger.ordered_items(code) if i in services.ledger.items]
    return _render(request, "order.html", f"Usage order of {code.name}", nav="codes",
                   code=await code_json(services, code), items=items, **page)


async def order_submit(request: web.Request) -> web.Response:
    _, form = await _form(request)
    services = request.app[SERVICES]
    name = request.match_info["name"]
    code = services.ledger.codes.get(name)
    if code is None:
        raise _redirect("/portal/codes", ("error", "No such handshake code."))
    if form.get("default"):
        await services.ledger.set_usage_order(name, None)
        raise _redirect(f"/portal/codes/{name}/order", ("ok", "Back to the default order."))
    order = services.ledger.ordered_items(code)
    item_id, direction = str(form.get("move", "")), form.get("direction")
    if item_id in order:
        i = order.index(item_id)
        j = i - 1 if direction == "up" else i + 1
        if 0 <= j < len(order):
            order[i], order[j] = order[j], order[i]
    await services.ledger.set_usage_order(name, tuple(order))
    raise _redirect(f"/portal/codes/{name}/order", ("ok", f"{item_id} moved {direction}."))


# -- statistics ----------------------------------------------------------------------------

def _day(name: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return query_time(name, value + "T00:00:00Z")
    except ApiError:
        raise web.HTTPBadRequest(text=f"{name}: not a date between {iso(EARLIEST)[:10]} and {iso(LATEST)[:10]}: "
                                      f"{value!r}") from None


async def _stats_page(request: web.Request, scope: str, key: str, subject: str,
                      items: list[dict[str, Any]]) -> web.Response:
    page = await _logged_in(request)
    services = request.app[SERVICES]
    now = services.ledger.clock()
    day = _day("day", request.query.get("day"))
    if day is not None:
        start, end, bucket = day, day + timedelta(days=1), "3m"
    else:
        end = (_day("to", request.query.get("to")) or now.replace(hour=0, minute=0, second=0, microsecond=0)
               ) + timedelta(days=1)
        start = _day("from", request.query.get("from")) or end - timedelta(days=7)
        bucket = "2h" if end - start <= timedelta(days=31) else "1d"
        daily_days = services.config.stats.daily_days
        if bucket == "1d" and daily_days and start < now - timedelta(days=daily_days):
            bucket = "1mo"  # daily buckets that old are no longer kept ([stats] daily_days)
        if start >= end:
            raise _redirect(request.path, ("error", "The start of the period must be before its end."))
        try:
            check_span(bucket, start, end)
        except ApiError:
            raise _redirect(request.path, ("error", f"Choose a period of at most {MAX_BUCKETS:,} days.")) from None
    body = await compute_stats(services, scope, key, bucket, start, min(end, now + timedelta(minutes=3)) if day else end)
    summary = body["summary"]
    # Buckets of this size before retainedFrom are no longer kept ([stats] hourly_days, daily_days).
    pruned = body["retainedFrom"] if body["retainedFrom"] and parse_iso(body["retainedFrom"]) > start else None
    donuts = [{"label": label, "svg": donut([Slice("granted", s["granted"], GRANTED),
                                              Slice("refused", s["refused"], REFUSED)], label)}
              for label, s in (("All history", summary["all"]), ("Selected period", summary["period"]),
                               ("Today", summary["today"]))]
    series = body["series"]
    labels = [b["start"][5:16].replace("T", " ") for b in series]
    lines = [Line("granted", GRANTED, [b["granted"] for b in series]),
             Line("refused", REFUSED, [b["refused"] for b in series])]
    limit, limit_label = None, ""
    item = services.ledger.items.get(key) if scope == "item" else None
    if item is not None and item.rules.counts in (Counts.SEATS, Counts.CONCURRENCY):
        # The item's limit is on devices: chart them against it.
        lines.append(Line("active devices", DEVICES, [b["devices"] for b in series]))
        limit = item.quantity
        limit_label = "seats" if item.rules.counts is Counts.SEATS else "devices at once"
    handshakes = trend(labels, lines, "Granted and refused handshakes per bucket", limit=limit,
                       limit_label=limit_label)
    unit_counts = [b["units"] for b in series]
    counts_units = any(i.get("units") for i in items) or any(unit_counts)
    units = trend(labels, [Line("units", UNITS, unit_counts)], "Units (scans, pages) per bucket") if counts_units else None
    # Long tables are paged: a week of 2-hour buckets is up to 84 rows.
    shown, pager = _paged(request, [b for b in series if b["granted"] or b["refused"] or b["units"] or b["devices"]],
                          ROWS_PER_PAGE)
    return _render(request, "stats.html", f"Statistics of {subject}", nav="codes" if scope == "code" else "items",
                   subject=subject, items=items, donuts=donuts, trend=handshakes, devices_charted=limit is not None,
                   units_trend=units, rows=shown, pager=pager, summary=summary, pruned=pruned, bucket=bucket,
                   day=day.strftime("%Y-%m-%d") if day else None, from_day=start.strftime("%Y-%m-%d"),
                   to_day=(end - timedelta(days=1)).strftime("%Y-%m-%d"), **page)


async def code_stats_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["name"]
    code = services.ledger.codes.get(name)
    if code is None and not await services.store.rollup_series("code", name, "all", 0, 1):
        await _logged_in(request)
        raise web.HTTPNotFound(text=f"There is no handshake code {name}, and none by that name ever had requests.")
    items = [_for_people(item_status(services, i)) for i in services.ledger.ordered_items(code)
             if i in services.ledger.items] if code else []
    return await _stats_page(request, "code", name, f"handshake code {name}", items)


async def item_stats_page(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    item_id = request.match_info["item_id"]
    if item_id not in services.ledger.items:
        await _logged_in(request)
        raise web.HTTPNotFound(text=f"There is no license item {item_id}.")
    return await _stats_page(request, "item", item_id, f"item {item_id}", [_for_people(item_status(services, item_id))])


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/portal", to_portal)
    r.add_get("/portal/", index)
    r.add_get("/portal/setup", setup_page)
    r.add_post("/portal/setup", setup_submit)
    r.add_get("/portal/login", login_page)
    r.add_post("/portal/login", login_submit)
    r.add_post("/portal/logout", logout)
    r.add_get("/portal/security", security_page)
    r.add_get("/portal/devices", devices_page)
    r.add_post("/portal/devices/reset", devices_reset)
    r.add_post("/portal/security", security_submit)
    r.add_get("/portal/items", items_page)
    r.add_post("/portal/items/import", items_import)
    r.add_post("/portal/items/{item_id}/{action:revoke|restore}", item_action)
    r.add_get("/portal/codes", codes_page)
    r.add_get("/portal/codes/new", code_new_page)
    r.add_post("/portal/codes/new", code_new_submit)
    r.add_get("/portal/codes/{name}/edit", code_edit_page)
    r.add_post("/portal/codes/{name}/edit", code_edit_submit)
    r.add_post("/portal/codes/{name}/delete", code_delete)
    r.add_get("/portal/codes/{name}/order", order_page)
    r.add_post("/portal/codes/{name}/order", order_submit)
    r.add_get("/portal/stats/code/{name}", code_stats_page)
    r.add_get("/portal/stats/item/{item_id}", item_stats_page)
    r.add_static("/portal/static/", HERE / "static", append_version=False)


async def to_portal(request: web.Request) -> web.Response:
    raise _redirect("/portal/")
