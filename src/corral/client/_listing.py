"""Listing a team's sandboxes: the request both SDKs send, and the sync list.

`list_sandboxes` is `Sandbox.list`; it makes plain HTTP calls (`_unary`), so a process
that only lists (`corral sandbox list`) loads neither asyncio nor the RPC runtime. Import
it from here, not through `corral.client`, to keep it that way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from corral._state_enums import SANDBOX_STATE_NUMBERS as STATE_NUMBERS
from corral.client import _unary
from corral.client._config import ClientSettings
from corral.client._models import SandboxInfo
from corral.errors import InvalidRequest
from corral.v1 import sandbox_pb2 as pb

_PAGE_SIZE = 1000  # the most the server gives in one page


def list_request(states: Sequence[str], metadata: Mapping[str, str] | None) -> pb.ListRequest:
    """The request for the first page; an unknown state is refused before any call."""
    unknown = [s for s in states if s not in STATE_NUMBERS]
    if unknown:
        raise InvalidRequest(f"unknown state {unknown[0]!r}: use {', '.join(STATE_NUMBERS)}")
    return pb.ListRequest(
        states=[STATE_NUMBERS[s] for s in states],
        metadata=dict(metadata or {}),
        page_size=_PAGE_SIZE,
    )


def list_sandboxes(
    *,
    states: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    api_key: str | None = None,
    server: str | None = None,
    context: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    request_timeout: float | None = None,
) -> list[SandboxInfo]:
    """Your team's sandboxes (by default every one not killed or failed), all pages."""
    request = list_request(states, metadata)
    settings = ClientSettings.resolve(
        server=server, api_key=api_key, context=context, ca_file=ca_file, timeout=request_timeout
    )
    found: list[SandboxInfo] = []
    while True:
        reply = _unary.call(settings, "corral.v1.SandboxService/List", request, pb.ListResponse)
        found.extend(SandboxInfo.from_proto(s) for s in reply.sandboxes)
        if not reply.next_page_token:
            return found
        request.page_token = reply.next_page_token
