"""How the SDK and CLI verify an https server: the system's CAs, or a CA file's.

A CA file (`ca_file`: `--ca-file`, `CORRAL_CA_FILE`, a context's `caFile`) replaces the
system's CAs, as curl's `--cacert` does: it is how a client trusts a server with a private
CA's certificate or `corral server --tls-self-signed`'s own. Verification is never turned
off, and a failed one never falls back to plain HTTP (`corral._wire.untrusted` says what
to do). Both HTTP stacks under the SDK take the file from here: pyqwest (the Connect
clients: unary and streaming calls, file transfers, ptys) and the ssl module (the CLI's
fast path, `corral.client._unary`).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from corral.errors import InvalidRequest

if TYPE_CHECKING:
    import pyqwest

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
# One transport per (CA file, HTTP/2 or not), for the process's life, as pyqwest's default
# one is: connections are pooled across clients, so a sandbox's create does not open one
# of its own, and the CAs are loaded once. (A transport's first request loads them, even
# for a plain-http server: the system's take ~7 ms of CPU, which a gRPC transport per
# `Connection` added to each create's time to first command.)
_transports: dict[tuple[str | None, bool], pyqwest.HTTPTransport] = {}


def check_ca_file(path: str) -> str:
    """`path` made absolute, once it is a readable file of PEM certificates; else
    InvalidRequest naming it and what to give."""
    absolute = str(Path(path).expanduser().absolute())
    read_ca(absolute)
    return absolute


def read_ca(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read the CA file {path} ({exc.strerror or exc}): give --ca-file (or "
            "CORRAL_CA_FILE) a readable PEM file of the CA certificate(s) that signed the "
            "server's certificate, or the server's own self-signed one"
        ) from None
    if _PEM_CERT not in data:
        raise InvalidRequest(
            f"the CA file {path} holds no PEM certificate ({_PEM_CERT.decode()}): give "
            "--ca-file (or CORRAL_CA_FILE) the CA certificate(s) in PEM"
        )
    return data


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying context for the ssl module: the CA file's certificates, else the
    system's."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cadata=read_ca(ca_file).decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise InvalidRequest(
            f"the CA file {ca_file} cannot be read as PEM certificates ({exc.reason or exc}):"
            " give --ca-file (or CORRAL_CA_FILE) the CA certificate(s) in PEM"
        ) from None


def http_client(ca_file: str | None, http2: bool = False) -> pyqwest.Client | None:
    """The pyqwest client of the Connect clients: None (pyqwest's default transport,
    the system's CAs) without a CA file or HTTP/2.

    `http2`: HTTP/2 always, in clear text too (prior knowledge), as native gRPC needs;
    else HTTP/1.1 in clear text and the version ALPN picks over TLS.
    """
    if ca_file is None and not http2:
        return None
    import pyqwest

    key = (ca_file, http2)
    transport = _transports.get(key)
    if transport is None:
        transport = _transports[key] = pyqwest.HTTPTransport(
            tls_ca_cert=read_ca(ca_file) if ca_file else None,
            tls_include_system_certs=ca_file is None,
            http_version=pyqwest.HTTPVersion.HTTP2 if http2 else None,
        )
    return pyqwest.Client(transport)


async def aclose_transports() -> None:
    """Close every transport this module made (the SDK's portal does, at exit)."""
    while _transports:
        _, transport = _transports.popitem()
        await transport.aclose()
