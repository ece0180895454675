"""The files of E2B builder COPY steps: upload links, the uploads, and the build context
made of them.

E2B's builder asks `GET /templates/{name}/files/{hash}` for each COPY step, then PUTs a
tar (usually gzipped) of the step's files, relative to its context directory, to the
`url` it got, with no API key (the URL is the credential, like the presigned URL E2B's
cloud answers). Corral's URL points back at this server, carrying the team and a
one-use random token kept next to where the upload goes:

    <data dir>/e2b-uploads/<team id>/<hash>.token    the token of the link given last
    <data dir>/e2b-uploads/<team id>/<hash>.tar      the upload

When the build starts, the uploads its COPY steps name are merged (one tar, each path
once: they share the context directory) into the build's context, which the server
unpacks and checks like any other context before anything runs, and then removed.
"""

from __future__ import annotations

import hmac
import io
import os
import posixpath
import re
import secrets
import tarfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from corral.errors import (
    CorralError,
    InvalidBuild,
    InvalidRequest,
    QuotaExceeded,
    ServerUnavailable,
)
from corral.limits import BUILD_CONTEXT_MAX_BYTES, check_build_context
from corral.server.disconnect import Receive
from corral.server.e2b.errors import E2bError, rest_status
from corral.server.e2b.rest import RestRequest, RestResponse, error_body, read_body, send_json

if TYPE_CHECKING:
    from corral.server.base import Services

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_HASH = re.compile(r"[0-9a-f]{16,128}")
_UPLOAD_PATH = re.compile(r"/templates/([^/]+)/files/([^/]+)")
_TEAM = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_UPLOADS = 64


def _folder(services: Services, team_id: str, *, create: bool = True) -> Path:
    """The team's uploads; made for a team that asks for a link (authenticated), never
    for an upload (whose team is only what its URL says)."""
    if services.templates is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    folder = services.templates.settings.data_dir / "e2b-uploads" / team_id
    if not _TEAM.fullmatch(team_id) or not (create or folder.is_dir()):
        raise E2bError(403, "this upload link is not valid (used already, or never given)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _check_room(folder: Path) -> None:
    """At most MAX_UPLOADS uploads wait for builds per team (each is at most a build
    context's size): a team cannot fill the server's disk with them."""
    if len(list(folder.glob("*.tar"))) >= MAX_UPLOADS:
        raise QuotaExceeded(
            f"{MAX_UPLOADS} uploads of COPY files already wait for a build: start the "
            "builds that use them (a build takes its uploads), then upload more"
        )


def check_hash(files_hash: object, where: str = "the files hash") -> str:
    if not isinstance(files_hash, str) or not _HASH.fullmatch(files_hash):
        raise InvalidRequest(f"{where} {files_hash!r} is not a hex digest (the SDK's filesHash)")
    return files_hash


async def upload_link(services: Services, req: RestRequest) -> RestResponse:
    """`GET /templates/{templateID}/files/{hash}` → 201 `{present, url}`: where to PUT
    the step's files (present: an upload of that hash waits for a build already)."""
    files_hash = check_hash(req.params["hash"])
    folder = _folder(services, req.team.id)
    present = (folder / f"{files_hash}.tar").is_file()
    if not present:
        _check_room(folder)
    token = secrets.token_urlsafe(24)
    path = folder / f"{files_hash}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as out:
        out.write(token)
    host = req.headers.get("host") or "127.0.0.1"
    query = urlencode({"team": req.team.id, "uploadToken": token})
    url = f"{req.scheme}://{host}/templates/{req.params['templateID']}/files/{files_hash}?{query}"
    return RestResponse(201, {"present": present, "url": url})


def is_upload(scope: Scope) -> bool:
    path = scope.get("path", "")
    return scope.get("method") == "PUT" and _UPLOAD_PATH.fullmatch(path) is not None


async def serve_upload(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """A PUT to an upload link: the link's token (one use) instead of an API key."""
    try:
        await _store_upload(services, scope, receive)
    except CorralError as exc:
        status = rest_status(exc)
        await send_json(send, status, error_body(status, str(exc)))
        return
    await send_json(send, 200, None)


async def _store_upload(services: Services, scope: Scope, receive: Receive) -> None:
    found = _UPLOAD_PATH.fullmatch(scope["path"])
    assert found is not None
    files_hash = check_hash(found.group(2))
    query = dict(parse_qsl(bytes(scope.get("query_string", b"")).decode("latin-1")))
    folder = _folder(services, query.get("team", ""), create=False)
    token_path = folder / f"{files_hash}.token"
    try:
        expected = token_path.read_text()
    except FileNotFoundError:
        expected = ""
    given = query.get("uploadToken", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise E2bError(403, "this upload link is not valid (used already, or never given)")
    token_path.unlink(missing_ok=True)  # one use, even if the upload is refused
    if not (folder / f"{files_hash}.tar").is_file():
        _check_room(folder)
    data = await read_body(receive, BUILD_CONTEXT_MAX_BYTES)
    partial = folder / f"{files_hash}.tar.part"
    partial.write_bytes(data)
    partial.replace(folder / f"{files_hash}.tar")


def copy_hashes(steps: Sequence[Any]) -> list[str]:
    """The files hashes of the COPY steps of a builder template, in order (each once)."""
    hashes: list[str] = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or str(step.get("type", "")).upper() != "COPY":
            continue
        files_hash = check_hash(step.get("filesHash"), f"COPY step {number}'s filesHash")
        if files_hash not in hashes:
            hashes.append(files_hash)
    return hashes


def build_context(services: Services, team_id: str, hashes: Sequence[str]) -> bytes | None:
    """One tar of the uploads `hashes` name (None for none); InvalidBuild naming one that
    was not uploaded, or past the context's size bound."""
    if not hashes:
        return None
    folder = _folder(services, team_id)
    out = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as merged:
        for files_hash in hashes:
            path = folder / f"{files_hash}.tar"
            if not path.is_file():
                raise InvalidBuild(
                    f"the files of a COPY step (hash {files_hash}) were not uploaded: ask "
                    f"GET /templates/<name>/files/{files_hash} and PUT them to its url"
                )
            try:
                with tarfile.open(path, mode="r:*") as upload:
                    for member in upload:
                        name = posixpath.normpath(member.name)
                        if name in seen:
                            continue
                        seen.add(name)
                        # Checked before it is read: a gzip upload may unpack to far more.
                        check_build_context(out.tell() + member.size)
                        data = upload.extractfile(member) if member.isfile() else None
                        merged.addfile(member, data)
            except tarfile.TarError as exc:
                raise InvalidBuild(f"the upload {files_hash} is not a tar: {exc}") from None
    return out.getvalue()


def forget(services: Services, team_id: str, hashes: Sequence[str]) -> None:
    """Remove uploads a build has taken (its context holds them now)."""
    folder = _folder(services, team_id)
    for files_hash in hashes:
        (folder / f"{files_hash}.tar").unlink(missing_ok=True)
