"""The server's TLS certificate and key: an operator's pair, checked, or a development pair.

`corral server --tls-cert FILE --tls-key FILE` serves HTTPS with the operator's pair;
`--tls-self-signed` with a pair generated into `<data dir>/tls/` and reused across restarts
(made again when it expires or no longer names the address the server listens on). Both
are checked here, at start, so that a bad file is refused with its name and what to do
rather than by the HTTP server's first handshake. `load` returns the files' paths, which
is what every HTTP server (uvicorn, pyvoy) takes.

A renewed pair (certbot, cert-manager: new files, often at the same paths) is served
without a restart on SIGHUP: `ServedCertificate` under uvicorn, `corral.server.envoy`
under pyvoy. A pair that fails the same checks is refused and the old one kept.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.config import Settings
from corral.errors import InvalidRequest

# A development pair is valid this long, and made again when less than RENEW is left.
SELF_SIGNED_DAYS = 365
RENEW = timedelta(days=7)
SELF_SIGNED_CERT = "self-signed.crt"
SELF_SIGNED_KEY = "self-signed.key"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# The settings whose files a running server reads again on SIGHUP (`corral.reload`).
PAIR_SETTINGS = ("tls_cert", "tls_key")
# What a client is told to do with a certificate no public CA signed.
TRUST_HINT = "clients trust it with --ca-file {cert} or CORRAL_CA_FILE={cert}"
# The keys a TLS server can sign its handshakes with.
_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True)
class TlsPair:
    """The certificate (PEM, the server's first, then its chain) and key files to serve."""

    cert: Path
    key: Path
    # SHA-256 of the server's certificate (DER), colon-separated hex as openssl prints it.
    fingerprint: str
    self_signed: bool


def load(settings: Settings) -> TlsPair | None:
    """The pair `settings` ask for (None: plain HTTP), or InvalidRequest saying what to fix."""
    cert, key = settings.tls_cert, settings.tls_key
    if settings.tls_self_signed:
        if cert or key:
            raise InvalidRequest(
                "--tls-self-signed makes its own pair: drop --tls-cert/--tls-key "
                "(CORRAL_TLS_CERT/CORRAL_TLS_KEY), or drop --tls-self-signed to serve yours"
            )
        directory = settings.data_dir.absolute() / "tls"
        return self_signed(directory, settings.host, settings.ports_domain)
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "--tls-cert (CORRAL_TLS_CERT)" if not cert else "--tls-key (CORRAL_TLS_KEY)"
        raise InvalidRequest(
            f"HTTPS needs a certificate and its key: give {missing} too, or use "
            "--tls-self-signed for development"
        )
    # Absolute: the HTTP server may read them from another directory (pyvoy's Envoy).
    cert_path, key_path = Path(cert).absolute(), Path(key).absolute()
    certificate = check_pair(cert_path, key_path)
    return TlsPair(cert_path, key_path, fingerprint(certificate), self_signed=False)


class ServedCertificate:
    """The pair a running server presents, which a reload replaces for new connections.

    The server listens with one context whose SNI callback hands every new handshake the
    context of the newest pair. OpenSSL calls it for every ClientHello, with a server name
    or without one (a client dialling an IP address sends none), before it picks the
    certificate; connections already open keep theirs. A new pair gets a whole new
    context: loading it into the listening one would keep the old certificate beside it
    when the key type differs (OpenSSL goes on presenting an ECDSA certificate after an
    RSA one is loaded), and a load that fails half-way would leave it broken.
    """

    def __init__(self, pair: TlsPair, make: Callable[[TlsPair], ssl.SSLContext]) -> None:
        self.pair = pair
        self._make = make  # the HTTP server's context for a pair
        self._current: ssl.SSLContext | None = None

    def listening(self) -> ssl.SSLContext:
        """The context to listen with (the first pair's)."""
        context = self._current = self._make(self.pair)
        context.sni_callback = self._hand_over
        return context

    def _hand_over(
        self, connection: ssl.SSLObject, server_name: str | None, listening: ssl.SSLContext
    ) -> None:
        if self._current is not None and self._current is not listening:
            connection.context = self._current

    def reload(self, settings: Settings) -> TlsPair:
        """Present the pair `settings` name (its files read again) from the next handshake
        on; InvalidRequest, the running pair kept, if it cannot be served."""
        pair = load_again(settings)
        try:
            context = self._make(pair)
        except (OSError, ssl.SSLError) as exc:  # the files changed since `load` checked them
            raise InvalidRequest(
                f"the TLS certificate {pair.cert} and key {pair.key} cannot be served ({exc}):"
                " give a PEM certificate and its unencrypted PEM key"
            ) from None
        self._current, self.pair = context, pair
        return pair


def load_again(settings: Settings) -> TlsPair:
    """The pair `settings` name, for a server that serves HTTPS already and reloads."""
    pair = load(settings)
    if pair is None:
        raise InvalidRequest(
            "serving plain HTTP in place of HTTPS needs a restart: give --tls-cert and "
            "--tls-key (CORRAL_TLS_CERT, CORRAL_TLS_KEY) again, or restart the server"
        )
    return pair


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def check_pair(cert: Path, key: Path) -> x509.Certificate:
    """The server's certificate from `cert` once both files are usable together, else
    InvalidRequest naming the file and what to do."""
    certificate = _read_cert(cert)
    now = datetime.now(UTC)
    if certificate.not_valid_after_utc <= now:
        raise InvalidRequest(
            f"the TLS certificate {cert} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it (clients refuse "
            "an expired certificate), or use --tls-self-signed for development"
        )
    private_key = _read_key(key)
    if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
        raise InvalidRequest(
            f"the TLS key {key} is not the key of the certificate {cert}: give the key the "
            "certificate was issued for (--tls-key, CORRAL_TLS_KEY)"
        )
    # The HTTP server loads the pair with the ssl module: whatever it refuses (a key type
    # OpenSSL lacks), refuse now, with the files' names.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidRequest(
            f"the TLS certificate {cert} and key {key} cannot be served ({exc.reason or exc}): "
            "give a PEM certificate and its unencrypted PEM key"
        ) from None
    return certificate


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read the TLS {what} {path} ({exc.strerror or exc}): give a readable "
            f"PEM file with {flag}"
        ) from None


def read_chain(path: Path) -> bytes:
    """The certificate file's bytes, or InvalidRequest naming it."""
    return _read(path, "certificate", "--tls-cert (CORRAL_TLS_CERT)")


def _read_cert(path: Path) -> x509.Certificate:
    data = read_chain(path)
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise InvalidRequest(
            f"the TLS certificate {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----):"
            " give the server's certificate, then its chain, in PEM"
        ) from None


def _read_key(path: Path) -> _PrivateKey:
    data = _read(path, "key", "--tls-key (CORRAL_TLS_KEY)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: the server has no one to ask for the passphrase
        raise InvalidRequest(
            f"the TLS key {path} is encrypted: give it unencrypted, readable by the server "
            f"only (`openssl pkey -in {path} -out plain.key`, then chmod 600)"
        ) from None
    except ValueError:
        raise InvalidRequest(
            f"the TLS key {path} is not a PEM private key (-----BEGIN PRIVATE KEY-----): "
            "give the certificate's private key"
        ) from None
    if not isinstance(key, _PRIVATE_KEY_TYPES):
        raise InvalidRequest(
            f"the TLS key {path} is a {type(key).__name__}, which TLS cannot use: give an "
            "RSA, ECDSA or Ed25519 key"
        )
    return key


def _public_der(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed(directory: Path, host: str, ports_domain: str = "localhost") -> TlsPair:
    """The development pair in `directory`: reused while it is valid and names `host` and
    `ports_domain`, else made (and written, the key readable by its owner only)."""
    cert, key = directory / SELF_SIGNED_CERT, directory / SELF_SIGNED_KEY
    names = _names(host, ports_domain)
    if cert.exists() and key.exists():
        try:
            certificate = check_pair(cert, key)
        except InvalidRequest:
            certificate = None  # expired or damaged: made again below
        if certificate is not None and _reusable(certificate, names):
            os.chmod(key, 0o600)
            return TlsPair(cert, key, fingerprint(certificate), self_signed=True)
    certificate = _generate(directory, cert, key, names)
    return TlsPair(cert, key, fingerprint(certificate), self_signed=True)


def _names(host: str, ports_domain: str) -> list[str]:
    """What the development certificate names: this machine's loopback names, the address
    the server listens on (for every address: the machine's host name), and the host
    names of sandboxes' ports (`<port>-<id>.<ports domain>`, corral.client._ports)."""
    names = ["localhost", "127.0.0.1", "::1"]
    extra = socket.gethostname() if host in _WILDCARD_HOSTS else host
    names.append(extra)
    domain = ports_domain.strip(".")
    if "." in domain:  # clients refuse a wildcard of one label (*.localhost)
        names.append("*." + domain)
    return list(dict.fromkeys(filter(None, names)))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _reusable(certificate: x509.Certificate, names: list[str]) -> bool:
    if certificate.not_valid_after_utc - datetime.now(UTC) < RENEW:
        return False
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return all(_san(name) in san.value for name in names)


def _generate(directory: Path, cert: Path, key: Path, names: list[str]) -> x509.Certificate:
    private_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corral development server")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))  # clocks a little behind still accept it
        .not_valid_after(now + timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        # A leaf, not a CA: clients that are given it as their CA file trust it directly
        # (rustls refuses a CA certificate used as a server's own).
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_whole(key, key_pem, 0o600)
    write_whole(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return certificate


def write_whole(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole (a temporary file renamed over it: a reader, or a watcher of
    renames, never sees half), created with `mode`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it; a key is never wider
    os.replace(tmp, path)
