"""Build plans: Dockerfiles, YAML recipes and E2B's Template builder compile to one list of
steps, bad input is refused naming its line, and the step cache key changes exactly when
a step or what it reads changes. Pure logic over real build contexts in tmp_path."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from corral.errors import InvalidBuild, InvalidRequest
from corral.images import (
    Base,
    BuildContext,
    BuildPlan,
    BuildStep,
    cache_keys,
    parse_dockerfile,
    parse_e2b_template,
    parse_recipe,
)

SH = ("/bin/sh", "-c")


def _files(root: Path, files: dict[str, str]) -> BuildContext:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return BuildContext(root)


def _kinds(plan: BuildPlan) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.kind, s.args) for s in plan.steps]


@pytest.fixture
def app(tmp_path: Path) -> BuildContext:
    ctx = _files(
        tmp_path,
        {
            "app/main.py": "print('hi')\n",
            "app/lib/util.py": "X = 1\n",
            "app/.env": "SECRET=1\n",
            "app/debug.log": "noise\n",
            "requirements.txt": "flask\n",
            ".dockerignore": "# not for images\napp/.env\n**/*.log\n",
        },
    )
    os.symlink("main.py", tmp_path / "app/entry.py")
    with tarfile.open(tmp_path / "site.tar.gz", "w:gz") as tar:
        data = b"<h1>hi</h1>"
        info = tarfile.TarInfo("index.html")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "notes.tgz").write_text("not really an archive\n")
    return ctx


EVERY_INSTRUCTION = """\
# syntax=docker/dockerfile:1.7
ARG BASE=debian:bookworm
FROM ${BASE} AS app
MAINTAINER someone@example.com
ARG VERSION=1.0
ARG EMPTY
ENV APP_HOME=/srv/app \\
    GREETING="hello world"
# comments and blank lines inside a continuation are dropped, as in Docker

ENV LEGACY value with spaces
LABEL org.opencontainers.image.version=$VERSION "with space"=yes
WORKDIR $APP_HOME
WORKDIR sub
COPY --chown=app:app --chmod=640 app/ ./code/
COPY requirements.txt /tmp/
ADD site.tar.gz notes.tgz /srv/www/
RUN pip install -r /tmp/requirements.txt && \\
    echo "${VERSION}"
RUN ["python3", "-c", "print(1)"]
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN echo in bash | cat
USER app:app
EXPOSE 8080 53/UDP
HEALTHCHECK --interval=5s --timeout=2s --retries=3 CMD curl -f http://localhost:8080/
STOPSIGNAL SIGINT
ENTRYPOINT ["python3"]
CMD ["main.py"]
"""


def test_every_instruction_compiles(app: BuildContext) -> None:
    plan = parse_dockerfile(EVERY_INSTRUCTION, app, {"VERSION": "2.0"})
    assert plan.base == Base("image", "debian:bookworm")
    assert plan.notes == (
        "Dockerfile line 1: `# syntax=docker/dockerfile:1.7` ignored: "
        "Corral reads the Dockerfile itself",
    )
    steps = {s.line: s for s in plan.steps}
    assert [(s.line, s.kind) for s in plan.steps] == [
        (4, "label"),
        (5, "arg"),  # ARG EMPTY (line 6) declares without a value: no step
        (7, "env"),
        (11, "env"),
        (12, "label"),
        (13, "workdir"),
        (14, "workdir"),
        (15, "copy"),
        (16, "copy"),
        (17, "extract"),
        (17, "copy"),
        (18, "run"),
        (20, "run"),
        (22, "run"),
        (23, "user"),
        (24, "expose"),
        (25, "ready"),
        (26, "stopsignal"),
        (28, "start"),
    ]
    assert steps[5].args == ("VERSION", "2.0")  # --build-arg beats the default
    assert steps[7].args == ("APP_HOME", "/srv/app", "GREETING", "hello world")
    assert steps[11].args == ("LEGACY", "value with spaces")
    assert steps[12].args == ("org.opencontainers.image.version", "2.0", "with space", "yes")
    assert steps[14].args == ("/srv/app/sub",)  # WORKDIR relative to the one before
    copy = steps[15]
    assert copy.options == (("chmod", "640"), ("chown", "app:app"))
    assert [(f.path, f.dest, f.kind, f.mode) for f in copy.files] == [
        ("app", "/srv/app/sub/code", "dir", 0o640),
        ("app/entry.py", "/srv/app/sub/code/entry.py", "symlink", 0o777),
        ("app/lib", "/srv/app/sub/code/lib", "dir", 0o640),
        ("app/lib/util.py", "/srv/app/sub/code/lib/util.py", "file", 0o640),
        ("app/main.py", "/srv/app/sub/code/main.py", "file", 0o640),
    ]  # .env and *.log are in .dockerignore; the symlink is copied as a link
    assert copy.files[1].target == "main.py"
    assert [f.dest for f in steps[16].files] == ["/tmp/requirements.txt"]
    extract, notes = (s for s in plan.steps if s.line == 17)
    assert extract.args == ("/srv/www",) and [f.path for f in extract.files] == ["site.tar.gz"]
    # Docker unpacks by content, not name: a text file called .tgz is copied as is.
    assert [f.dest for f in notes.files] == ["/srv/www/notes.tgz"]
    # RUN is not substituted by the parser: its shell sees ARG and ENV in its environment.
    assert steps[18].args == (*SH, 'pip install -r /tmp/requirements.txt &&     echo "${VERSION}"')
    assert steps[20].args == ("python3", "-c", "print(1)")
    assert steps[22].args == ("/bin/bash", "-o", "pipefail", "-c", "echo in bash | cat")
    assert steps[24].args == ("8080", "53/udp")
    assert steps[25].options == (("interval", "5s"), ("timeout", "2s"), ("retries", "3"))

    meta = plan.metadata
    assert meta.env == {
        "APP_HOME": "/srv/app",
        "GREETING": "hello world",
        "LEGACY": "value with spaces",
    }
    assert (meta.workdir, meta.user, meta.stop_signal) == ("/srv/app/sub", "app:app", "SIGINT")
    assert meta.start == ("python3", "main.py")  # exec ENTRYPOINT takes CMD as arguments
    # SHELL applies to every shell form after it, HEALTHCHECK's too.
    assert meta.ready == ("/bin/bash", "-o", "pipefail", "-c", "curl -f http://localhost:8080/")
    assert meta.labels["maintainer"] == "someone@example.com"
    assert meta.expose == ("8080", "53/udp")
    # Build args are in the environment of later RUN steps but not in the template.
    states = dict((s.line, st) for s, st in plan.states())
    assert states[18].env["VERSION"] == "2.0" and "VERSION" not in meta.env
    assert (states[18].workdir, states[18].user) == ("/srv/app/sub", "root")
    assert states[28].user == "app:app"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ENV A=$X B=${X} C=${X:-d} D=${UNSET:-d} E=${X:+set} F=${UNSET:+set}", "1 1 1 d set -"),
        (
            "ENV A=${EMPTY:-d} B=${EMPTY-d} C=${EMPTY:+s} D=${EMPTY+s} E=${UNSET-d} F=x",
            "d - - s d x",
        ),
        ("ENV A='$X' B=\"$X\" C=\\$X D=$X$X E=${X:-${UNSET:-n}} F=a$", "$X 1 $X 11 1 a$"),
    ],
)
def test_substitution(text: str, expected: str) -> None:
    plan = parse_dockerfile(f"FROM scratch\nARG X=1\nARG EMPTY=\n{text}\n")
    values = plan.steps[-1].args[1::2]
    assert " ".join(v or "-" for v in values) == expected


def test_env_sees_values_from_before_its_line() -> None:
    plan = parse_dockerfile("FROM scratch\nENV A=old\nENV A=new B=$A\n")
    assert plan.steps[-1].args == ("A", "new", "B", "old")


def test_global_arg_is_seen_again_only_when_redeclared() -> None:
    text = "ARG TAG=12\nFROM debian:${TAG}\nENV A=x$TAG\nARG TAG\nENV B=$TAG\n"
    plan = parse_dockerfile(text)
    assert plan.base.ref == "debian:12"
    assert _kinds(plan) == [("env", ("A", "x")), ("arg", ("TAG", "12")), ("env", ("B", "12"))]


def test_escape_directive_and_continuations() -> None:
    text = "# escape=`\nFROM scratch\nRUN echo a `\n  # dropped\n  b\nWORKDIR C:\\app\n"
    plan = parse_dockerfile(text)
    assert _kinds(plan) == [("run", (*SH, "echo a   b")), ("workdir", ("/C:\\app",))]
    assert plan.steps[0].line == 3


def test_start_command_forms() -> None:
    def start(text: str) -> tuple[str, ...]:
        return parse_dockerfile("FROM scratch\n" + text).metadata.start

    assert start("CMD python3 app.py\n") == (*SH, "python3 app.py")
    assert start('ENTRYPOINT ["tini", "--"]\nCMD python3 app.py\n') == (
        "tini",
        "--",
        *SH,
        "python3 app.py",
    )
    assert start("ENTRYPOINT exec server\nCMD ignored\n") == (*SH, "exec server")
    assert start('SHELL ["/bin/bash", "-c"]\nCMD run\n') == ("/bin/bash", "-c", "run")
    assert start("RUN true\n") == ()


def test_healthcheck_none_clears_the_ready_check() -> None:
    plan = parse_dockerfile("FROM scratch\nHEALTHCHECK CMD true\nHEALTHCHECK NONE\n")
    assert plan.metadata.ready == ()


# (Dockerfile text, line of the error, words the message must hold)
BAD = [
    ("FROM a\nFROBNICATE x\n", 2, "unknown instruction FROBNICATE"),
    ("FROM a\nVOLUME /data\n", 2, "corral volume create"),
    ("FROM a\nONBUILD RUN x\n", 2, "ONBUILD is not supported"),
    ("FROM a AS one\nRUN x\nFROM b\n", 3, "single-stage"),
    ("FROM a\nCOPY --from=build /x /y\n", 2, "--from"),
    ("FROM a\n\nADD https://example.com/x.tgz /x\n", 3, "RUN curl"),
    ("FROM a\nRUN --mount=type=cache,target=/root true\n", 2, "RUN --mount"),
    ("FROM a\nRUN --network=host true\n", 2, "network policy"),
    ("FROM a\nRUN <<EOF\necho hi\nEOF\n", 2, "heredocs"),
    ("RUN true\nFROM a\n", 1, "before FROM"),
    ("FROM --platform=linux/arm64 a\n", 1, "drop the flag"),
    ("FROM a b\n", 1, "FROM takes one image"),
    ("FROM a\nCMD ['python3', 'app.py']\n", 2, "JSON array"),
    ("FROM a\nCMD []\n", 2, "runs nothing"),
    ("FROM a\nSHELL /bin/bash -c\n", 2, "SHELL takes a JSON array"),
    ("FROM a\nEXPOSE http\n", 2, "EXPOSE takes ports"),
    ("FROM a\nENV 1BAD=x\n", 2, "not a valid variable name"),
    ("FROM a\nENV ALONE\n", 2, "needs a value"),
    ("FROM a\nLABEL =x\n", 2, "NAME=VALUE"),
    ('FROM a\nENV A="open\n', 2, "quote is not closed"),
    ("FROM a\nENV A=${B\n", 2, "no closing }"),
    ("FROM a\nENV A=${B/x/y}\n", 2, "not a substitution"),
    ("FROM a\nENV A=${MISSING:?set MISSING}\n", 2, "MISSING: set MISSING"),
    ("FROM a\nARG 9x=1\n", 2, "not a valid name"),
    ("FROM a\nUSER\n", 2, "USER needs arguments"),
    ("FROM a\nHEALTHCHECK --every=5s CMD true\n", 2, "--interval=30s"),
    ("FROM a\nHEALTHCHECK curl x\n", 2, "CMD command"),
    ("FROM a\nSTOPSIGNAL kill me\n", 2, "STOPSIGNAL"),
    ("FROM a\nCOPY only-one\n", 2, "sources and a destination"),
    ("FROM a\nCOPY --chmod=999 a /a\n", 2, "octal mode"),
    ("FROM a\nCOPY --parents a /a\n", 2, "--chown or --chmod"),
    ("FROM a\nCOPY a /a\n", 2, "needs a build context"),
    ("# escape=x\nFROM a\n", 1, "escape=x"),
    ("# escape=`\n# escape=`\nFROM a\n", 2, "given twice"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD)
def test_bad_dockerfiles_name_their_line(text: str, line: int, words: str) -> None:
    with pytest.raises(InvalidBuild, match=f"^Dockerfile line {line}: ") as info:
        parse_dockerfile(text)
    assert words in str(info.value)
    assert isinstance(info.value, InvalidRequest)  # sent as invalid_argument


def test_whole_file_errors() -> None:
    with pytest.raises(InvalidBuild, match="no FROM"):
        parse_dockerfile("# only a comment\n")
    with pytest.raises(InvalidBuild, match="TYPO is not declared by any ARG; add `ARG TYPO`"):
        parse_dockerfile("FROM a\nARG VERSION\n", build_args={"TYPO": "1"})


@pytest.mark.parametrize(
    ("copy", "words"),
    [
        ("COPY ../outside /x", "outside the build context"),
        ("COPY missing.txt /x", "names no file in the build context"),
        ("COPY app/.env /x", ".dockerignore excludes"),
        ("COPY app/*.py requirements.txt /dir", "ending in /"),
        ("COPY escape /x", "leads out of the build context"),
        ("COPY abs-escape /x/", "leads out of the build context"),
        ("COPY linked/ /x/", "leads out of the build context"),
        ("COPY inner/ /x/", "leads out of the build context"),
        ("COPY dangling /x", "symlink to nothing"),
        ("COPY fifo /x", "not a regular file"),
    ],
)
def test_bad_context_sources(app: BuildContext, tmp_path: Path, copy: str, words: str) -> None:
    outside = tmp_path.parent / "outside-secret"
    outside.mkdir(exist_ok=True)
    (outside / "passwd").write_text("root:x:0:0\n")
    os.symlink("../outside-secret/passwd", tmp_path / "escape")
    os.symlink(outside / "passwd", tmp_path / "abs-escape")
    os.symlink(outside, tmp_path / "linked")
    (tmp_path / "inner").mkdir()
    os.symlink("/etc/passwd", tmp_path / "inner/hostfile")  # nested: refused as well
    os.symlink("nothing-here", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidBuild, match=r"^Dockerfile line 2: ") as info:
        parse_dockerfile(f"FROM a\n{copy}\n", BuildContext(tmp_path))
    assert words in str(info.value)
    assert str(tmp_path.parent) not in str(info.value)  # no host path goes back to the client
    if "missing" in copy:  # absent, not excluded: .dockerignore is not blamed
        assert ".dockerignore" not in str(info.value)


def test_context_symlinks_inside_are_kept_or_followed(tmp_path: Path) -> None:
    ctx = _files(tmp_path, {"real/file.txt": "data"})
    os.symlink("real/file.txt", tmp_path / "top")
    os.symlink("does-not-exist", tmp_path / "real/dangling")
    os.symlink(tmp_path / "real/file.txt", tmp_path / "real/absolute-inside")
    plan = parse_dockerfile("FROM a\nCOPY top /top.txt\nCOPY real /r/\n", ctx)
    top, tree = plan.steps
    # A source named by the step is followed (its content is copied) ...
    assert [(f.path, f.dest, f.kind) for f in top.files] == [("top", "/top.txt", "file")]
    # ... links met inside a copied directory stay links, even dangling ones.
    assert [(f.dest, f.kind, f.target) for f in tree.files] == [
        ("/r", "dir", ""),
        ("/r/absolute-inside", "symlink", str(tmp_path / "real/file.txt")),
        ("/r/dangling", "symlink", "does-not-exist"),
        ("/r/file.txt", "file", ""),
    ]


def test_dockerignore_rules(tmp_path: Path) -> None:
    ctx = _files(
        tmp_path,
        {
            ".dockerignore": "/node_modules\n**/*.pyc\ndocs\n!docs/keep.md\nsecret?.txt\n",
            "node_modules/x/index.js": "",
            "src/a.py": "",
            "src/deep/a.pyc": "",
            "a.pyc": "",
            "docs/drop.md": "",
            "docs/keep.md": "",
            "secret1.txt": "",
            "secret10.txt": "",
        },
    )
    plan = parse_dockerfile("FROM a\nCOPY . /c/\n", ctx)
    assert sorted(f.path for f in plan.steps[0].files if f.kind == "file") == [
        ".dockerignore",
        "docs/keep.md",
        "secret10.txt",
        "src/a.py",
    ]


def test_globs_match_one_level(tmp_path: Path) -> None:
    ctx = _files(tmp_path, {"a.py": "", "b.py": "", "pkg/c.py": "", "x.txt": ""})
    plan = parse_dockerfile('FROM a\nWORKDIR /app\nCOPY *.py ./\nCOPY ["x.txt", "y/"]\n', ctx)
    assert [f.dest for f in plan.steps[1].files] == ["/app/a.py", "/app/b.py"]
    assert [f.dest for f in plan.steps[2].files] == ["/app/y/x.txt"]


# -- the cache key ------------------------------------------------------------------------

CACHED = """\
FROM debian:bookworm
RUN apt-get update
ENV PATH=/opt/bin:/usr/bin
WORKDIR /app
COPY app/ /app/
RUN pip install -r requirements.txt
USER app
RUN python3 -m compileall /app
"""


def test_editing_a_step_changes_its_key_and_the_later_ones(app: BuildContext) -> None:
    base = "sha256:" + "0" * 64
    keys = cache_keys(parse_dockerfile(CACHED, app), base)
    assert keys == cache_keys(parse_dockerfile(CACHED, app), base)  # stable
    assert len(set(keys)) == len(keys) == 7
    edited = CACHED.replace("pip install -r", "pip install --no-cache-dir -r")  # step 5
    changed = cache_keys(parse_dockerfile(edited, app), base)
    assert changed[:4] == keys[:4] and all(
        a != b for a, b in zip(changed[4:], keys[4:], strict=True)
    )
    assert cache_keys(parse_dockerfile(CACHED, app), "sha256:" + "1" * 64)[0] != keys[0]
    # Comments and blank lines move steps without changing them: the keys stay.
    moved = CACHED.replace("ENV", "# tuned\n\nENV")
    assert cache_keys(parse_dockerfile(moved, app), base) == keys


def test_copy_keys_follow_content_not_mtime(app: BuildContext) -> None:
    base = "sha256:" + "0" * 64
    main = app.root / "app/main.py"
    keys = cache_keys(parse_dockerfile(CACHED, app), base)
    os.utime(main, (1, 1))
    assert cache_keys(parse_dockerfile(CACHED, BuildContext(app.root)), base) == keys
    (app.root / "app/debug.log").write_text("ignored files change nothing")
    assert cache_keys(parse_dockerfile(CACHED, BuildContext(app.root)), base) == keys
    main.write_text("print('changed')\n")
    after = cache_keys(parse_dockerfile(CACHED, BuildContext(app.root)), base)
    assert after[:3] == keys[:3] and all(a != b for a, b in zip(after[3:], keys[3:], strict=True))
    main.write_text("print('hi')\n")
    main.chmod(0o755)  # the mode is content too: it lands in the layer
    assert cache_keys(parse_dockerfile(CACHED, BuildContext(app.root)), base)[3] != keys[3]


def test_state_in_effect_is_part_of_the_key() -> None:
    base = "sha256:" + "0" * 64
    one = cache_keys(parse_dockerfile("FROM a\nARG V=1\nRUN make\n"), base)
    two = cache_keys(parse_dockerfile("FROM a\nARG V=1\nRUN make\n", build_args={"V": "2"}), base)
    assert one[0] != two[0] and one[1] != two[1]


# -- YAML recipes -------------------------------------------------------------------------

RECIPE = """\
# wrenn's recipe was a list of shell commands; the rest makes it a template
from: debian:bookworm
steps:
  - apt-get update
  - run: ["python3", "-c", "print(1)"]
  - env: {APP_HOME: /srv/app, GREETING: hello world}
  - workdir: /srv/app
  - workdir: sub
  - copy: {src: app/, dest: ./code/, chown: "app:app", chmod: "640"}
  - copy: {src: [requirements.txt], dest: /tmp/}
  - user: app
start: [python3, main.py]
healthcheck: curl -f http://localhost:8080/
"""

SAME_AS_RECIPE = """\
FROM debian:bookworm
RUN apt-get update
RUN ["python3", "-c", "print(1)"]
ENV APP_HOME=/srv/app GREETING="hello world"
WORKDIR /srv/app
WORKDIR sub
COPY --chown=app:app --chmod=640 app/ ./code/
COPY requirements.txt /tmp/
USER app
CMD ["python3", "main.py"]
HEALTHCHECK CMD curl -f http://localhost:8080/
"""


def test_recipe_compiles_to_the_dockerfile_plan(app: BuildContext) -> None:
    recipe = parse_recipe(RECIPE, app)
    dockerfile = parse_dockerfile(SAME_AS_RECIPE, app)
    assert recipe.base == dockerfile.base == Base("image", "debian:bookworm")

    def shape(plan: BuildPlan) -> list[tuple[str, tuple[str, ...], tuple[object, ...]]]:
        # HEALTHCHECK's --chmod spelling differs ("640" vs "0640"); the mode is what counts.
        return sorted((s.kind, s.args, tuple(s.files)) for s in plan.steps)

    assert shape(recipe) == shape(dockerfile)
    assert recipe.metadata == dockerfile.metadata
    assert [s.line for s in recipe.steps] == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "from: a\nsteps:\n  - run: x\n  - frobnicate: y\n",
            "recipe line 4: unknown step 'frobnicate'",
        ),
        ("from: a\nsteps:\n  - {run: x, user: y}\n", "recipe line 3: a step is a shell command"),
        ("from: a\nsteps:\n  - copy: {src: a}\n", "recipe line 3: copy takes"),
        (
            "from: a\nsteps:\n  - copy: {src: a, dest: /a}\n",
            "recipe line 3: copy needs a build context",
        ),
        ("from: a\nsteps:\n  - env: {1X: y}\n", "recipe line 3: env name '1X'"),
        ("from: a\nsteps:\n  - workdir: ''\n", "recipe line 3: workdir takes one string"),
        ("from: a\nsteps:\n  - env: {A: [1]}\n", "recipe line 3: env values are strings"),
        (
            "from: a\nsteps:\n  - copy: {src: [], dest: /x}\n",
            "recipe line 3: copy src names nothing",
        ),
        ("from: a\nsteps:\n  - copy: {src: a, dest: /x, chmod: 0755}\n", 'quote it: "0755"'),
        ("from: a\nready: x\nhealthcheck: y\n", "not both"),
        ("from: a\nsteps:\n  - run: [1, 2]\n", "recipe line 3: run is a shell command"),
        ("from: a\n\nstart: 5\n", "recipe line 3: start is a shell command"),
        ("from: a\nsteps: run\n", "recipe line 2: `steps` is a list"),
        ("steps: []\n", "no base"),
        ("from: a\ntemplate: b\n", "not both"),
        ("from: a\nstep: []\n", "unknown key 'step'"),
        ("- apt-get update\n", "a recipe is a mapping"),
        ("from: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_their_line(text: str, words: str) -> None:
    with pytest.raises(InvalidBuild) as info:
        parse_recipe(text)
    assert words in str(info.value)


def test_recipe_from_a_template() -> None:
    plan = parse_recipe("template: python\nsteps:\n  - pip install flask\n")
    assert plan.base == Base("template", "python")
    assert _kinds(plan) == [("run", (*SH, "pip install flask"))]


# -- E2B's Template builder ---------------------------------------------------------------
# Each dict is what E2B's Python SDK sends (TemplateBase.to_json) for the builder calls in
# the comment, taken from E2B's docs and packages/python-sdk/tests/*/template_sync; the
# dicts were checked equal to the output of the real SDK (e2b 2.63.0, run outside the suite).

APT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes "
    "apt-get install -y --no-install-recommends git curl"
)


def test_e2b_builder_calls() -> None:
    # Template().from_image("python:3.12", username="u", password="hunter2")
    #   .apt_install(["git", "curl"], no_install_recommends=True)
    #   .pip_install(["numpy", "pandas"]).npm_install("typescript", g=True)
    #   .run_cmd(["echo a", "echo b"]).set_envs({"NODE_ENV": "production", "PORT": "8080"})
    #   .set_workdir("/app").set_user("user").make_dir("/app/data")
    #   .skip_cache().run_cmd("date")
    #   .set_start_cmd("python -m http.server 8000", wait_for_port(8000))
    template = {
        "fromImage": "python:3.12",
        "fromImageRegistry": {"type": "registry", "username": "u", "password": "hunter2"},
        "force": False,
        "steps": [
            {"type": "RUN", "args": [APT, "root"], "force": False},
            {"type": "RUN", "args": ["pip install numpy pandas", "root"], "force": False},
            {"type": "RUN", "args": ["npm install -g typescript", "root"], "force": False},
            {"type": "RUN", "args": ["echo a && echo b"], "force": False},
            {"type": "ENV", "args": ["NODE_ENV", "production", "PORT", "8080"], "force": False},
            {"type": "WORKDIR", "args": ["/app"], "force": False},
            {"type": "USER", "args": ["user"], "force": False},
            {"type": "RUN", "args": ["mkdir -p /app/data"], "force": False},
            {"type": "RUN", "args": ["date"], "force": True},
        ],
        "startCmd": "python -m http.server 8000",
        "readyCmd": '[ -n "$(ss -Htuln sport = :8000)" ]',
    }
    plan = parse_e2b_template(template)
    assert plan.base == Base("image", "python:3.12", "u", "hunter2")
    assert "hunter2" not in repr(plan.base)  # the password stays out of logs
    assert _kinds(plan)[:3] == [
        ("run", (*SH, APT)),
        ("run", (*SH, "pip install numpy pandas")),
        ("run", (*SH, "npm install -g typescript")),
    ]
    assert plan.steps[0].option("user") == "root" and plan.steps[3].option("user") is None
    assert [s.no_cache for s in plan.steps] == [False] * 8 + [True, False, False]
    meta = plan.metadata
    assert meta.env == {"NODE_ENV": "production", "PORT": "8080"}
    assert (meta.workdir, meta.user) == ("/app", "user")
    assert meta.start == (*SH, "python -m http.server 8000")
    assert meta.ready == (*SH, '[ -n "$(ss -Htuln sport = :8000)" ]')
    assert [s.line for s in plan.steps[:9]] == list(range(1, 10))


def test_e2b_copy_with_its_test_folder(tmp_path: Path) -> None:
    # E2B's test_build_template: a folder with a relative, an absolute (inside) and a
    # dangling symlink; Template(file_context_path=...).from_base_image()
    #   .copy("folder/*", "folder", force_upload=True).run_cmd("cat folder/test.txt")
    #   .set_workdir("/app").set_start_cmd("echo 'Hello, world!'", wait_for_timeout(10_000))
    _files(tmp_path, {"folder/test.txt": "This is a test file."})
    os.symlink("test.txt", tmp_path / "folder/symlink.txt")
    os.symlink(tmp_path / "folder/test.txt", tmp_path / "folder/symlink2.txt")
    os.symlink("12345test.txt", tmp_path / "folder/symlink3.txt")
    template = {
        "fromImage": "e2bdev/base",
        "force": False,
        "steps": [
            {
                "type": "COPY",
                "args": ["folder/*", "folder", "", ""],
                "force": True,
                "forceUpload": True,
                "filesHash": "85685f9cf458664363b5106f969899bd1c5136639ea5be861fbedf5640b0ac52",
            },
            {"type": "RUN", "args": ["cat folder/test.txt"], "force": False},
            {"type": "WORKDIR", "args": ["/app"], "force": False},
        ],
        "startCmd": "echo 'Hello, world!'",
        "readyCmd": "sleep 10",
    }
    with_context = parse_e2b_template(template, BuildContext(tmp_path))
    copy = with_context.steps[0]
    assert copy.no_cache
    # E2B copies symlinks as links (it does not resolve them by default), dangling or not.
    assert [(f.dest, f.kind, f.target) for f in copy.files] == [
        ("/folder/symlink.txt", "symlink", "test.txt"),
        ("/folder/symlink2.txt", "symlink", str(tmp_path / "folder/test.txt")),
        ("/folder/symlink3.txt", "symlink", "12345test.txt"),
        ("/folder/test.txt", "file", ""),
    ]
    assert with_context.metadata.ready == (*SH, "sleep 10")
    without = parse_e2b_template(template)  # the files come in E2B's upload instead
    assert without.steps[0].args == ("folder/*", "/folder")
    assert (
        without.steps[0].option("files_hash")
        == "85685f9cf458664363b5106f969899bd1c5136639ea5be861fbedf5640b0ac52"
    )


def test_e2b_from_template_and_copy_options(tmp_path: Path) -> None:
    # Template().from_template("base").copy("app.py", "/home/user/", user="user", mode=0o755)
    ctx = _files(tmp_path, {"app.py": "print(1)\n"})
    template = {
        "fromTemplate": "base",
        "steps": [
            {"type": "COPY", "args": ["app.py", "/home/user/", "user", "0755"], "force": False}
        ],
    }
    plan = parse_e2b_template(template, ctx)
    assert plan.base == Base("template", "base")
    (copy,) = plan.steps
    assert copy.options == (("chmod", "0755"), ("chown", "user"))
    assert [(f.dest, f.mode) for f in copy.files] == [("/home/user/app.py", 0o755)]


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ({"steps": []}, "no base; start with from_image"),
        ({"fromImage": "a", "fromTemplate": "b"}, "not both"),
        ({"fromImage": "a", "fromImageRegistry": {"type": "aws"}}, "'aws' is not supported"),
        (
            {"fromImage": "a", "steps": [{"type": "HEALTHCHECK", "args": ["x"]}]},
            "step 1: HEALTHCHECK",
        ),
        ({"fromImage": "a", "steps": [{"type": "RUN", "args": []}]}, "step 1: RUN"),
        ({"fromImage": "a", "steps": [{"type": "ENV", "args": ["A"]}]}, "step 1: ENV"),
        (
            {"fromImage": "a", "steps": [{"type": "COPY", "args": ["x", "/x"]}]},
            "needs a build context",
        ),
        ({"fromImage": "a", "steps": ["RUN x"]}, "step 1: a step is {type, args}"),
        ({"fromImage": "a", "steps": 5}, "steps is a list"),
        ({"fromImage": 5}, "fromImage is a string"),
        ({"fromImage": "a", "fromImageRegistry": "x"}, "'x' is not supported"),
    ],
)
def test_bad_e2b_templates(template: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidBuild) as info:
        parse_e2b_template(template)
    assert words in str(info.value)


def test_step_describe() -> None:
    assert BuildStep("workdir", ("/app",), 3).describe() == "WORKDIR /app"


def test_ignore_everything_but_one_directory(tmp_path: Path) -> None:
    ctx = _files(tmp_path, {".dockerignore": "*\n!src\n", "src/a.py": "", "secret.txt": ""})
    plan = parse_dockerfile("FROM a\nCOPY . /app/\n", ctx)
    assert [f.dest for f in plan.steps[0].files] == ["/app", "/app/src", "/app/src/a.py"]


def test_dockerignore_leading_out_of_the_context_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "rules").write_text("*\n")
    (tmp_path / "ctx").mkdir()
    os.symlink(outside / "rules", tmp_path / "ctx/.dockerignore")
    with pytest.raises(InvalidBuild, match="leads out of the build context"):
        BuildContext(tmp_path / "ctx")
    with pytest.raises(InvalidBuild, match="is not a directory"):
        BuildContext(tmp_path / "nowhere")


def test_args_before_from_see_each_other() -> None:
    plan = parse_dockerfile("ARG REPO=library\nARG IMAGE=$REPO/debian\nFROM $IMAGE:12\n")
    assert plan.base == Base("image", "library/debian:12")


def test_copy_to_dot_goes_into_the_workdir(tmp_path: Path) -> None:
    ctx = _files(tmp_path, {"requirements.txt": "flask\n", "a.py": "", "b.py": ""})
    text = "FROM a\nWORKDIR /app\nCOPY requirements.txt .\nCOPY *.py .\nRUN\tpip install x\n"
    plan = parse_dockerfile(text, ctx)
    assert [f.dest for f in plan.steps[1].files] == ["/app/requirements.txt"]
    assert [f.dest for f in plan.steps[2].files] == ["/app/a.py", "/app/b.py"]
    assert plan.steps[3].args == (*SH, "pip install x")  # a tab separates words too


def test_mangled_files_fail_only_with_invalid_build(app: BuildContext) -> None:
    """Seeded mutations of the files above (syntax characters inserted, deleted, replaced):
    each parses or is refused with InvalidBuild, never another exception."""
    rng = random.Random(13)
    alphabet = [*"\\`$ {}[]\"'=:-+?#\n\t/*.<>", "${", "\\\n", "--", "ARG ", "COPY ", "- "]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        source = rng.choice([EVERY_INSTRUCTION, SAME_AS_RECIPE, RECIPE])
        chars = list(source)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(chars))
            roll = rng.random()
            if roll < 0.4:
                del chars[at]
            elif roll < 0.8:
                chars.insert(at, rng.choice(alphabet))
            else:
                chars[at] = rng.choice(alphabet)
        text = "".join(chars)
        try:
            if source is RECIPE:
                parse_recipe(text, app)
            else:
                parse_dockerfile(
                    text, app, {"VERSION": "2"} if source is EVERY_INSTRUCTION else None
                )
            outcomes["parsed"] += 1
        except InvalidBuild:
            outcomes["refused"] += 1
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100  # both paths were taken


def test_a_context_too_deep_for_a_layer_is_refused(tmp_path: Path) -> None:
    # Past the layer store's depth limit (and pytest can still remove it: < ~1000).
    os.makedirs(tmp_path / "d" / "/".join(["x"] * 600))
    with pytest.raises(InvalidBuild, match="deeper than 512 directories"):
        parse_dockerfile("FROM a\nCOPY d /d/\n", BuildContext(tmp_path))


def test_e2b_from_dockerfile_examples(tmp_path: Path) -> None:
    # The Dockerfiles of E2B's test_from_dockerfile, through Corral's parser.
    ctx = _files(tmp_path, {"package.json": "{}", **{f"file{i}.txt": str(i) for i in (1, 2, 3)}})
    text = (
        "FROM node:24\nWORKDIR /app\nCOPY package.json .\nRUN npm install\n"
        'ENTRYPOINT ["sleep", "20"]'
    )
    plan = parse_dockerfile(text, ctx)
    assert plan.base == Base("image", "node:24")
    assert [f.dest for f in plan.steps[1].files] == ["/app/package.json"]
    assert plan.steps[2].args == (*SH, "npm install")
    assert plan.metadata.start == ("sleep", "20")
    multi = parse_dockerfile("FROM node:24\nCOPY file1.txt file2.txt file3.txt /dest/", ctx)
    assert [f.dest for f in multi.steps[0].files] == [f"/dest/file{i}.txt" for i in (1, 2, 3)]
