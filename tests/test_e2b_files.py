"""E2B envd's files on the wire: `filesystem.Filesystem` (Connect JSON), the polling and
streaming watchers, HTTP `/files` and signed URLs, against a real server and sandboxes.

The sandboxes are made with Corral's own SDK and reached the way E2B's SDK reaches envd:
one URL, the header `E2b-Sandbox-Id`, the user as `Authorization: Basic`. A sandbox not
created through E2B's API needs its team's key (`X-API-KEY`); the signed-URL tests give
theirs an envd access token by writing its E2B row, as E2B's create would.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import secrets
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from corral.store import Store
from corral.store.e2b import E2bSandboxRow
from tests.conftest import LiveServer, opts

pytestmark = pytest.mark.usefixtures("sandbox_host")


class Envd:
    """One sandbox's envd on the server, as E2B's SDK calls it."""

    def __init__(self, server: LiveServer, sandbox_id: str, user: str | None = None) -> None:
        self.url = server.url
        self.sandbox_id = sandbox_id
        self.headers = {"E2b-Sandbox-Id": sandbox_id, "X-API-KEY": server.key}
        if user is not None:
            basic = base64.b64encode(f"{user}:".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"
        self.http = httpx.Client(base_url=server.url, headers=self.headers, timeout=60)

    def rpc(self, method: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(
            f"/filesystem.Filesystem/{method}",
            json=body,
            headers={"Connect-Protocol-Version": "1"},
        )

    def ok(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.rpc(method, body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def upload(self, path: str, data: bytes, **headers: str) -> httpx.Response:
        return self.http.post("/files", params={"path": path}, files={"file": (path, data)},
                              headers=headers)  # fmt: skip

    def download(self, path: str, **params: str) -> httpx.Response:
        return self.http.get("/files", params={"path": path, **params})


@pytest.fixture(scope="module")
def sandbox(server: LiveServer) -> Iterator[str]:
    box = Sandbox.create(timeout=600, **opts(server))
    try:
        yield box.sandbox_id
    finally:
        box.kill()
        box.close()


@pytest.fixture
def envd(server: LiveServer, sandbox: str) -> Iterator[Envd]:
    client = Envd(server, sandbox)
    yield client
    client.http.close()


def run(server: LiveServer, sandbox_id: str, command: str) -> str:
    box = Sandbox.connect(sandbox_id, **opts(server))
    try:
        done = box.commands.run(command)
        assert done.exit_code == 0, done.stderr
        return done.stdout
    finally:
        box.close()


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


# -- /files and Stat ----------------------------------------------------------------------


def test_upload_then_stat_read_and_own_as_the_user(envd: Envd) -> None:
    name = unique("hello.txt")
    response = envd.upload(name, b"hello")
    assert response.status_code == 200, response.text
    assert response.json() == [{"path": f"/home/user/{name}", "name": name, "type": "file"}]
    entry = envd.ok("Stat", {"path": name})["entry"]
    assert entry["name"] == name and entry["path"] == f"/home/user/{name}"
    assert entry["type"] == "FILE_TYPE_FILE" and entry["size"] == "5"  # int64: a string
    assert entry["mode"] == 0o644 and entry["permissions"] == "-rw-r--r--"
    assert (entry["owner"], entry["group"]) == ("user", "user")
    assert entry["modifiedTime"].endswith("Z")
    assert envd.download(name).content == b"hello"


def test_several_files_in_one_multipart_upload(envd: Envd) -> None:
    names = [unique("multi") for _ in range(3)]
    response = envd.http.post("/files", files=[("file", (name, name.encode())) for name in names])
    assert response.status_code == 200, response.text
    assert [item["path"] for item in response.json()] == [f"/home/user/{n}" for n in names]
    for name in names:
        assert envd.download(name).content == name.encode()


def test_octet_stream_gzip_both_ways_and_big_files_stream(envd: Envd) -> None:
    name = unique("dir") + "/nested/big.bin"
    data = os.urandom(3 << 20) + b"tail" * 100_000
    response = envd.http.post(
        "/files",
        params={"path": name},
        content=gzip.compress(data, compresslevel=1),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert response.json()[0]["path"] == f"/home/user/{name}"  # parents were made
    plain = envd.http.get("/files", params={"path": name}, headers={"Accept-Encoding": "identity"})
    assert plain.headers.get("content-encoding") is None and plain.content == data
    with envd.http.stream(
        "GET", "/files", params={"path": name}, headers={"Accept-Encoding": "gzip"}
    ) as streamed:
        # It starts random: gzip would not pay, so it comes as it is (test_e2b_files_gzip).
        assert streamed.headers.get("content-encoding") is None
        assert b"".join(streamed.iter_bytes()) == data
    empty = unique("empty")
    envd.http.post("/files", params={"path": empty}, content=b"",
                   headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert envd.download(empty).content == b""


def test_overwrite_and_bad_uploads_change_nothing(envd: Envd) -> None:
    name = unique("over")
    envd.upload(name, b"first")
    envd.upload(name, b"second")
    assert envd.download(name).content == b"second"
    bad_gzip = envd.http.post("/files", params={"path": name}, content=b"not gzip",
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Encoding": "gzip"})  # fmt: skip
    assert bad_gzip.status_code == 400 and "gzip" in bad_gzip.json()["message"]
    no_path = envd.http.post("/files", content=b"x",
                             headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert no_path.status_code == 400 and "?path=" in no_path.json()["message"]
    bad_meta = envd.http.post("/files", params={"path": name}, files={"file": (name, b"third")},
                              headers={b"X-Metadata-Bad": "caf\u00e9".encode()})  # fmt: skip
    assert bad_meta.status_code == 400
    assert envd.download(name).content == b"second"


def test_missing_files_and_directories(envd: Envd) -> None:
    missing = envd.download(unique("missing"))
    assert missing.status_code == 404
    assert missing.json()["code"] == 404 and "does not exist" in missing.json()["message"]
    assert envd.rpc("Stat", {"path": unique("nope")}).json()["code"] == "not_found"
    directory = unique("adir")
    envd.ok("MakeDir", {"path": directory})
    assert envd.download(directory).status_code == 400


def test_users_own_what_they_write_and_paths_are_from_their_home(
    server: LiveServer, sandbox: str, envd: Envd
) -> None:
    root = Envd(server, sandbox, user="root")
    # This template has no /root: the error names where root's relative path led.
    assert "/root/x" in root.rpc("Stat", {"path": "x"}).json()["message"]
    assert envd.ok("Stat", {"path": "."})["entry"]["path"] == "/home/user"
    name = f"/tmp/{unique('mine')}"
    response = envd.http.post("/files", params={"path": name, "username": "root"},
                              files={"file": (name, b"root's")})  # fmt: skip
    assert response.status_code == 200, response.text
    assert root.ok("Stat", {"path": name})["entry"]["owner"] == "root"
    private = f"/tmp/{unique('private')}"
    root.ok("MakeDir", {"path": private})
    assert root.ok("Stat", {"path": private})["entry"]["owner"] == "root"
    # `user` may not write into root's directory; root may read what `user` has.
    refused = envd.upload(f"{private}/x", b"x")
    assert refused.status_code == 403, refused.text
    envd.upload("for-root.txt", b"x")
    assert root.download("/home/user/for-root.txt").content == b"x"
    root.http.close()


# -- metadata --------------------------------------------------------------------------


def test_metadata_is_stored_listed_moved_and_replaced(
    server: LiveServer, sandbox: str, envd: Envd
) -> None:
    name = unique("meta")
    response = envd.upload(name, b"m", **{"X-Metadata-Author": "ann", "X-Metadata-Stage": "1"})
    assert response.json()[0]["metadata"] == {"author": "ann", "stage": "1"}
    assert envd.ok("Stat", {"path": name})["entry"]["metadata"] == {"author": "ann", "stage": "1"}
    moved = envd.ok("Move", {"source": name, "destination": name + ".moved"})["entry"]
    assert moved["metadata"] == {"author": "ann", "stage": "1"}
    again = envd.upload(name + ".moved", b"n")
    assert "metadata" not in again.json()[0]
    assert "metadata" not in envd.ok("Stat", {"path": name + ".moved"})["entry"]
    path = f"/home/user/{name}.moved"
    run(server, sandbox, f"python3 -c \"import os; os.setxattr('{path}', 'user.e2b.k', b'v')\"")
    assert envd.ok("Stat", {"path": path})["entry"]["metadata"] == {"k": "v"}


# -- the other Filesystem calls -------------------------------------------------------


def test_list_dir_depth_sorted_by_path(envd: Envd) -> None:
    top = unique("tree")
    for sub in ("b", "a", "a/a2", "a/a1", "b/b1"):
        envd.ok("MakeDir", {"path": f"{top}/{sub}"})
    envd.upload(f"{top}/file.txt", b"f")
    listed = envd.ok("ListDir", {"path": top})["entries"]
    assert [e["name"] for e in listed] == ["a", "b", "file.txt"]
    assert listed[0]["type"] == "FILE_TYPE_DIRECTORY" and listed[0]["mode"] == 0o755
    assert listed[0]["permissions"] == "drwxr-xr-x" and int(listed[0]["size"]) > 0
    deep = envd.ok("ListDir", {"path": top, "depth": 2})["entries"]
    assert [e["path"].removeprefix(f"/home/user/{top}/") for e in deep] == [
        "a", "a/a1", "a/a2", "b", "b/b1", "file.txt",
    ]  # fmt: skip
    assert envd.ok("ListDir", {"path": top, "depth": 3})["entries"] == deep


def test_make_dir_remove_and_move_answer_as_envd(envd: Envd) -> None:
    directory = unique("made") + "/nested"
    made = envd.ok("MakeDir", {"path": directory})["entry"]
    assert made["path"] == f"/home/user/{directory}" and made["owner"] == "user"
    again = envd.rpc("MakeDir", {"path": directory})
    assert again.status_code == 409 and again.json()["code"] == "already_exists"
    envd.ok("Remove", {"path": directory.split("/")[0]})  # recursive
    envd.ok("Remove", {"path": directory})  # a missing path: no error
    assert envd.rpc("Stat", {"path": directory}).json()["code"] == "not_found"
    gone = envd.rpc("Move", {"source": unique("nothing"), "destination": "x"})
    assert gone.json()["code"] == "not_found"


def test_a_symlink_has_its_targets_type_and_absolute_target(
    server: LiveServer, sandbox: str, envd: Envd
) -> None:
    directory = unique("links")
    envd.upload(f"{directory}/target.txt", b"t")
    run(
        server,
        sandbox,
        f"cd /home/user/{directory} && ln -s target.txt link && ln -s gone dangling",
    )
    link = envd.ok("Stat", {"path": f"{directory}/link"})["entry"]
    assert link["type"] == "FILE_TYPE_FILE"
    assert link["symlinkTarget"] == f"/home/user/{directory}/target.txt"
    dangling = envd.ok("Stat", {"path": f"{directory}/dangling"})["entry"]
    assert dangling["type"] == "FILE_TYPE_SYMLINK"
    plain = envd.ok("Stat", {"path": f"{directory}/target.txt"})["entry"]
    assert "symlinkTarget" not in plain


# -- watchers -------------------------------------------------------------------------


def test_polling_watcher_sees_an_upload_as_three_events(envd: Envd) -> None:
    directory = unique("watched")
    envd.ok("MakeDir", {"path": f"{directory}/nested"})
    watcher = envd.ok("CreateWatcher", {"path": directory, "recursive": True})["watcherId"]
    envd.upload(f"{directory}/nested/new.txt", b"content")
    events = envd.ok("GetWatcherEvents", {"watcherId": watcher})["events"]
    assert len(events) == 3, events
    assert events[0] == {"name": "nested/new.txt", "type": "EVENT_TYPE_CREATE"}
    assert envd.ok("GetWatcherEvents", {"watcherId": watcher}) == {}  # taken already
    envd.upload(f"{directory}/nested/new.txt", b"changed")
    events = envd.ok("GetWatcherEvents", {"watcherId": watcher})["events"]
    assert {"name": "nested/new.txt", "type": "EVENT_TYPE_WRITE"} in events
    envd.ok("RemoveWatcher", {"watcherId": watcher})
    assert envd.rpc("GetWatcherEvents", {"watcherId": watcher}).json()["code"] == "not_found"


def test_watchers_refuse_missing_directories_and_files(envd: Envd) -> None:
    missing = envd.rpc("CreateWatcher", {"path": unique("no-dir")})
    assert missing.json()["code"] == "not_found"
    name = unique("a-file")
    envd.upload(name, b"x")
    on_file = envd.rpc("CreateWatcher", {"path": name})
    assert on_file.status_code != 200 and on_file.json()["code"] != "not_found"


def test_a_watcher_belongs_to_its_sandbox(server: LiveServer, envd: Envd) -> None:
    directory = unique("mine")
    envd.ok("MakeDir", {"path": directory})
    watcher = envd.ok("CreateWatcher", {"path": directory})["watcherId"]
    other = Sandbox.create(timeout=120, **opts(server))
    try:
        stranger = Envd(server, other.sandbox_id)
        taken = stranger.rpc("GetWatcherEvents", {"watcherId": watcher})
        assert taken.json()["code"] == "not_found"
        assert stranger.rpc("RemoveWatcher", {"watcherId": watcher}).json()["code"] == "not_found"
        stranger.http.close()
    finally:
        other.kill()
        other.close()
    envd.ok("RemoveWatcher", {"watcherId": watcher})


def envelopes(body: Iterator[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Connect streaming envelopes: (flags, message)."""
    buffer = b""
    for chunk in body:
        buffer += chunk
        while len(buffer) >= 5:
            flags, size = struct.unpack(">BI", buffer[:5])
            if len(buffer) < 5 + size:
                break
            yield flags, json.loads(buffer[5 : 5 + size])
            buffer = buffer[5 + size :]


def test_watch_dir_streams_start_events_and_keepalives(envd: Envd) -> None:
    directory = unique("stream")
    envd.ok("MakeDir", {"path": directory})
    frame = json.dumps({"path": directory, "includeEntry": True}).encode()
    with envd.http.stream(
        "POST",
        "/filesystem.Filesystem/WatchDir",
        content=struct.pack(">BI", 0, len(frame)) + frame,
        headers={
            "Content-Type": "application/connect+json",
            "Connect-Protocol-Version": "1",
            "Keepalive-Ping-Interval": "1",
        },
    ) as response:
        assert response.status_code == 200
        stream = envelopes(response.iter_raw())
        assert next(stream) == (0, {"start": {}})
        envd.upload(f"{directory}/w.txt", b"watched")
        seen: list[dict[str, Any]] = []
        while len([m for m in seen if "filesystem" in m]) < 3:
            seen.append(next(stream)[1])
        events = [m["filesystem"] for m in seen if "filesystem" in m]
        assert events[0]["type"] == "EVENT_TYPE_CREATE" and events[0]["name"] == "w.txt"
        written = next(e for e in events if e["type"] == "EVENT_TYPE_WRITE")
        assert written["entry"]["path"] == f"/home/user/{directory}/w.txt"
        assert next(stream) == (0, {"keepalive": {}})  # nothing else happens


# -- signed URLs -----------------------------------------------------------------------


def sign(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """E2B's SDK's v1 signature (e2b/sandbox/signature.py), written from its definition."""
    raw = f"{path}:{operation}:{user}:{token}" + ("" if expiration is None else f":{expiration}")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def secure_pair(server: LiveServer, settings: Settings) -> Iterator[list[tuple[str, str]]]:
    """Two sandboxes with envd access tokens (as E2B's create makes them): (id, token)."""
    store = Store.open(settings.with_(data_dir=server.data_dir))
    boxes = [Sandbox.create(timeout=600, **opts(server)) for _ in range(2)]
    pairs = []
    for box in boxes:
        token = secrets.token_hex(16)
        store.insert_e2b_sandbox(E2bSandboxRow(box.sandbox_id, token, "test", "base", False))
        pairs.append((box.sandbox_id, token))
    try:
        yield pairs
    finally:
        for box in boxes:
            box.kill()
            box.close()


def test_signed_urls_find_their_sandbox_and_only_theirs(
    server: LiveServer, secure_pair: list[tuple[str, str]]
) -> None:
    (_first, first_token), (_second, second_token) = secure_pair
    for sandbox_id, token in secure_pair:
        headers = {"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": token}
        with httpx.Client(base_url=server.url, headers=headers) as owner:
            files = {"file": ("same.txt", sandbox_id.encode())}
            done = owner.post("/files", params={"path": "same.txt"}, files=files)
            assert done.status_code == 200, done.text
    with httpx.Client(base_url=server.url) as plain:  # no routing header, no token
        for sandbox_id, token in secure_pair:
            signature = sign("same.txt", "read", "user", token, None)
            params = {"path": "same.txt", "username": "user", "signature": signature}
            got = plain.get("/files", params=params)
            assert got.status_code == 200 and got.text == sandbox_id
        # A signature is for its path, operation, user and token: change one, it is refused.
        signature = sign("same.txt", "read", "user", first_token, None)
        for changed in (
            {"path": "other.txt", "username": "user"},
            {"path": "same.txt", "username": "root"},
            {"path": "same.txt", "username": "user", "signature_expiration": str(2**40)},
        ):
            refused = plain.get("/files", params={**changed, "signature": signature})
            assert refused.status_code == 401, changed
        params = {"path": "same.txt", "username": "user", "signature": signature}
        upload = plain.post("/files", params=params, files={"file": ("same.txt", b"changed")})
        assert upload.status_code == 401  # a read signature never writes
        expiry = str(int(time.time()) + 60)
        write = sign("up.txt", "write", "user", second_token, int(expiry))
        params = {"path": "up.txt", "username": "user", "signature": write}
        params["signature_expiration"] = expiry
        uploaded = plain.post("/files", params=params, files={"file": ("up.txt", b"signed")})
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()[0]["path"] == "/home/user/up.txt"
        assert plain.get("/files", params={"path": "same.txt"}).status_code == 400


def test_an_expired_signature_is_refused_in_e2bs_words(
    server: LiveServer, secure_pair: list[tuple[str, str]]
) -> None:
    _sandbox_id, token = secure_pair[0]
    expired = int(time.time()) - 120
    got = httpx.get(f"{server.url}/files", params={
        "path": "same.txt", "username": "user",
        "signature": sign("same.txt", "read", "user", token, expired),
        "signature_expiration": str(expired)})  # fmt: skip
    assert got.status_code == 401
    assert got.json() == {"code": 401, "message": "signature is already expired"}
