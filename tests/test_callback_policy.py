"""Issue 9, finding 3: SSRF through `callback_url`.

The server POSTs callbacks from its own network, so by default it refuses internal
destinations, at submit and again before each connection (against DNS rebinding), and
tells the tenant nothing about how a refused or internal host:port answered. Names are
resolved by a `StaticResolver` (a fake that never touches the network); every request
these tests let through goes to a receiver on loopback, which they allow explicitly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.config import Settings
from corral.errors import CallbackRefused, InvalidRequest
from corral.jobs import callback_policy
from corral.jobs.callback_policy import ALLOW_SETTING, CallbackPolicy, StaticResolver
from corral.jobs.callbacks import REFUSED, CallbackDispatcher
from corral.jobs.queue import JobQueue
from corral.jobs.spec import JobSpec
from corral.store import Store
from corral.store.job_rows import Attempt
from tests.conftest import LiveServer
from tests.kit.http import CallbackReceiver, Redirector
from tests.kit.polling import until
from tests.test_callbacks import OK_TYPES, finish, run_job

WORKER = "worker-1"

# -- the policy -----------------------------------------------------------------------------

# Literal addresses a tenant might aim at the server's own network, in every spelling a
# URL parser or resolver accepts, and the rule each one breaks.
INTERNAL = [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local"),
    ("http://[fe80::1]:8080/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.3.4/", "private"),
    ("http://192.168.1.1:8443/", "private"),
    ("http://[fd00::1]/", "private"),  # ULA
    ("http://127.0.0.1:7878/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0x7f.0.0.1/", "loopback"),  # hex
    ("http://0.0.0.0:7878/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.0.8/", "reserved"),
    ("http://[2002:7f00:1::]/", "transition"),  # 6to4 of 127.0.0.1
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", "transition"),  # Teredo
    ("http://[64:ff9b::a9fe:a9fe]/", "translated"),  # NAT64 of the metadata address
]


async def refusal(policy: CallbackPolicy, url: str) -> str:
    with pytest.raises(CallbackRefused) as caught:
        await policy.check(url)
    return str(caught.value)


@pytest.mark.parametrize(("url", "rule"), INTERNAL)
async def test_internal_addresses_are_refused_naming_the_rule_and_the_setting(
    url: str, rule: str
) -> None:
    resolver = StaticResolver()
    message = await refusal(CallbackPolicy(resolver=resolver), url)
    assert message.startswith("callback_url: ") and rule in message
    assert ALLOW_SETTING in message
    assert resolver.asked == []  # a literal is never looked up


async def test_an_ambiguous_octal_address_is_refused() -> None:
    # 0177.0.0.1 is 127.0.0.1 to inet_aton, and no address at all to httpx.
    message = await refusal(CallbackPolicy(resolver=StaticResolver()), "http://0177.0.0.1/")
    assert message == "callback_url: Invalid IPv4 address: '0177.0.0.1'"


async def test_public_addresses_pass_and_names_are_resolved_once() -> None:
    resolver = StaticResolver({"hooks.example.com": [["2606:4700::1111", "93.184.215.14"]]})
    policy = CallbackPolicy(resolver=resolver)
    target = await policy.check("https://Hooks.Example.com/corral?x=1")
    assert target.host == "hooks.example.com" and target.port == 443 and target.public
    assert [str(a) for a in target.addresses] == ["2606:4700::1111", "93.184.215.14"]
    assert resolver.asked == ["hooks.example.com"]
    literal = await policy.check("http://8.8.8.8:8080/")
    assert literal.literal and literal.port == 8080 and literal.public


async def test_a_name_with_any_internal_address_is_refused_without_echoing_it() -> None:
    resolver = StaticResolver(
        {
            "mixed.example.com": [["93.184.215.14", "10.20.30.40"]],
            "metadata.example.com": [["::ffff:169.254.169.254"]],
        }
    )
    policy = CallbackPolicy(resolver=resolver)
    message = await refusal(policy, "http://mixed.example.com/")
    assert "'mixed.example.com' resolves to a private" in message
    assert "10.20.30.40" not in message
    message = await refusal(policy, "http://metadata.example.com/")
    assert "link-local" in message and "169.254" not in message.split("(")[0]
    message = await refusal(policy, "http://nowhere.example.com/")
    assert "does not resolve" in message


class HangingResolver:
    """A resolver whose server never answers."""

    async def resolve(self, host: str) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_resolver_that_never_answers_is_a_refusal_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(callback_policy, "RESOLVE_TIMEOUT", 0.05)
    message = await refusal(CallbackPolicy(resolver=HangingResolver()), "http://slow.example.com/")
    assert message.endswith("does not resolve from this server (no answer in time)")


async def test_the_allowlist_lets_networks_and_names_through_and_nothing_else() -> None:
    resolver = StaticResolver({"hooks.corp": [["10.9.8.7"]], "db.corp": [["10.1.1.1"]]})
    policy = CallbackPolicy.parse(" 10.1.0.0/16 , hooks.corp,::1", resolver)
    assert not (await policy.check("http://10.1.2.3/")).public
    assert (await policy.check("http://[::ffff:10.1.2.3]/")).addresses == (
        ipaddress.ip_address("10.1.2.3"),
    )
    await policy.check("http://db.corp/")  # resolves into an allowed network
    await policy.check("http://HOOKS.corp/")  # an allowed name, wherever it points
    await policy.check("http://[::1]:9000/")
    assert "private" in await refusal(policy, "http://10.2.0.1/")
    assert "link-local" in await refusal(policy, "http://169.254.169.254/")
    assert "loopback" in await refusal(policy, "http://127.0.0.1/")


@pytest.mark.parametrize("value", ["10.0.0.1/8", "10.0.0.0/33", "hooks corp", "*.corp", "::1/200"])
def test_a_malformed_allowlist_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(InvalidRequest, match=ALLOW_SETTING):
        CallbackPolicy.parse(value)


def test_the_allowlist_is_a_setting() -> None:
    settings = Settings.from_env({"CORRAL_CALLBACK_ALLOW": "10.0.0.0/8,hooks.corp"})
    policy = CallbackPolicy.parse(settings.callback_allow)
    assert policy.names == {"hooks.corp"}
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8"]
    assert Settings().callback_allow == ""  # nothing internal by default


# -- at submit -----------------------------------------------------------------------------


async def test_submit_refuses_an_internal_url_and_queues_nothing(
    store: Store, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", runtime_dir=tmp_path / "run")
    resolver = StaticResolver({"intranet.example.com": [["192.168.0.10"]]})
    queue = JobQueue(store, settings, callback_policy=CallbackPolicy(resolver=resolver))
    team, _ = store.ensure_default_team()
    for url in ("http://169.254.169.254/", "http://10.0.0.1/", "http://intranet.example.com/"):
        spec = JobSpec.from_dict({"command": ["true"], "callback_url": url})
        with pytest.raises(CallbackRefused, match=ALLOW_SETTING):
            await queue.submit(team, spec)
    assert store.list_jobs(team.id)[0] == []


# -- at delivery ----------------------------------------------------------------------------


def settled(store: Store, *job_ids: str) -> Callable[[], bool]:
    return lambda: all(c.pending == 0 for c in store.callback_counts(list(job_ids)).values())


async def test_a_refused_target_is_never_contacted_and_its_answer_never_told(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    # The attack run: jobs calling back to host:ports of the server's own network; the
    # errors told whether each one answered ("HTTP 404" vs "ConnectError: refused").
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/"  # bound, not listening
    listening = run_job(store, receiver.url)
    not_listening = run_job(store, closed)
    dispatchers(CallbackPolicy()).start()  # the default policy: no allowlist
    await until(settled(store, listening, not_listening), "giving up")

    assert receiver.requests() == []
    counts = store.callback_counts([listening, not_listening])
    assert counts[listening] == counts[not_listening]
    assert counts[listening].last_error == REFUSED == "refused by the server's callback policy"


async def test_a_name_that_rebinds_after_submit_is_refused_at_connect_time(
    store: Store,
    receiver: CallbackReceiver,
    dispatchers: Callable[..., CallbackDispatcher],
    tmp_path: Path,
) -> None:
    port = httpx.URL(receiver.url).port
    # Public when Submit checks it, loopback (where the receiver listens) ever after.
    resolver = StaticResolver({"rebind.example.com": [["93.184.215.14"], ["127.0.0.1"]]})
    policy = CallbackPolicy(resolver=resolver)
    settings = Settings(data_dir=tmp_path / "data", runtime_dir=tmp_path / "run")
    team, _ = store.ensure_default_team()
    spec = JobSpec.from_dict(
        {"command": ["true"], "callback_url": f"http://rebind.example.com:{port}/hook"}
    )
    row, _, secret = await JobQueue(store, settings, callback_policy=policy).submit(team, spec)
    assert secret and resolver.asked == ["rebind.example.com"]  # the public answer is spent
    (claimed,) = store.claim_jobs(WORKER, ["auto"], 1, 60)
    finish(store, Attempt(row.id, WORKER, claimed.attempt))

    dispatchers(policy).start()
    await until(settled(store, row.id), "giving up")
    assert receiver.requests() == []
    assert store.callback_counts([row.id])[row.id].last_error == REFUSED
    assert len(resolver.asked) > 1


async def test_the_post_goes_to_the_checked_address_naming_the_host(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    # A name the system resolver does not know: only the checked answer can be reached.
    port = httpx.URL(receiver.url).port
    resolver = StaticResolver({"hooks.corral.test": [["127.0.0.1"]]})
    job_id = run_job(store, f"http://hooks.corral.test:{port}/hook")
    dispatchers(CallbackPolicy.parse("127.0.0.1", resolver)).start()
    await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "deliveries")

    requests = receiver.requests()
    assert [r.payload["type"] for r in requests] == OK_TYPES
    assert {r.headers["host"] for r in requests} == {f"hooks.corral.test:{port}"}
    assert resolver.asked == ["hooks.corral.test"] * 6  # once per POST, none in between


async def test_proxy_variables_are_not_used(
    store: Store,
    receiver: CallbackReceiver,
    dispatchers: Callable[..., CallbackDispatcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy would connect wherever it likes, not to the address checked.
    proxy = CallbackReceiver()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url.removesuffix("/hook"))
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        job_id = run_job(store, receiver.url)
        dispatchers(CallbackPolicy.parse("127.0.0.1")).start()
        await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "deliveries")
        assert proxy.requests() == []
    finally:
        proxy.close()


async def test_redirects_are_not_followed(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    redirector = Redirector(receiver.url)  # allowed too: following it would deliver
    try:
        job_id = run_job(store, redirector.url)
        dispatchers(CallbackPolicy.parse("127.0.0.1")).start()
        await until(settled(store, job_id), "giving up")
        assert redirector.posts > 0 and receiver.requests() == []
        assert store.callback_counts([job_id])[job_id].delivered == 0
    finally:
        redirector.close()


# -- TLS: the name is verified and sent as SNI while the address is connected to ----------


def _certificates(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for `name` signed by it, made with the openssl command:
    (ca, cert, key) files."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert, key, request = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "req.csr"
    san = tmp_path / "san.ext"
    san.write_text(f"subjectAltName=DNS:{name}\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        [
            *("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1"),
            *("-subj", "/CN=corral test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign"),
        ],
        ["req", *ec, "-keyout", key, "-out", request, "-subj", f"/CN={name}"],
        [
            *("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
            *("-out", cert, "-days", "1", "-extfile", san),
        ],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return ca, cert, key


async def test_https_verifies_the_name_and_sends_it_as_sni(
    store: Store, dispatchers: Callable[..., CallbackDispatcher], tmp_path: Path
) -> None:
    name = "secure.corral.test"
    ca, cert, key = _certificates(tmp_path, name)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    sni: list[str | None] = []

    def seen(_socket: ssl.SSLObject, given: str | None, _context: ssl.SSLContext) -> None:
        sni.append(given)

    server_context.sni_callback = seen
    receiver = CallbackReceiver(tls=server_context)
    port = httpx.URL(receiver.url).port
    resolver = StaticResolver({name: [["127.0.0.1"]], "other.corral.test": [["127.0.0.1"]]})
    trusted = ssl.create_default_context(cafile=str(ca))

    good = run_job(store, f"https://{name}:{port}/hook")
    wrong = run_job(store, f"https://other.corral.test:{port}/hook")  # not the cert's name
    try:
        dispatchers(CallbackPolicy.parse("127.0.0.1", resolver), verify=trusted).start()
        await until(settled(store, good, wrong), "deliveries")
        counts = store.callback_counts([good, wrong])
        assert counts[good].delivered == 6
        assert counts[wrong].delivered == 0  # the certificate is not for that name
        assert {r.headers["host"] for r in receiver.requests()} == {f"{name}:{port}"}
        assert name in sni and "other.corral.test" in sni
    finally:
        receiver.close()


# -- through the API ------------------------------------------------------------------------


@pytest.mark.usefixtures("sandbox_host")
def test_the_api_refuses_internal_callback_urls(server: LiveServer) -> None:
    # The session's server allows 127.0.0.1 (the tests' receivers) and nothing else.
    key = server.new_team(f"ssrf-{secrets.token_hex(3)}")

    def call(method: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{server.url}/corral.v1.JobService/{method}",
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            timeout=30,
        )

    for url, rule in [
        ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),
        ("http://10.0.0.1:8080/", "private"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://0.0.0.0:7878/", "unspecified"),
        ("http://[::1]:7878/", "loopback"),  # 127.0.0.1 is allowed here, ::1 is not
    ]:
        reply = call("Submit", {"spec": {"command": ["true"], "callbackUrl": url}})
        assert reply.status_code == 400, reply.text
        body = reply.json()
        assert body["code"] == "invalid_argument", body
        assert rule in body["message"] and ALLOW_SETTING in body["message"], body
    assert call("List", {}).json().get("jobs", []) == []  # nothing was queued
