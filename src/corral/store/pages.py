"""Pages of List results: a page size check and opaque tokens that resume after a row.

A token is the (created_at, id) of the last row of a page, so the next page starts
strictly after it whatever was inserted meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from corral.errors import InvalidRequest

MAX_PAGE_SIZE = 1000
_BAD_TOKEN = "page_token is invalid; pass the next_page_token of the previous List response"


def check_page_size(page_size: object) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise InvalidRequest(f"page_size={page_size!r} must be an integer")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size={page_size} is out of range: use 1 to {MAX_PAGE_SIZE}")
    return page_size


def encode_token(created_at: datetime, row_id: str) -> str:
    cursor = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(cursor).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, row_id = json.loads(raw)
        at = datetime.fromisoformat(created)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(_BAD_TOKEN) from None
    if not isinstance(row_id, str) or at.tzinfo is None:
        raise InvalidRequest(_BAD_TOKEN)
    return at, row_id
