"""Structured JSON logs, one object per line, with secrets redacted.

Every secret the process knows (tokens, signing secret, etcd password) is
registered here; a filter replaces it wherever it would appear, including
in tracebacks, so a stray f-string cannot leak one.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

_SECRETS: set[str] = set()
REDACTED = "[redacted]"


def register_secret(*values: str | None) -> None:
    for v in values:
        if v and len(v) >= 6:
            _SECRETS.add(v)


def redact(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key.startswith("ctx_"):
                entry[key[4:]] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # slack_sdk logs full request bodies at DEBUG; keep third parties at WARNING.
    for noisy in ("slack_sdk", "slack_bolt", "aiohttp.access", "asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
