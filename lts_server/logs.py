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
