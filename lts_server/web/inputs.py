"""What any request may carry, checked before a handler, a decoder or a database sees it.

- JSON nested deeper than MAX_JSON_DEPTH is refused before any recursive decoding: our bodies are
  at most two levels deep (device bodies are flat), and a 2 KB body nested a thousand deep made
  the decoders raise RecursionError (a 500 with a traceback logged each time).
- Text that no database can store is refused with the same 400 on every backend: the NUL character
  (PostgreSQL refuses it in text, and one such value used to fail its whole write batch, so one
  hostile request made its neighbours' requests fail) and lone surrogates (not Unicode text; JSON
  bodies cannot carry them past msgspec, but other decoders can). Checked in JSON bodies, the URL
  path and query, and form fields.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from lts_server import logs
from lts_server.web.errors import ApiError

MAX_JSON_DEPTH = 16
# Brackets as ( and ), everything else dropped: what json_too_deep measures.
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DEEP_RUN = b"(" * (MAX_JSON_DEPTH + 1)


def json_too_deep(body: bytes) -> bool:
    """Whether the JSON text nests arrays and objects more than MAX_JSON_DEPTH deep, found without
    decoding it and in C-speed passes over the bytes (a loop in Python over 16 KB of brackets would
    cost more than decoding them): strings are cut out (escaped backslashes and quotes first), the
    brackets kept, then innermost pairs removed a level at a time. Opening brackets left unclosed
    count as levels too (a recursive decoder descends into them before it finds the text cut short)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    if b'"' in body:
        body = b"".join(body.split(b'"')[::2])
    marks = body.translate(_BRACKETS, _NOT_BRACKETS)
    if _DEEP_RUN in marks:
        return True
    for _ in range(MAX_JSON_DEPTH):
        if b"()" not in marks:
            break
        marks = marks.replace(b"()", b"")
    return b"()" in marks or marks.count(b"(") > MAX_JSON_DEPTH


def bad_char(text: str) -> str | None:
    """Why the text cannot be stored (it holds a NUL, or a lone surrogate), or None when it can."""
    if "\x00" in text:
        return "must not contain the NUL character (U+0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"must be Unicode text, not the lone surrogate U+{ord(text[e.start]):04X}"
    return None


def check_text(text: str, field: str) -> None:
    """A 400 naming `field` unless every backend can store the text."""
    why = bad_char(text)
    if why is not None:
        raise ApiError(400, f"{field}: {why}", field)


def check_json(body: bytes, text: str) -> None:
    """Refuse a JSON body nested too deeply or holding text no database can store (see the module)."""
    if json_too_deep(body):
        logs.event_limited("http.json_too_deep", logs.logging.WARNING, bytes=len(body))
        raise ApiError(400, f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; at most "
                            f"{MAX_JSON_DEPTH} are accepted")
    # Decoded JSON text holds a NUL only through the escape \u0000 (raw control characters are not JSON),
    # and a lone surrogate only through \uD800-\uDFFF: without a \u escape there is nothing to look for.
    if b"\\u" not in body:
        return
    try:
        value = json.loads(text)
    except ValueError:
        return  # not JSON: the typed decoder names the problem
    _check_value(value, "")


def _check_value(value: Any, path: str) -> None:
    if isinstance(value, str):
        check_text(value, path or "body")
    elif isinstance(value, dict):
        for key, member in value.items():
            where = f"{path}.{key}" if path else key
            check_text(key, where)
            _check_value(member, where)
    elif isinstance(value, list):
        for i, member in enumerate(value):
            _check_value(member, f"{path}[{i}]")


def check_url(request: web.BaseRequest) -> None:
    """A 400 when the decoded path or a query parameter holds text no database can store."""
    if bad_char(request.path) is not None:
        check_text(request.path, "path")
    if request.query_string and bad_char(request.query_string) is not None:
        for name, value in request.query.items():
            check_text(name, name)
            check_text(value, name)
        check_text(request.query_string, "query")


def check_form(form: Any) -> None:
    """A 400 naming the field when a submitted form value holds text no database can store."""
    for name, value in form.items():
        if isinstance(value, str):
            check_text(value, name)


@web.middleware
async def refuse_unstorable_urls(request: web.Request, handler: Any) -> web.StreamResponse:
    check_url(request)
    return await handler(request)
