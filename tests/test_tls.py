"""TLS: `corral server` serves HTTPS with an operator's pair or a self-signed development
pair (its fingerprint logged), refuses bad files at start, serves a renewed pair after
SIGHUP (a bad one refused), and the SDK and CLI verify the server (the system's CAs, or a
CA file) and never fall back to plain HTTP."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from corral import Jobs, Sandbox, Template, Volume
from corral.cli._common import EXIT_UNREACHABLE
from corral.client import AsyncSandbox
from corral.client._config import ConfigFile, Context
from corral.config import Settings
from corral.errors import InvalidRequest, ServerUntrusted
from corral.server import tls
from tests.conftest import LiveServer, free_port, start_server
from tests.kit.polling import wait_until

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: Key,
    *,
    issuer: tuple[x509.Certificate, Key] | None = None,
    days: float = 30,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer` (else by itself), naming 127.0.0.1."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=60))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_cert(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def _write_key(path: Path, key: Key, password: bytes | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


# -- the pair: checked at start, the development one made once -------------------------------


def test_the_self_signed_pair_is_made_once_names_the_host_and_keeps_its_key_private(
    tmp_path: Path,
) -> None:
    first = tls.self_signed(tmp_path / "tls", "127.0.0.1")
    assert first.key.stat().st_mode & 0o777 == 0o600
    again = tls.self_signed(tmp_path / "tls", "127.0.0.1")
    assert again == first  # reused across restarts: clients keep trusting it
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= names
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert first.fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    # Listening on another address, with a ports domain: a pair that names them (the old
    # one would not do), the domain as a wildcard for `<port>-<id>.<domain>` host names.
    moved = tls.self_signed(tmp_path / "tls", "192.0.2.7", "sandboxes.example.test")
    assert moved.fingerprint != first.fingerprint
    cert = x509.load_pem_x509_certificate(moved.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "192.0.2.7" in {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    assert "*.sandboxes.example.test" in san.get_values_for_type(x509.DNSName)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Good and bad certificate and key files."""
    key, other = _key(), _key()
    (tmp_path / "text.pem").write_text("not a certificate\n")
    return {
        "cert": _write_cert(tmp_path / "cert.pem", _cert("server", key)),
        "key": _write_key(tmp_path / "key.pem", key),
        "other_key": _write_key(tmp_path / "other.pem", other),
        "expired": _write_cert(tmp_path / "expired.pem", _cert("old", key, days=-1)),
        "encrypted": _write_key(tmp_path / "encrypted.pem", key, b"secret"),
        "text": tmp_path / "text.pem",
        "missing": tmp_path / "missing.pem",
    }


@pytest.mark.parametrize(
    ("cert", "key", "self_signed", "message"),
    [
        ("missing", "key", False, r"cannot read the TLS certificate .*missing.pem \(No such"),
        ("text", "key", False, r"certificate .*text.pem is not a PEM certificate"),
        ("cert", "missing", False, r"cannot read the TLS key .*missing.pem"),
        ("cert", "text", False, r"TLS key .*text.pem is not a PEM private key"),
        ("cert", "other_key", False, r"key .*other.pem is not the key of the certificate"),
        ("expired", "key", False, r"certificate .*expired.pem expired on .*: renew it"),
        ("cert", "encrypted", False, r"key .*encrypted.pem is encrypted: give it unencrypted"),
        ("cert", None, False, r"give --tls-key \(CORRAL_TLS_KEY\) too"),
        (None, "key", False, r"give --tls-cert \(CORRAL_TLS_CERT\) too"),
        ("cert", "key", True, r"--tls-self-signed makes its own pair: drop --tls-cert"),
    ],
)
def test_a_bad_pair_is_refused_naming_the_file_and_what_to_do(
    files: dict[str, Path],
    tmp_path: Path,
    cert: str | None,
    key: str | None,
    self_signed: bool,
    message: str,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        tls_cert=str(files[cert]) if cert else "",
        tls_key=str(files[key]) if key else "",
        tls_self_signed=self_signed,
    )
    with pytest.raises(InvalidRequest, match=message):
        tls.load(settings)
    assert not (tmp_path / "data").exists()  # nothing made


def test_a_server_with_a_bad_pair_stops_at_start_saying_so(
    files: dict[str, Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    pair = ("--tls-cert", str(files["cert"]), "--tls-key", str(files["other_key"]))
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "server", "--port", str(free_port()), *pair],
        env={**env, "CORRAL_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"the TLS key {files['other_key']} is not the key of the certificate" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_pyvoy_server_whose_pair_envoy_refuses_stops_at_start_saying_so(
    settings: Settings, tmp_path: Path
) -> None:
    """A pair our checks take and Envoy's BoringSSL refuses (a key on secp256k1): Envoy
    would listen and fail every handshake, so the server stops, naming the pair."""
    key = ec.generate_private_key(ec.SECP256K1())
    cert = _write_cert(tmp_path / "k1.pem", _cert("127.0.0.1", key))
    key_file = _write_key(tmp_path / "k1.key", key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "server", "--port", str(free_port()),
         "--tls-cert", str(cert), "--tls-key", str(key_file)],
        env={
            **env,
            "CORRAL_DATA_DIR": str(tmp_path / "data"),
            "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
            "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
            "CORRAL_HTTP_SERVER": "pyvoy",
            "CORRAL_POOL_SIZE": "0",
            "CORRAL_JOB_WORKERS": "0",
        },
        capture_output=True,
        text=True,
        timeout=120,  # two Pythons start (test_grpc)
    )  # fmt: skip
    assert done.returncode != 0
    assert f"Envoy refused the TLS pair {cert} and {key_file}" in done.stderr
    assert "the server stops" in done.stderr
    assert "Traceback" not in done.stderr


# -- a self-signed server: the SDK and CLI with and without its certificate ------------------


@pytest.fixture(scope="module")
def server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("tls") / "data"
    live = start_server(
        settings,
        data_dir,
        pool_size=1,
        extra_env={"CORRAL_JOB_WORKERS": "0"},
        args=("--tls-self-signed",),
        ca_file=data_dir / "tls" / tls.SELF_SIGNED_CERT,
    )
    yield live
    live.stop()


def _ca(server: LiveServer) -> Path:
    return server.data_dir / "tls" / tls.SELF_SIGNED_CERT


def test_the_logged_fingerprint_is_the_certificates_the_server_presents(
    server: LiveServer,
) -> None:
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if "{" in line]
    logged = next(line for line in lines if "sha256_fingerprint" in line)
    assert logged["cert"] == str(_ca(server))
    assert f"--ca-file {_ca(server)}" in logged["trust"]
    port = int(server.url.rsplit(":", 1)[1])
    presented = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    digest = hashlib.sha256(presented).hexdigest().upper()
    assert logged["sha256_fingerprint"].replace(":", "") == digest
    assert presented == ssl.PEM_cert_to_DER_cert(_ca(server).read_text())


@pytest.mark.usefixtures("sandbox_host")
async def test_the_sdk_verifies_the_server_with_its_ca_file_on_every_channel(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_CA_FILE", str(_ca(server)))
    async with await AsyncSandbox.create(server=server.url, api_key=server.key) as sbx:
        result = await sbx.commands.run("echo over tls")  # a server stream
        assert result.stdout == "over tls\n"
        await sbx.files.write("/tmp/f.txt", b"x" * 300_000)  # an upload (client stream)
        assert await sbx.files.read("/tmp/f.txt", format="bytes") == b"x" * 300_000
        # A port of the sandbox, through the server's proxy: an https URL on its port.
        await sbx.commands.run("cd /tmp && python3 -m http.server 8000", background=True)
        url = sbx.get_url(8000, "/f.txt")
        assert url.startswith(server.url + "/")
        tls_context = ssl.create_default_context(cafile=_ca(server))
        with httpx.Client(verify=tls_context) as http:

            def served() -> bytes | None:
                page = http.get(url)
                return page.content if page.status_code == 200 else None

            assert wait_until(served, "the sandbox's port 8000") == b"x" * 300_000


async def test_the_sdk_refuses_a_server_it_cannot_verify(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORRAL_CA_FILE", raising=False)
    with pytest.raises(ServerUntrusted, match=r"cannot verify .*--ca-file FILE, CORRAL_CA_FILE"):
        await AsyncSandbox.create(server=server.url, api_key=server.key)


def test_the_cli_verifies_the_server_with_its_ca_file(server: LiveServer) -> None:
    ca = str(_ca(server))
    listed = server.corral("--ca-file", ca, "sandbox", "list")  # the fast path (http.client)
    assert listed.returncode == 0, listed.stderr
    ran = server.corral("run", "--", "echo", "hi", CORRAL_CA_FILE=ca)  # the SDK (pyqwest)
    assert (ran.returncode, ran.stdout) == (0, "hi\n"), ran.stderr
    for command in (("sandbox", "list"), ("run", "--", "echo", "hi")):
        refused = server.corral(*command)
        assert refused.returncode == EXIT_UNREACHABLE, refused.stderr
        assert "presented a TLS certificate this client cannot verify" in refused.stderr
        assert "--ca-file FILE" in refused.stderr
        assert refused.stdout == ""


def test_the_sdk_takes_a_ca_file_argument_over_the_environment_and_the_context(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca, wrong = _ca(server), tls.self_signed(tmp_path / "other", "127.0.0.1").cert
    config = ConfigFile(tmp_path / "config", "tls", {"tls": Context(server.url, server.key)})
    config.contexts["tls"].ca_file = str(wrong)
    config.save()
    monkeypatch.setenv("CORRAL_CONFIG", str(config.path))
    for name in ("CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT", "CORRAL_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ServerUntrusted):
        Template.list()  # the context's CA file: not the server's
    # The argument wins over the context: on both HTTP stacks (pyqwest; the ssl module).
    assert isinstance(Template.list(ca_file=ca), list)
    assert isinstance(Sandbox.list(ca_file=str(ca)), list)
    # ... and over the environment.
    monkeypatch.setenv("CORRAL_CA_FILE", str(wrong))
    with pytest.raises(ServerUntrusted):
        Sandbox.list()
    with Jobs(ca_file=ca) as jobs:
        assert isinstance(list(jobs.list()), list)
    assert isinstance(Volume.list(ca_file=ca), list)
    # A bad one is refused by name before anything is sent.
    with pytest.raises(InvalidRequest, match=f"the CA file {server.log} holds no PEM"):
        Sandbox.list(ca_file=server.log)
    with pytest.raises(InvalidRequest, match=r"cannot read the CA file .*nowhere.pem"):
        Template.list(ca_file=tmp_path / "nowhere.pem")


def test_a_url_of_the_wrong_scheme_is_named_never_switched(server: LiveServer) -> None:
    plain_url = server.url.replace("https:", "http:")
    for command in (("sandbox", "list"), ("volume", "list")):  # ssl, then pyqwest
        done = server.corral(*command, CORRAL_SERVER=plain_url)
        assert done.returncode == EXIT_UNREACHABLE
        assert "if it serves HTTPS, use its https:// URL" in done.stderr
    # An https URL of a plain HTTP server: said so, and nothing sent in the clear.
    heard: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            heard.append(self.path)

    plain = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{plain.server_address[1]}"
        for command in (("sandbox", "list"), ("volume", "list")):
            done = server.corral(*command, CORRAL_SERVER=url)
            assert done.returncode == EXIT_UNREACHABLE
            assert f"the server at {url} answered in plain HTTP, not HTTPS" in done.stderr
    finally:
        plain.shutdown()
        plain.server_close()
    assert heard == []


def test_e2bs_api_on_the_same_port_links_uploads_over_https(server: LiveServer) -> None:
    """The official e2b SDK PUTs a template's COPY files to the link the server gives: an
    https link when the server serves TLS itself (it said http, which the port refuses)."""
    tls_context = ssl.create_default_context(cafile=_ca(server))
    headers = {"X-API-KEY": server.key}
    with httpx.Client(base_url=server.url, headers=headers, verify=tls_context) as api:
        link = api.get(f"/templates/copier/files/{'ab' * 32}")
        assert link.status_code == 201, link.text
        url = link.json()["url"]
        assert url.startswith(f"{server.url}/templates/copier/files/"), url
        assert api.put(url, content=b"not a tar, but stored").status_code == 200


def test_a_context_carries_its_ca_file(server: LiveServer) -> None:
    ca = str(_ca(server))
    done = server.corral("context", "set", "tls", "--server", server.url, "--ca-file", ca)
    assert done.returncode == 0, done.stderr
    env = {"CORRAL_SERVER": "", "CORRAL_CONTEXT": "tls"}
    listed = server.corral("sandbox", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    bad = server.corral("context", "set", "tls", "--ca-file", str(server.log))
    assert bad.returncode != 0
    assert f"the CA file {server.log} holds no PEM certificate" in bad.stderr


# -- an operator's pair, signed by a CA ------------------------------------------------------


def test_a_server_serves_the_operators_pair_and_clients_trust_its_ca(
    settings: Settings, tmp_path: Path
) -> None:
    ca_key, key = _key(), _key()
    ca_cert = _cert("test CA", ca_key, ca=True, days=365)
    leaf = _cert("server", key, issuer=(ca_cert, ca_key))
    ca_file = _write_cert(tmp_path / "ca.pem", ca_cert)
    cert_file = _write_cert(tmp_path / "chain.pem", leaf, ca_cert)
    key_file = _write_key(tmp_path / "key.pem", key)
    live = start_server(
        settings,
        tmp_path / "data",
        pool_size=0,
        extra_env={"CORRAL_JOB_WORKERS": "0"},
        args=("--tls-cert", str(cert_file), "--tls-key", str(key_file)),
        ca_file=ca_file,
    )
    try:
        for command in (("sandbox", "list"), ("volume", "list")):  # ssl, then pyqwest
            done = live.corral("--ca-file", str(ca_file), *command)
            assert done.returncode == 0, done.stderr
            # The certificate names 127.0.0.1 only: trusted, but not for another name.
            other_name = live.url.replace("127.0.0.1", "localhost")
            done = live.corral("--ca-file", str(ca_file), *command, CORRAL_SERVER=other_name)
            assert done.returncode == EXIT_UNREACHABLE
            assert "presented a TLS certificate for another name" in done.stderr
    finally:
        live.stop()
    assert not (tmp_path / "data" / "tls").exists()  # no development pair made


# -- a renewed pair, on SIGHUP ---------------------------------------------------------------


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class _Connection:
    """A kept-alive HTTPS connection to a server, verified with `ca_file`; an IP address,
    so the client sends no SNI."""

    def __init__(self, url: str, ca_file: Path) -> None:
        port = int(url.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=ca_file)
        self.http = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        self.http.connect()
        self.tls = self.http.sock
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        self.fingerprint = _fingerprint(der)

    def healthz(self) -> int:
        """/healthz's status, over this same connection."""
        self.http.request("GET", "/healthz")
        reply = self.http.getresponse()
        reply.read()
        assert self.http.sock is self.tls, "the connection was made again"
        return reply.status

    def close(self) -> None:
        self.http.close()


def _lines(log: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _logged(log: Path, msg: str, after: int) -> dict[str, str]:
    def said() -> dict[str, str] | None:
        return next((line for line in _lines(log)[after:] if line["msg"] == msg), None)

    return wait_until(said, f"{msg!r} in {log}")


def _presented(url: str, ca_file: Path, fingerprint: str) -> None:
    """Wait until a new connection is presented the certificate of `fingerprint` (Envoy
    reads its secret a moment after the rename), and call over it."""

    def presented() -> bool:
        fresh = _Connection(url, ca_file)
        try:
            return fresh.fingerprint == fingerprint and fresh.healthz() == 200
        finally:
            fresh.close()

    wait_until(presented, f"a new connection presented {fingerprint}")


def _refused_and_kept(
    live: LiveServer,
    env_file: Path,
    pair: tuple[Path, Path],
    running: str,
    ca_file: Path,
    error: str,
) -> None:
    """SIGHUP with `pair` in `env_file`: refused with `error`, nothing said as applied,
    and new connections still get the certificate of fingerprint `running`."""
    env_file.write_text(f"CORRAL_TLS_CERT={pair[0]}\nCORRAL_TLS_KEY={pair[1]}\n")
    seen = len(_lines(live.log))
    live.process.send_signal(signal.SIGHUP)
    refused = _logged(live.log, "files not reloaded: the running ones are kept", seen)
    assert refused["level"] == "error"
    assert refused["settings"] == "tls_cert, tls_key"
    assert error in refused["error"]
    reloaded = _logged(live.log, "configuration reloaded", seen)
    assert (reloaded["applied"], reloaded["restart_needed"]) == ("-", "-")
    again = _Connection(live.url, ca_file)
    assert again.fingerprint == running
    assert again.healthz() == 200
    again.close()


@pytest.mark.parametrize("http_server", ["uvicorn", "pyvoy"])
def test_sighup_serves_a_renewed_pair_to_new_connections_and_refuses_a_bad_one(
    settings: Settings, tmp_path: Path, http_server: str
) -> None:
    """certbot's way: new files at the same paths, then SIGHUP. New connections get the
    new certificate (an RSA one after an ECDSA one), open ones keep theirs; a pair that
    does not match is refused and the running one kept."""
    ca_key = _key()
    ca_cert = _cert("test CA", ca_key, ca=True, days=365)
    ca_file = _write_cert(tmp_path / "ca.pem", ca_cert)
    first_key: Key = _key()
    first = _cert("first", first_key, issuer=(ca_cert, ca_key))
    cert_file = _write_cert(tmp_path / "chain.pem", first)
    key_file = _write_key(tmp_path / "key.pem", first_key)
    env_file = tmp_path / "corral.env"
    env_file.write_text(f"CORRAL_TLS_CERT={cert_file}\nCORRAL_TLS_KEY={key_file}\n")
    live = start_server(
        settings,
        tmp_path / "data",
        pool_size=0,
        extra_env={
            "CORRAL_JOB_WORKERS": "0",
            "CORRAL_ENV_FILE": str(env_file),
            "CORRAL_HTTP_SERVER": http_server,
        },
        ca_file=ca_file,
        ready_timeout=90 if http_server == "pyvoy" else 30,  # two Pythons start (test_grpc)
    )
    opened = _Connection(live.url, ca_file)
    try:
        assert opened.fingerprint == _fingerprint(first.public_bytes(serialization.Encoding.DER))
        assert opened.healthz() == 200

        # Renewed in place, with another key type.
        renewed_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        renewed = _cert("renewed", renewed_key, issuer=(ca_cert, ca_key))
        _write_cert(cert_file, renewed, ca_cert)
        _write_key(key_file, renewed_key)
        seen = len(_lines(live.log))
        live.process.send_signal(signal.SIGHUP)
        line = _logged(live.log, "TLS certificate reloaded: new connections get it", seen)
        renewed_fingerprint = _fingerprint(renewed.public_bytes(serialization.Encoding.DER))
        assert line["sha256_fingerprint"].replace(":", "").lower() == renewed_fingerprint
        assert _logged(live.log, "configuration reloaded", seen)["restart_needed"] == "-"
        _presented(live.url, ca_file, renewed_fingerprint)
        assert opened.healthz() == 200  # the open one carries on, as it was

        # New paths, whose key is not the certificate's: refused, the renewed pair kept.
        other_cert = _write_cert(
            tmp_path / "other.pem", _cert("other", _key(), issuer=(ca_cert, ca_key))
        )
        _refused_and_kept(
            live, env_file, (other_cert, key_file), renewed_fingerprint, ca_file,
            f"the TLS key {key_file} is not the key of the certificate {other_cert}",
        )  # fmt: skip

        if http_server == "pyvoy":
            # A pair our checks (OpenSSL's) take and Envoy's BoringSSL refuses, a key on
            # secp256k1: the reload says Envoy refused it, and the running pair stays.
            k1_key = ec.generate_private_key(ec.SECP256K1())
            k1_cert = _write_cert(
                tmp_path / "k1.pem", _cert("k1", k1_key, issuer=(ca_cert, ca_key))
            )
            k1_file = _write_key(tmp_path / "k1.key", k1_key)
            _refused_and_kept(
                live, env_file, (k1_cert, k1_file), renewed_fingerprint, ca_file,
                f"Envoy refused the TLS pair {k1_cert} and {k1_file}",
            )  # fmt: skip

        # The same paths, fixed: taken, and said as applied.
        other_key = _key()
        _write_cert(other_cert, _cert("other", other_key, issuer=(ca_cert, ca_key)))
        moved_key = _write_key(tmp_path / "other.key", other_key)
        env_file.write_text(f"CORRAL_TLS_CERT={other_cert}\nCORRAL_TLS_KEY={moved_key}\n")
        seen = len(_lines(live.log))
        live.process.send_signal(signal.SIGHUP)
        reloaded = _logged(live.log, "configuration reloaded", seen)
        assert reloaded["applied"] == f"tls_cert={other_cert}, tls_key={moved_key}"
        moved = _fingerprint(ssl.PEM_cert_to_DER_cert(other_cert.read_text()))
        _presented(live.url, ca_file, moved)
        assert live.process.poll() is None
    finally:
        opened.close()
        live.stop()
