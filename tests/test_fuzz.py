"""The API under fuzzing (issue 9): every RPC of every service, sent malformed JSON and
protobuf, wrong types, huge and nested values, bad compression and envelopes, odd content
types and headers, with and without a valid key, against a real server. Bad input must get
a client error: no 500, no `internal`/`unknown`, no dropped connection, no hang; the server
and the fuzzer's sandbox keep working. `benchmarks/fuzz.py` runs the long version."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corral.config import Settings
from tests.conftest import LiveServer, start_server
from tests.fuzzing import fuzz_server
from tests.kit.connect import assert_serving

pytestmark = [pytest.mark.sandbox, pytest.mark.usefixtures("sandbox_host")]


@pytest.fixture(scope="module")
def fuzzed(settings: Settings) -> Iterator[LiveServer]:
    # No process backend: a fuzzed Create must never get a sandbox without isolation.
    live = start_server(
        settings,
        settings.runtime_dir / "fuzz-data",
        pool_size=1,
        extra_env={"CORRAL_ALLOW_PROCESS_BACKEND": "0"},
    )
    try:
        yield live
    finally:
        live.stop()


def test_fuzzing_finds_no_server_error(fuzzed: LiveServer) -> None:
    found = fuzz_server(fuzzed.url, fuzzed.key, seed=9, count=1200, seconds=30)
    report = found.report.as_dict()
    assert found.report.requests >= 200, report
    assert found.report.server_errors == 0 and found.report.hangs == 0, report
    assert fuzzed.process.poll() is None, "the server died"
    assert not found.broken, "the fuzzer's sandbox no longer runs a command"
    assert_serving(fuzzed)
