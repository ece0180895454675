"""The conformance script's tables (e2b_conformance_plugin): which of E2B's tests are
cloud-only, and the area each test is reported in."""

from __future__ import annotations

from e2b_conformance_plugin import CLOUD_ONLY, SIDES, area_of, cloud_only, side_of


def test_cloud_only_matches_exact_tests_not_their_prefixes() -> None:
    build = "tests/sync/template_sync/test_build.py::test_build_template"
    assert cloud_only(build)
    assert cloud_only(build + "[param]")
    # `from_template("base")` builds on Corral: a name that merely starts the same counts.
    assert cloud_only(build + "_from_base_template") is None
    tags = "tests/async/template_async/test_tags.py::TestTagsIntegration"
    assert cloud_only(tags + "::test_assign_single_tag_to_existing_template")
    assert cloud_only("tests/async/template_async/test_tags.py::TestAssignTags::x") is None


def test_cloud_only_lists_section_five_of_the_reference() -> None:
    """e2b-sdk-tests.md section 5: 13 sandbox tests and 7 template entries per side, plus
    the async-only skip-cache build."""
    for side in SIDES:
        entries = [n for n in CLOUD_ONLY if side_of(n) == side]
        assert len(entries) == 20 + (side == "async")
        assert all(n.startswith(f"tests/{side}/") for n in entries)


def test_areas() -> None:
    cases = {
        "tests/sync/sandbox_sync/files/test_watch.py::test_watch_iterated": "fs-watch",
        "tests/async/sandbox_async/files/test_read.py::test_read_file": "filesystem",
        "tests/sync/sandbox_sync/commands/test_cmd_kill.py::test_kill_process": "commands",
        "tests/sync/sandbox_sync/pty/test_pty_kill.py::test_kill_pty": "pty",
        "tests/sync/api_sync/test_sbx_kill.py::test_kill_non_existing_sandbox": "lifecycle",
        "tests/async/sandbox_async/test_snapshot_api.py::test_create_snapshot": "snapshots",
        "tests/async/sandbox_async/test_snapshot.py::test_snapshot": "pause-resume",
        "tests/shared/git/test_clone.py::test_clone": "git",
        "tests/sync/template_sync/test_exists.py::test_exists": "templates",
    }
    for nodeid, area in cases.items():
        assert area_of(nodeid) == area, nodeid
    assert side_of("tests/shared/git/test_clone.py::test_clone") == "sync"
