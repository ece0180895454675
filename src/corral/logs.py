"""Corral's log: configured here, by entry points only, and carrying the ids of the work.

`corral server`, `worker`, `admin` and `doctor` call `configure`: every logger (Corral's,
uvicorn's) writes one JSON object per line on stderr, a record's `extra` as fields.
Library code (the engine used on its own included) only logs through named loggers and
never configures handlers.

The ids of the work being done (request, team, sandbox, job) live in one context
variable, set where that work enters: the server's ASGI app starts a request,
authentication binds its team, the sandbox manager binds the sandbox an operation is on,
the job worker starts each claimed job. Every record logged meanwhile carries them as
fields, so messages never interpolate them, and tasks started for that work (asyncio
copies the context) carry them too.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, TypedDict, Unpack

from corral.config import LOG_LEVELS

# The ids of the work being done, by field name; replaced, never mutated, so that a task
# started for the work keeps what was bound when it started.
_ids: ContextVar[Mapping[str, object]] = ContextVar("corral_log_ids", default=MappingProxyType({}))


class Ids(TypedDict, total=False):
    """The ids a log line can carry from its context."""

    request_id: str
    team_id: str
    sandbox_id: str
    job_id: str


def start(**ids: Unpack[Ids]) -> None:
    """New work begins in this task: forget the ids of earlier work, bind these."""
    _ids.set(MappingProxyType(dict(ids)))


def bind(**ids: Unpack[Ids]) -> None:
    """Add ids to the current work's."""
    _ids.set(MappingProxyType({**_ids.get(), **ids}))


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


class _ContextIds(logging.Filter):
    """Adds the current work's ids to every record (an id given in `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _ids.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


# Attributes every LogRecord has; anything else came from `extra=` (or the context).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's, for its own console formatter
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send every logger (Corral's and uvicorn's) to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ContextIds())
    set_level(level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def set_level(level: str) -> None:
    """Log records of `level` and above from now on (at start, and on a reload)."""
    if level.lower() not in LOG_LEVELS:
        from corral.errors import InvalidRequest

        raise InvalidRequest(f"log level {level!r} is unknown: use {', '.join(LOG_LEVELS)}")
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    # Migrations say what they do at info, every start, and httpx logs every request it
    # sends (callback deliveries, the demo's health poll): only their warnings matter here.
    for name in ("alembic", "httpx"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
