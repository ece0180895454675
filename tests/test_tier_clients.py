"""The same program on every isolation tier, unchanged but for `isolation`: through the
SDK, the CLI, the raw API and the job queue of one real server.

Each test runs once per tier (`tier`, tests/conftest.py); a tier the host lacks skips with
its probe's reason.
"""

from __future__ import annotations

import json
import secrets

import pytest

from corral import Jobs, Sandbox
from corral.client import Volume
from tests.conftest import LiveServer, opts, server_template
from tests.kit.connect import call, stream


@pytest.mark.microvm_subset
def test_the_sdk_runs_one_program_on_every_tier(server: LiveServer, tier: str) -> None:
    template = server_template(tier)
    with Sandbox.create(template, isolation=tier, timeout=120, **opts(server)) as sbx:
        assert sbx.info.isolation == tier
        ran = sbx.commands.run("echo hello $WHO; nproc; exit 3", envs={"WHO": "tiers"})
        assert ran.stdout.splitlines()[0] == "hello tiers" and ran.exit_code == 3
        sbx.files.write("data/notes.txt", "héllo")
        assert sbx.files.read("data/notes.txt") == "héllo"
        assert sbx.commands.run("cat data/notes.txt").stdout == "héllo"
        # Pause (frozen) and resume: the same sandbox, its files kept.
        assert sbx.pause().state == "paused"
        assert sbx.resume().state == "running"
        assert sbx.files.read("data/notes.txt") == "héllo"
        # Network `none` (the default): the loopback interface alone.
        interfaces = sbx.commands.run("cat /proc/net/dev").stdout.count(":")
        assert interfaces == 1


def test_the_cli_runs_one_program_on_every_tier(server: LiveServer, tier: str) -> None:
    on_tier = ("--isolation", tier, "--template", server_template(tier))
    done = server.corral("run", *on_tier, "--", "sh", "-c", "echo from $0; exit 4")
    assert (done.returncode, done.stdout) == (4, "from sh\n"), done.stderr
    created = server.corral("sandbox", "create", *on_tier, "-o", "json")
    assert created.returncode == 0, created.stderr
    sandbox = json.loads(created.stdout)
    try:
        assert sandbox["isolation"] == tier
        sandbox_id = sandbox["sandbox_id"]
        done = server.corral("sandbox", "exec", sandbox_id, "--", "cat", "/proc/self/status")
        assert done.returncode == 0 and "Name:\tcat" in done.stdout, done.stderr
    finally:
        server.corral("sandbox", "kill", sandbox["sandbox_id"])


def test_the_raw_api_names_the_tier_it_gave(server: LiveServer, tier: str) -> None:
    asked = {"timeoutSeconds": 60, "isolation": tier, "template": server_template(tier)}
    response = call(server, "Create", asked)
    assert response.status_code == 200, response.text
    sandbox = response.json()["sandbox"]
    try:
        assert sandbox["isolation"] == tier
        messages, _ = stream(server, "Exec", {"sandboxId": sandbox["id"], "cmd": "exit 5"})
        assert messages[-1]["end"]["exitCode"] == 5
        listed = call(server, "Get", {"sandboxId": sandbox["id"]}).json()["sandbox"]
        assert listed["isolation"] == tier
    finally:
        call(server, "Kill", {"sandboxId": sandbox["id"]})


def test_a_job_runs_on_the_tier_it_asks_for(server: LiveServer, tier: str) -> None:
    with Jobs(**opts(server)) as jobs:
        template = server_template(tier)
        job = jobs.submit(run="echo job on $0; exit 2", isolation=tier, template=template).job
        assert job.spec["isolation"] == tier
        done = jobs.wait(job.id, timeout=120)
        assert (done.state, done.exit_code) == ("failed", 2), done.state_reason
        output = b"".join(chunk.data for chunk in jobs.logs(job.id))
        assert output == b"job on sh\n"


def test_a_volume_outlives_its_sandbox_on_every_tier(server: LiveServer, tier: str) -> None:
    name = f"v-{secrets.token_hex(4)}"
    Volume.create(name, size_mib=16, **opts(server))
    try:
        mounted = {
            "template": server_template(tier),
            "isolation": tier,
            "volumes": [f"{name}:/data"],
            **opts(server),
        }
        with Sandbox.create(**mounted) as sbx:
            assert sbx.commands.run("echo kept > /data/note").exit_code == 0
        with Sandbox.create(**mounted) as sbx:
            assert sbx.commands.run("cat /data/note").stdout == "kept\n"
    finally:
        Volume.delete(name, **opts(server))
