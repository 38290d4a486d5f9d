"""JSON errors for every failure: a precise message, the documented code, never a traceback.

Licensing refusals carry the reference codes (100-151) and their SDK codes;
protocol and server failures carry their HTTP status as the code (400, 401,
403, 404, 405, 413, 415, 500, 503), so the two ranges never collide.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from lts_server import logs
from lts_server.archive import ArchiveUnwritable
from lts_server.core.codes import CodeError
from lts_server.core.versions import PROTOCOL_VERSIONS, protocol_problem
from lts_server.errors import Code, Refusal
from lts_server.ledger import JobFailed, LedgerClosed, NotBorrowed, NotFound, UsageError
from lts_server.store import StoreError, StoreFull, StoreInDoubt, StoreUnavailable, StoreUnreachable, Unstorable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def error_response(status: int, message: str, field: str | None = None, code: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, object] = {"code": code if code is not None else status, "message": message}
    if field is not None:
        body["field"] = field
    return web.Response(status=status, body=json.dumps({"error": body}), content_type="application/json",
                        headers=headers)


def validation_error(e: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    text = str(e)
    if isinstance(e, msgspec.ValidationError):
        msg, _, where = text.partition(" - at `$")
        field = where.rstrip("`").lstrip(".") or None
        if msg.startswith(("Object missing required field", "Object contains unknown field")):
            name = msg.split("`")[1]
            field = f"{field}.{name}" if field else name
            msg = (f"required; add {name} to the JSON body (docs/api.md lists the fields)"
                   if msg.startswith("Object missing") else "unknown field; remove it (docs/api.md lists the fields)")
        else:
            msg = f"{msg}; send a value of that kind"
        return ApiError(400, f"{field}: {msg}" if field else msg, field)
    return ApiError(400, f"the body is not valid JSON: {text}; send one JSON object")


class ProtocolRefused(Exception):
    """105: the request speaks a protocol version this server does not (answered 403 with the versions it does)."""


def protocol_refusal(message: str) -> bytes:
    """The 403 body of a 105: the refusal and the versions spoken, for the client to pick one."""
    return json.dumps({"error": {**Refusal(Code.BAD_PROTOCOL, message).to_json(),
                                 "protocolVersions": list(PROTOCOL_VERSIONS)}}).encode()


class DeviceDecoder:
    """A device endpoint's body decoder, made once. A body that does not decode but names a protocolVersion
    this server does not speak gets 105, not the 400: a newer client's new fields are why it does not
    decode, and the versions spoken are what it can act on (docs/api.md: the version is checked first)."""

    def __init__(self, kind: type) -> None:
        self._decoder = msgspec.json.Decoder(kind)

    def decode(self, body: bytes) -> Any:
        try:
            return self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            if (unspoken := _unspoken_protocol(body)) is not None:
                raise ProtocolRefused(unspoken) from None
            raise


def _unspoken_protocol(body: bytes) -> str | None:
    try:
        version = msgspec.json.decode(body).get("protocolVersion")
    except (msgspec.DecodeError, AttributeError):  # not JSON, or not an object
        return None
    return protocol_problem(version) if type(version) is int else None


def decode_json(body: bytes, kind: type | msgspec.json.Decoder[Any] | DeviceDecoder) -> Any:
    """Decode and validate a request body, or raise the 400 that names the field. `kind`: the type, or a
    decoder made for it once (the device endpoints: no decoder built per request)."""
    try:
        if isinstance(kind, (msgspec.json.Decoder, DeviceDecoder)):
            return kind.decode(body)
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        # msgspec stops at the first problem it meets: in `{"x":` that is the unknown field, but the body
        # is not JSON at all, and that is what to fix first (only this failing path parses it again).
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as not_json:
            raise validation_error(not_json) from None
        raise validation_error(e) from None
    except msgspec.DecodeError as e:
        raise validation_error(e) from None


CLIENT_GONE = "the connection was closed before the request was complete"
UNSTORABLE = "the request holds a value this server's database cannot store; nothing was recorded"
IN_DOUBT = ("storage unavailable (the connection to the database was lost during the commit), the request may or "
            "may not have been recorded; retry later (a recorded grant comes back as a refresh of the same seat, "
            "a recorded usage report is known by its reportId)")


def client_gone(request: web.Request, error: Exception) -> bool:
    """Whether the error is the client going away mid-request (say, mid-body): its business, not a fault
    of ours, so one rate-limited line instead of a traceback."""
    if isinstance(error, ConnectionError) and (request.transport is None or request.transport.is_closing()):
        logs.event_limited("http.client_gone", path=request.path, error=str(error))
        return True
    return False


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as e:
        return error_answer(request, e)


def _where_to_look(what: str) -> str:
    """The command that lists what exists, for a 404's message."""
    for noun, command in (("handshake code", "ltsctl codes list"), ("seat", "ltsctl devices list ITEM"),
                          ("item", "ltsctl items list"), ("license", "ltsctl licenses list"),
                          ("import", "ltsctl imports")):
        if what.startswith(noun):
            return f"`{command}` shows what exists"
    return "check the name"


def error_answer(request: web.BaseRequest, error: Exception) -> web.Response:
    """The JSON answer for a failure; an HTTP exception below 400 (a redirect) is raised again."""
    try:  # raised again to pick the answer with the except clauses below
        raise error
    except ApiError as e:
        return error_response(e.status, e.message, e.field)
    except ProtocolRefused as e:
        return web.Response(status=403, body=protocol_refusal(str(e)), content_type="application/json")
    except (CodeError, UsageError) as e:
        return error_response(getattr(e, "status", 400), str(e), e.field)
    except NotFound as e:
        return error_response(404, f"no such {e.what}; {_where_to_look(e.what)}")
    except NotBorrowed as e:
        return error_response(409, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return error_response(e.status, message or e.reason, headers={k: v for k, v in e.headers.items()
                                                                         if k.lower() == "allow"})
    # The store's messages name the database file: the log gets them, clients a plain reason. A locked
    # or full database fails every request alike: one line per interval says so.
    except Unstorable as e:  # the request's own value (the text checks at the edge let nothing known through)
        logs.event_limited("http.unstorable", logs.logging.WARNING, path=request.path, error=str(e))
        return error_response(400, UNSTORABLE)
    except StoreInDoubt as e:  # the commit was on its way: "nothing was recorded" may not be true
        logs.event_limited("http.store_unavailable", logs.logging.ERROR, path=request.path, error=str(e))
        return error_response(503, IN_DOUBT, headers={"Retry-After": "5"})
    except StoreUnavailable as e:
        logs.event_limited("http.store_unavailable", logs.logging.ERROR, path=request.path, error=str(e))
        why = "the database cannot be reached" if isinstance(e, StoreUnreachable) else "the database is locked or busy"
        return error_response(503, f"storage unavailable ({why}), nothing was recorded; retry later",
                              headers={"Retry-After": "5"})
    except StoreFull as e:
        logs.event_limited("http.store_error", logs.logging.ERROR, path=request.path, error=str(e))
        return error_response(503, "storage full, nothing was recorded; retry later", headers={"Retry-After": "30"})
    except StoreError as e:
        logs.event_limited("http.store_error", logs.logging.ERROR, path=request.path, error=str(e))
        return error_response(503, "storage error, nothing was recorded; retry later", headers={"Retry-After": "30"})
    except ArchiveUnwritable as e:  # the admin asked for the run: the folder and the reason are theirs to see
        logs.event_limited("http.archive_unwritable", logs.logging.ERROR, path=request.path, error=str(e))
        return error_response(503, str(e), headers={"Retry-After": "30"})
    except LedgerClosed as e:
        return error_response(503, str(e), headers={"Retry-After": "5"})
    except JobFailed as e:
        return error_response(500, str(e))
    except Exception as e:  # the client gets a line, the log gets the traceback
        if client_gone(request, e):
            return error_response(400, CLIENT_GONE)
        logs.log.exception("http.internal_error", extra={"fields": {"path": request.path}})
        return error_response(500, f"internal error ({type(e).__name__}); see the server log")


class _JsonErrorsHandler(RequestHandler):
    """aiohttp's protocol, answering requests it cannot parse in the JSON error format."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: nothing more can be said
            raise ConnectionError("the answer was partly sent; cannot send an error after it")
        if status >= 500:
            logs.log.error("http.internal_error", exc_info=exc)
            text = "internal error; see the server log"
        else:
            reason = (getattr(exc, "message", None) or message or str(exc or "") or "bad request").strip()
            logs.event_limited("http.bad_request", logs.logging.WARNING, status=status, error=reason)
            text = f"the request is not valid HTTP ({reason}); send each header once, in a well-formed request"
        response = error_response(status, text)
        response.force_close()
        return response


def json_protocol_errors(handler: RequestHandler) -> RequestHandler:
    """A request aiohttp cannot parse (two Content-Type headers, a bad request line, a head too large) gets
    the JSON error format too, instead of aiohttp's text/plain page, and one log line, not a traceback."""
    handler.__class__ = _JsonErrorsHandler  # the same slots: only handle_error differs
    return handler


def query_int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """A whole-number query parameter within [low, high], or a 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name}: expected a whole number from {low} to {high}, got {raw!r}", name)
    return int(raw)
