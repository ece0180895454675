"""Job specs: every kind read from a mapping, every refusal naming its field, and the
round trips through the store's JSON and the API's message."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import InvalidRequest
from corral.jobs.spec import (
    MAX_ENV,
    MAX_RETRIES,
    MAX_TIMEOUT,
    JobFile,
    JobSpec,
    Step,
    Workload,
)
from corral.v1 import jobs_pb2


def refused(data: Any) -> str:
    with pytest.raises(InvalidRequest) as caught:
        JobSpec.from_dict(data)
    return str(caught.value)


# -- each kind ------------------------------------------------------------------------------


def test_a_command_job() -> None:
    spec = JobSpec.from_dict({"kind": "command", "command": ["python3", "-V"], "timeout": 30})
    assert spec.kind == "command"
    assert spec.workload == Workload(command=("python3", "-V"))
    assert spec.workloads == (Step(Workload(command=("python3", "-V"))),)
    assert spec.timeout == 30
    assert spec.max_attempts == 1
    assert spec.workload.argv("/unused") == ["python3", "-V"]


def test_a_shell_job_defaults_to_sh_and_takes_bash() -> None:
    sh = JobSpec.from_dict({"kind": "shell", "run": "echo hi"})
    assert sh.workload == Workload(run="echo hi", shell="sh")
    assert sh.workload.argv("") == ["sh", "-c", "echo hi"]
    bash = JobSpec.from_dict({"kind": "shell", "run": "echo $BASH", "shell": "bash"})
    assert bash.workload is not None
    assert bash.workload.argv("") == ["bash", "-c", "echo $BASH"]


@pytest.mark.parametrize(
    ("language", "interpreter"), [("python", "python3"), ("node", "node"), ("bash", "bash")]
)
def test_a_code_job_in_each_language(language: str, interpreter: str) -> None:
    spec = JobSpec.from_dict({"kind": "code", "code": "x", "language": language})
    assert spec.workload == Workload(code="x", language=language)
    assert spec.workload.argv("/tmp/src") == [interpreter, "/tmp/src"]


def test_a_workflow_job() -> None:
    spec = JobSpec.from_dict(
        {
            "kind": "workflow",
            "steps": [
                {"run": "echo building"},
                {"name": "test", "command": ["python3", "-m", "pytest"], "timeout": 120},
                {
                    "code": "print(1)",
                    "language": "python",
                    "continue_on_error": True,
                    "env": {"A": "1"},
                },
            ],
        }
    )
    assert spec.kind == "workflow" and spec.workload is None
    first, second, third = spec.workloads
    assert first == Step(Workload(run="echo building"))
    assert first.label(0) == "step 1"
    assert second.name == "test" and second.label(1) == "test" and second.timeout == 120
    assert third.continue_on_error and dict(third.env) == {"A": "1"}
    assert third.workload == Workload(code="print(1)", language="python")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        ({"command": ["true"]}, "command"),
        ({"run": "true"}, "shell"),
        ({"code": "pass", "language": "python"}, "code"),
        ({"steps": [{"run": "true"}]}, "workflow"),
    ],
)
def test_the_kind_is_inferred_from_the_one_workload_given(data: dict[str, Any], kind: str) -> None:
    assert JobSpec.from_dict(data).kind == kind


def test_no_kind_and_no_or_several_workloads_is_refused() -> None:
    assert "kind" in refused({})
    assert "kind" in refused({"command": ["true"], "run": "true"})


def test_zero_values_are_the_defaults() -> None:
    """The API's zero fields (proto3) mean "the worker's default"."""
    spec = JobSpec.from_dict(
        {"command": ["x"], "timeout": 0, "retries": 0, "retry_backoff": 0, "priority": 0}
    )
    assert spec.timeout is None and spec.retry_backoff is None
    assert spec.retries == 0 and spec.priority == 0


# -- refusals, each naming what is wrong ----------------------------------------------------


def test_an_unknown_top_level_field_is_named() -> None:
    message = refused({"kind": "command", "command": ["x"], "bogus": 1})
    assert "'bogus'" in message and "unknown field" in message


def test_an_unknown_step_field_is_named_with_its_step() -> None:
    message = refused({"steps": [{"run": "a"}, {"run": "b", "retries": 2}]})
    assert message.startswith("steps[1]") and "'retries'" in message


def test_a_step_with_two_workloads_is_refused() -> None:
    message = refused({"steps": [{"run": "a", "command": ["b"]}]})
    assert "steps[0]" in message and "exactly one of command, run or code" in message


def test_a_step_error_names_the_step_without_a_stray_dot() -> None:
    """The refusals of `_workload` are written "steps[0].: …" (the prefix meant for a
    field name, used bare)."""
    assert refused({"steps": [{"run": "a", "command": ["b"]}]}).startswith("steps[0]: ")
    assert refused({"steps": [{}]}).startswith("steps[0]: ")


def test_a_job_with_the_workload_of_another_kind_is_refused() -> None:
    assert refused({"kind": "command", "run": "x"}) == "kind command needs 'command'"
    message = refused({"kind": "command", "command": ["x"], "run": "y"})
    assert "'run'" in message and "'command'" in message


@pytest.mark.parametrize("shell", ["zsh", "fish", "/bin/sh"])
def test_a_shell_other_than_sh_or_bash_is_refused(shell: str) -> None:
    assert refused({"run": "x", "shell": shell}).startswith("shell: ")
    message = refused({"steps": [{"run": "x", "shell": shell}]})
    assert message.startswith("steps[0].shell: ") and repr(shell) in message


def test_an_unknown_or_missing_language_is_refused() -> None:
    message = refused({"code": "x", "language": "ruby"})
    assert message.startswith("language: ") and "'ruby'" in message and "python" in message
    assert refused({"code": "x"}).startswith("language: ")
    assert refused({"steps": [{"code": "x", "language": "cobol"}]}).startswith(
        "steps[0].language: "
    )
    assert "'language'" in refused({"run": "x", "language": "python"})


@pytest.mark.parametrize("kind", ["agent", "governed"])
def test_later_kinds_are_refused_as_not_built_yet(kind: str) -> None:
    message = refused({"kind": kind})
    assert message.startswith("kind: ") and "not built yet" in message and repr(kind) in message


def test_an_unknown_kind_is_refused() -> None:
    message = refused({"kind": "lambda", "command": ["x"]})
    assert message.startswith("kind: ") and "'lambda'" in message


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ({"memory_mib": 1}, "memory_mib"),
        ({"memory_mib": 10**9}, "memory_mib"),
        ({"cpu": -1}, "cpu"),
        ({"pids": -5}, "pids"),
        ({"swap": 1}, "swap"),
    ],
)
def test_limits_out_of_range_are_refused(limits: dict[str, Any], named: str) -> None:
    message = refused({"command": ["x"], "limits": limits})
    assert message.startswith("limits: ") and named in message


def test_an_environment_too_big_is_refused() -> None:
    many = {f"V{i}": "x" for i in range(MAX_ENV + 1)}
    assert refused({"command": ["x"], "env": many}).startswith("env: ")
    huge = {"BIG": "x" * 100_000}
    message = refused({"command": ["x"], "env": huge})
    assert message.startswith("env: ") and "bytes" in message
    assert refused({"steps": [{"run": "x", "env": huge}]}).startswith("steps[0].env: ")
    assert refused({"command": ["x"], "env": {"A=B": "x"}}).startswith("env: ")
    assert refused({"command": ["x"], "env": {"A": [1]}}).startswith("env: ")


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/workspace/../etc/passwd", ".."])
def test_a_file_path_with_dot_dot_is_refused(path: str) -> None:
    message = refused({"command": ["x"], "files": [{"path": "ok", "content": ""}, {"path": path}]})
    assert message.startswith("files[1].path: ") and "'..'" in message


def test_bad_files_are_refused() -> None:
    assert refused({"command": ["x"], "files": "a.txt"}).startswith("files: ")
    assert refused({"command": ["x"], "files": [{"path": "a", "owner": 0}]}).startswith(
        "files[0]: "
    )
    bad_base64 = [{"path": "a", "content": {"base64": "!!"}}]
    assert refused({"command": ["x"], "files": bad_base64}).startswith("files[0].content: ")
    assert refused({"command": ["x"], "files": [{"path": "a", "content": 5}]}).startswith(
        "files[0].content: "
    )
    assert refused({"command": ["x"], "files": [{"path": "a", "mode": 0o10000}]}).startswith(
        "files[0].mode: "
    )


@pytest.mark.parametrize("workdir", ["workspace", "./w", "/w/../etc"])
def test_a_relative_workdir_is_refused(workdir: str) -> None:
    assert refused({"command": ["x"], "workdir": workdir}).startswith("workdir: ")


def test_the_workdir_is_normalized() -> None:
    assert JobSpec.from_dict({"command": ["x"], "workdir": "/w//a/./b/"}).workdir == "/w/a/b"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "example.com/hook", "http://", "javascript:alert(1)"]
)
def test_a_callback_url_must_be_http(url: str) -> None:
    assert refused({"command": ["x"], "callback_url": url}).startswith("callback_url: ")


@pytest.mark.parametrize("timeout", [-1, MAX_TIMEOUT + 1, 1.5, "10", True])
def test_a_timeout_out_of_range_is_refused(timeout: object) -> None:
    assert refused({"command": ["x"], "timeout": timeout}).startswith("timeout: ")
    step = {"steps": [{"run": "x", "timeout": timeout}]}
    assert refused(step).startswith("steps[0].timeout: ")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("retries", MAX_RETRIES + 1),
        ("retries", -1),
        ("retry_backoff", -0.5),
        ("retry_backoff", 3601),
        ("retry_backoff", "1s"),
        ("priority", 1001),
        ("priority", -1001),
        ("priority", True),
    ],
)
def test_numbers_out_of_range_are_refused(name: str, value: object) -> None:
    assert refused({"command": ["x"], name: value}).startswith(f"{name}: ")


def test_choices_and_texts_are_checked() -> None:
    assert refused({"command": ["x"], "isolation": "docker"}).startswith("isolation: ")
    assert refused({"command": ["x"], "network": "host"}).startswith("network: ")
    assert refused({"command": "echo hi"}).startswith("command: ")
    assert refused({"command": ["echo", "a\0b"]}).startswith("command[1]: ")
    assert refused({"command": ["x"], "labels": {'a"b': "c"}}).startswith("labels: ")
    assert refused({"command": ["x"], "metadata": {"k": "v" * 600}}).startswith("metadata: ")
    assert refused({"steps": "echo"}).startswith("steps: ")
    assert refused({"steps": ["echo"]}).startswith("steps[0]: ")
    assert refused({"kind": "workflow", "steps": [{"run": "a"}], "run": "b"}).startswith("run: ")
    assert refused({"kind": "shell", "run": "a", "steps": [{"run": "b"}]}).startswith("steps: ")
    assert "mapping" in refused("kind: command")


# -- round trips ----------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "kind": "workflow",
    "steps": [
        {"name": "build", "run": "make", "shell": "bash", "timeout": 60},
        {"command": ["./test", "--fast"], "continue_on_error": True, "env": {"FAST": "1"}},
        {"code": "console.log(1)", "language": "node"},
    ],
    "template": "host",
    "isolation": "namespace",
    "limits": {"memory_mib": 512, "cpu": 0.5, "pids": 64},
    "network": "none",
    "env": {"CI": "1", "EMPTY": ""},
    "files": [
        {"path": "a.txt", "content": "hello\n"},
        {"path": "/opt/bin/run", "content": "#!/bin/sh\n", "mode": 0o755},
        {"path": "blob", "content": {"base64": "AP/+gA=="}},
    ],
    "workdir": "/src",
    "timeout": 600,
    "retries": 3,
    "retry_backoff": 0.25,
    "priority": -7,
    "labels": {"app.kubernetes.io/name": "web", "team": "a b"},
    "metadata": {"commit": "abc123"},
    "callback_url": "https://example.com/hooks/corral",
}

SPECS = [
    FULL,
    {"command": ["true"]},
    {"kind": "shell", "run": "echo hi", "shell": "sh"},
    {"code": "print(1)", "language": "python", "priority": 5},
]


@pytest.mark.parametrize("data", SPECS)
def test_to_dict_and_back_is_the_same_spec(data: dict[str, Any]) -> None:
    spec = JobSpec.from_dict(data)
    again = JobSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


@pytest.mark.parametrize("data", SPECS)
def test_to_proto_and_back_is_the_same_spec(data: dict[str, Any]) -> None:
    spec = JobSpec.from_dict(data)
    message = spec.to_proto()
    wire = jobs_pb2.JobSpec.FromString(message.SerializeToString())
    assert JobSpec.from_proto(wire) == spec


def test_binary_file_content_survives_both_round_trips() -> None:
    content = bytes(range(256)) * 4
    spec = JobSpec(
        kind="command",
        workload=Workload(command=("x",)),
        files=(JobFile("data.bin", content, 0o600), JobFile("text", b"plain\n")),
    )
    as_dict = spec.to_dict()
    assert set(as_dict["files"][0]["content"]) == {"base64"}  # not valid UTF-8
    assert as_dict["files"][1]["content"] == "plain\n"
    assert JobSpec.from_dict(as_dict).files == spec.files
    assert JobSpec.from_proto(spec.to_proto()).files == spec.files
    assert JobSpec.from_dict(FULL).files[2].content == b"\x00\xff\xfe\x80"


def test_a_spec_keeps_only_what_was_asked() -> None:
    """Defaults are the worker's to fill: they are not written into the stored spec."""
    assert JobSpec.from_dict({"command": ["true"]}).to_dict() == {
        "kind": "command",
        "command": ["true"],
    }


def test_numbers_and_booleans_in_env_and_labels_are_text() -> None:
    spec = JobSpec.from_dict(
        {"command": ["x"], "env": {"PORT": 8080, "DEBUG": True}, "labels": {"suite": 19409665}}
    )
    assert spec.env == {"PORT": "8080", "DEBUG": "true"}
    assert spec.labels == {"suite": "19409665"}
