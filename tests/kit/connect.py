"""The API as any HTTP client speaks it: Connect JSON over httpx (what curl sends).

Tests of the wire itself (statuses, envelopes, error bodies) call the server through these
rather than through the SDK, so that they see exactly what goes over the wire.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.conftest import LiveServer

SERVICE = "/corral.v1.SandboxService/"


def call(
    server: LiveServer,
    method: str,
    body: Any = None,
    *,
    key: str | None = "",
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    key = server.key if key == "" else key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body or {}).encode()
    return httpx.post(server.url + SERVICE + method, content=content, headers=headers, timeout=30)


def stream(
    server: LiveServer,
    method: str,
    body: dict[str, Any],
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A server-streaming call with the Connect JSON envelopes: (messages, end message)."""
    payload = json.dumps(body).encode()
    response = httpx.post(
        server.url + SERVICE + method,
        content=struct.pack(">BI", 0, len(payload)) + payload,
        headers={
            "Content-Type": "application/connect+json",
            "Authorization": f"Bearer {key or server.key}",
            **(headers or {}),
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    messages, end, data = [], {}, response.content
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        message = json.loads(data[5 : 5 + length])
        data = data[5 + length :]
        if flags & 0x02:
            end = message
        else:
            messages.append(message)
    return messages, end


def assert_serving(server: LiveServer) -> None:
    response = call(server, "List")
    assert response.status_code == 200, response.text


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert "Traceback" not in body["message"]
    return str(body["message"])
