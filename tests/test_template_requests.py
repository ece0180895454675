"""What a template build request becomes before any build: the SDK's builder packs E2B's
JSON, a Dockerfile and its context tar; the server parses them (the one parser) and
refuses bad input naming the line, an oversized context naming the bound."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from corral.client import Template
from corral.errors import InvalidBuild, InvalidRequest
from corral.limits import BUILD_CONTEXT_MAX_BYTES
from corral.server.templates import parse_plan
from corral.v1 import templates_pb2 as pb


def _names(context: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(context)) as tar:
        return {m.name for m in tar.getmembers()}


def test_the_e2b_builder_compiles_to_the_json_and_context_the_server_parses(
    tmp_path: Path,
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "serve.py").write_text("print('hi')\n")
    (tmp_path / "unused.bin").write_bytes(b"x" * 1000)
    template = (
        Template(file_context_path=tmp_path)
        .from_template("python-base")
        .apt_install(["curl"])
        .pip_install("numpy")
        .run_cmd(["echo a", "echo b"], user="nobody")
        .copy("app/", "/app/")
        .set_envs({"MODE": "prod"})
        .set_workdir("/app")
        .set_user("nobody")
        .set_start_cmd("python3 serve.py", ready_cmd="true")
    )
    request = template.to_request("app")
    doc = json.loads(request.e2b_template)
    assert doc["fromTemplate"] == "python-base"
    assert [s["type"] for s in doc["steps"]] == [
        "RUN",
        "RUN",
        "RUN",
        "COPY",
        "ENV",
        "WORKDIR",
        "USER",
    ]
    # Only what copy() names is sent.
    assert _names(request.context) == {"app", "app/serve.py"}

    plan, source = parse_plan(request, tmp_path)
    assert source == "e2b"
    kinds = [step.kind for step in plan.steps]
    assert kinds == ["run", "run", "run", "copy", "env", "workdir", "user", "start", "ready"]
    copy = plan.steps[3]
    assert {f.dest for f in copy.files} >= {"/app/serve.py"}
    assert plan.steps[2].option("user") == "nobody"
    assert plan.metadata.workdir == "/app" and plan.metadata.env == {"MODE": "prod"}


def test_a_dockerfile_error_names_its_line(tmp_path: Path) -> None:
    request = (
        Template(file_context_path=tmp_path)
        .from_dockerfile("FROM python-base\nRUN true\nONBUILD RUN false\n")
        .to_request("bad")
    )
    with pytest.raises(InvalidBuild, match="line 3"):
        parse_plan(request, tmp_path)


def test_a_copy_of_a_file_missing_from_the_context_is_refused(tmp_path: Path) -> None:
    request = (
        Template(file_context_path=tmp_path)
        .from_dockerfile("FROM python-base\nCOPY missing.txt /x\n")
        .to_request("bad")
    )
    with pytest.raises(InvalidBuild, match="line 2"):
        parse_plan(request, tmp_path)


def test_a_context_over_the_bound_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\0" * (BUILD_CONTEXT_MAX_BYTES + 1))
    template = Template(file_context_path=tmp_path).from_template("base").copy("big.bin", "/")
    with pytest.raises(InvalidBuild, match="6 MiB"):
        template.to_request("big")


def test_the_server_refuses_a_context_over_the_bound_from_any_client(tmp_path: Path) -> None:
    request = pb.BuildTemplateRequest(
        name="big", dockerfile="FROM base\n", context=b"\0" * (BUILD_CONTEXT_MAX_BYTES + 1)
    )
    with pytest.raises(InvalidBuild, match="6 MiB"):
        parse_plan(request, tmp_path)


def test_a_hostile_context_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    request = pb.BuildTemplateRequest(
        name="x", dockerfile="FROM base\nCOPY . /\n", context=buffer.getvalue()
    )
    with pytest.raises(InvalidBuild, match=r"build context.*'\.\.'"):
        parse_plan(request, tmp_path)
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({}, "say what to build from"),
        ({"e2b_template": "{not json"}, "not JSON"),
        ({"recipe": "from: base\nsteps: [{frobnicate: 1}]\n"}, "line 2"),
        ({"image": pb.ImageSource(reference=" ")}, "image.reference is empty"),
        ({"recipe": "from: base\n", "build_args": {"A": "1"}}, "build_args"),
        ({"image": pb.ImageSource(reference="r/x"), "context": b"x"}, "send no context"),
    ],
)
def test_bad_requests_are_refused_saying_what_to_do(
    tmp_path: Path, request_fields: dict[str, object], message: str
) -> None:
    request = pb.BuildTemplateRequest(name="x", **request_fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=message):
        parse_plan(request, tmp_path)


def test_the_builder_refuses_what_it_cannot_send(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no base"):
        Template().run_cmd("true").to_request("x")
    with pytest.raises(InvalidRequest, match="already has a base"):
        Template().from_template("a").from_image("b")
    with pytest.raises(InvalidRequest, match="whole build"):
        Template().from_debian("bookworm", ["python3"]).run_cmd("true").to_request("x")
    with pytest.raises(InvalidRequest, match="inside file_context_path"):
        Template(file_context_path=tmp_path).from_template("a").copy("../etc/passwd", "/")
    with pytest.raises(InvalidRequest, match="nothing of that name"):
        Template(file_context_path=tmp_path).from_template("a").copy("nope", "/").to_request("x")


def test_progress_on_a_terminal_keeps_the_latest_step_on_the_last_line() -> None:
    from corral.cli.template import Progress
    from corral.client import BuildLog, JobEvent, LogChunk

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(screen)
    step = JobEvent(1, "step_start", None, 1, "", "step 1/2 RUN make", {"step": 0})
    progress(BuildLog(event=step))
    progress(BuildLog("step 1/2 RUN make", chunk=LogChunk(0, "stdout", b"compil", 1, 0, None)))
    progress(BuildLog("step 1/2 RUN make", chunk=LogChunk(1, "stdout", b"ing\nhalf", 1, 0, None)))
    progress.close()
    text = screen.getvalue()
    assert "[step 1/2 RUN make] compiling\n" in text  # a line split across chunks, joined
    assert "[step 1/2 RUN make] half\n" in text  # the unfinished tail, on close
    # The step's line is redrawn (bold) under the output, once per line written, and
    # cleared before each line and at the end.
    assert text.count("\033[1mstep 1/2 RUN make\033[0m") == 2
    assert text.count("\033[1m") == text.count("\r\033[K")
    assert text.endswith("] half\n")


def test_image_credentials_reach_the_plan(tmp_path: Path) -> None:
    template = Template().from_image("registry.test:5000/app:1", username="u", password="p")
    plan, source = parse_plan(template.to_request("img"), tmp_path)
    assert source == "e2b"
    assert (plan.base.kind, plan.base.ref, plan.base.username, plan.base.password) == (
        "image",
        "registry.test:5000/app:1",
        "u",
        "p",
    )
    assert "password" not in repr(plan.base)

    request = pb.BuildTemplateRequest(
        name="img", image=pb.ImageSource(reference="registry.test:5000/app:1", username="u")
    )
    plan, source = parse_plan(request, tmp_path)
    assert source == "image" and plan.base.username == "u" and plan.steps == ()
