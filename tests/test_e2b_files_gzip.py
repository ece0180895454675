"""envd's `GET /files` chooses gzip only when it pays: a client that accepts gzip (E2B's
SDK always does) gets a compressible file gzipped and an incompressible one (random,
already compressed) or a tiny one as it is; HTTP content negotiation lets the server
answer identity whatever the client accepts. Against a real server and sandbox.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer
from tests.test_e2b_files import Envd, sandbox, unique  # noqa: F401 (sandbox: a fixture)

pytestmark = pytest.mark.usefixtures("sandbox_host")


@pytest.fixture
def client(server: LiveServer, sandbox: str) -> Iterator[Envd]:  # noqa: F811
    envd = Envd(server, sandbox)
    yield envd
    envd.http.close()


def _raw_get(envd: Envd, name: str, accept: str) -> tuple[str | None, bytes]:
    """The response's Content-Encoding and its bytes as sent (not decoded)."""
    with envd.http.stream(
        "GET", "/files", params={"path": name}, headers={"Accept-Encoding": accept}
    ) as response:
        assert response.status_code == 200
        return response.headers.get("content-encoding"), b"".join(response.iter_raw())


def _put(envd: Envd, name: str, data: bytes) -> None:
    response = envd.http.post(
        "/files", params={"path": name}, content=data,
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert response.status_code == 200, response.text


def test_compressible_files_come_gzipped_when_accepted(client: Envd) -> None:
    name = unique("text")
    data = b"a line of text that repeats\n" * 200_000  # 5.6 MB, many chunks
    _put(client, name, data)
    encoding, raw = _raw_get(client, name, "gzip, deflate")
    assert encoding == "gzip" and len(raw) < len(data) // 10
    assert gzip.decompress(raw) == data
    encoding, raw = _raw_get(client, name, "identity")
    assert encoding is None and raw == data


def test_incompressible_and_tiny_files_come_as_they_are(client: Envd) -> None:
    random_name, tiny_name = unique("random"), unique("tiny")
    random = os.urandom(2 << 20)
    _put(client, random_name, random)
    _put(client, tiny_name, b"hi\n")
    for name, data in ((random_name, random), (tiny_name, b"hi\n")):
        encoding, raw = _raw_get(client, name, "gzip")
        assert encoding is None and raw == data
