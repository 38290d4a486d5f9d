"""Structured logging: one line per event, JSON for journald, never a secret."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# A field whose name contains one of these is never written out.
SECRET_WORDS = ("password", "secret", "token", "private", "signature", "key_pem")

log = logging.getLogger("lts_server")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields; secrets are dropped by name before formatting."""
    log.log(level, name, extra={"fields": redact(fields)})


# A condition that can repeat thousands of times a second (slow clients, a full accept
# queue) is logged at most once per this many seconds; the next line says how many were left out.
REPEAT_INTERVAL = 10.0
_last_logged: dict[str, float] = {}
_left_out: dict[str, int] = {}


def event_limited(name: str, level: int = logging.INFO, interval: float = REPEAT_INTERVAL,
                  exc_info: BaseException | None = None, key: str | None = None, **fields: Any) -> bool:
    """Log an event unless the same one (same `key`, default the name) was logged less than
    `interval` seconds ago; True when logged."""
    key = key or name
    now = time.monotonic()
    last = _last_logged.get(key)
    if last is not None and now - last < interval:
        _left_out[key] = _left_out.get(key, 0) + 1
        return False
    _last_logged[key] = now
    left_out = _left_out.pop(key, 0)
    if left_out:
        fields["repeatsNotLogged"] = left_out
    log.log(level, name, exc_info=exc_info, extra={"fields": redact(fields)})
    return True


def loop_exception_handler(loop: Any, context: dict[str, Any]) -> None:
    """asyncio's errors (such as accept() failing for want of file descriptors, which repeats
    at every attempt) as one rate-limited line per kind instead of a traceback each time."""
    message = str(context.get("message") or "unhandled exception in the event loop")
    error = context.get("exception")
    event_limited("asyncio.error", logging.ERROR, key=f"asyncio:{message}", message=message,
                  error=f"{type(error).__name__}: {error}" if error else None, exc_info=error)


def redact(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: ("[redacted]" if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: str = "info", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per request; our own events say more.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite logs every statement at debug level, parameters included.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
