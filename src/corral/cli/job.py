"""`corral job …`: queue jobs and watch them, one SDK call (`corral.Jobs`) per subcommand.

    corral job submit -- python3 -c 'print(6 * 7)'        # an argv
    corral job submit --shell --retries 2 -- 'make && make test'
    corral job submit -f job.yaml --label ci=1 --follow    # a spec file; stream its output
    corral job logs ID -f                                  # exits with the job's exit code

A job that did not succeed makes `logs -f`, `submit --wait` and `--follow` exit with a
code for how it ended if it timed out or was canceled, else with its exit code
(`exit_code_of`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
import yaml
from rich.table import Table

from corral.cli._common import (
    EXIT_CANCELED,
    EXIT_ERROR,
    EXIT_TIMED_OUT,
    OUTPUT_OPTION,
    Output,
    _cell,
    _plain,
    connect_options,
    err,
    interruptible,
    out,
    parse_pairs,
    show,
)
from corral.client import Job, Jobs, JobSubmission
from corral.errors import InvalidRequest
from corral.jobs.spec import LANGUAGES, JobSpec, split_idempotency_key

app = typer.Typer(
    no_args_is_help=True, help="Queue jobs, follow their output, cancel or retry them."
)

JOB_COLUMNS = ("id", "state", "attempt", "exit_code", "created_at", "state_reason")
# How `job logs -f`, `submit --wait` and `--follow` exit for a job stopped from outside: its
# command was killed (137), which would look like a kill or an out-of-memory.
EXIT_FOR_STATE = {"timed_out": EXIT_TIMED_OUT, "canceled": EXIT_CANCELED}

JobId = Annotated[str, typer.Argument(help="the job's id (`corral job list`)")]


@contextmanager
def _jobs(ctx: typer.Context) -> Iterator[Jobs]:
    jobs = Jobs(**connect_options(ctx).kwargs())
    try:
        yield jobs
    finally:
        jobs.close()


def exit_code_of(job: Job) -> int:
    """0 if it succeeded; 124 timed out, 125 canceled; else its exit code, else 1."""
    if job.state == "succeeded":
        return 0
    if job.state in EXIT_FOR_STATE:
        return EXIT_FOR_STATE[job.state]
    if job.exit_code is not None and 0 < job.exit_code < 256:
        return job.exit_code
    return EXIT_FOR_STATE.get(job.state, EXIT_ERROR)


def show_job(output: Output, job: Job) -> None:
    """One job: every field as JSON, or the ones people read, one per line."""
    if output is Output.json:
        show(output, [job], (), single=True)
        return
    spec = job.spec
    work = spec.get("run") or spec.get("code") or ""
    if spec.get("command"):
        work = shlex.join(spec["command"])
    elif spec.get("steps"):
        work = f"{len(spec['steps'])} steps"
    fields: list[tuple[str, object]] = [
        ("id", job.id),
        ("state", job.state),
        ("reason", job.state_reason),
        ("attempt", f"{job.attempt} of {job.max_attempts}"),
        ("exit code", job.exit_code),
        ("kind", f"{spec.get('kind')}: {work}"),
        ("labels", spec.get("labels", {})),
        ("created", job.created_at),
        ("started", job.started_at),
        ("finished", job.finished_at),
        ("log", f"{job.log_bytes} bytes" + (" (truncated)" if job.log_truncated else "")),
    ]
    if job.state == "queued" and job.run_after is not None and job.attempt > 0:
        fields.append(("not before", job.run_after))
    if job.idempotency_key:
        fields.append(("idempotency key", job.idempotency_key))
    if job.callback is not None:
        c = job.callback
        status = f"{c.delivered} delivered, {c.pending} pending, {c.failed} failed"
        fields.append(("callback", f"{c.url} ({status}) {c.last_error}".rstrip()))
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in fields:
        table.add_row(name, _cell(value))
    out.print(table)


# -- submit --------------------------------------------------------------------------------


def read_spec(source: str) -> dict[str, Any]:
    """The spec mapping in a YAML or JSON file (`-`: stdin)."""
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise InvalidRequest(f"cannot read the job spec {name}: {reason}") from None
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise InvalidRequest(f"{name} is not valid JSON: {where}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"{name} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"{name} must hold a mapping of job spec fields (kind, command, run, steps, …); "
            "see the Jobs section of the README"
        )
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = " ".join(filter(None, (exc.context, exc.problem)))
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def _inline_spec(command: list[str], shell: bool, code: str | None) -> dict[str, Any]:
    if shell and code:
        raise InvalidRequest("--shell and --code are two kinds of job: give one")
    if not command:
        raise InvalidRequest(
            "say what to run: `corral job submit -- CMD ARGS…`, `--shell -- 'SCRIPT'`, "
            "`--code python -- 'SOURCE'`, or `-f job.yaml`"
        )
    if shell:
        return {"kind": "shell", "run": " ".join(command)}
    if code is not None:
        if code not in LANGUAGES:
            raise InvalidRequest(f"--code {code!r}: use one of {', '.join(LANGUAGES)}")
        return {"kind": "code", "code": " ".join(command), "language": code}
    return {"kind": "command", "command": command}


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(help="after --: the command and its arguments (or script, or source)"),
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="a YAML or JSON spec; - reads stdin")
    ] = None,
    shell: Annotated[bool, typer.Option("--shell", help="COMMAND is a sh script")] = False,
    code: Annotated[
        str | None, typer.Option("--code", metavar="LANG", help="COMMAND is source in LANG")
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    timeout: Annotated[int | None, typer.Option(help="seconds for the whole job")] = None,
    retries: Annotated[int | None, typer.Option(help="extra attempts after a failure")] = None,
    template: Annotated[str | None, typer.Option(help="the sandbox's template")] = None,
    isolation: Annotated[str | None, typer.Option(help="auto, namespace, …")] = None,
    priority: Annotated[
        int | None, typer.Option(help="higher runs first, among the team's own jobs")
    ] = None,
    idempotency_key: Annotated[
        str, typer.Option(help="submitting the same key again returns the first job")
    ] = "",
    callback_url: Annotated[
        str | None, typer.Option(help="POST the job's events here, signed")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the end; exit with its code")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-F", help="stream its output; exit with its code")
    ] = False,
    output: Output = OUTPUT_OPTION,
) -> None:
    """Queue a job from a spec file (-f) or from the command after --.

    Options given with -f add to the file's fields (labels, env) or replace them.
    """
    command = command or []
    if command[:1] == ["--"]:
        command = command[1:]
    if file is not None:
        if command or shell or code is not None:
            raise InvalidRequest("give either -f FILE or a command after --, not both")
        spec = read_spec(file)
    else:
        spec = _inline_spec(command, shell, code)
    for name, pairs in (("labels", parse_pairs(label, "--label")), ("env", parse_pairs(env, "-e"))):
        if pairs:
            given = spec.get(name)
            spec[name] = {**(given if isinstance(given, dict) else {}), **pairs}
    options = {
        "timeout": timeout,
        "retries": retries,
        "template": template,
        "isolation": isolation,
        "priority": priority,
        "callback_url": callback_url,
        "idempotency_key": idempotency_key or None,
    }
    spec.update({k: v for k, v in options.items() if v is not None})
    if file is not None:
        try:  # the SDK checks it too; here the error can name the file
            JobSpec.from_dict(split_idempotency_key(spec)[0])
        except InvalidRequest as exc:
            raise InvalidRequest(f"{'stdin' if file == '-' else file}: {exc}") from None
    with _jobs(ctx) as jobs:
        submission = jobs.submit(spec)  # its idempotency_key goes with the request
        job = submission.job
        if follow:
            err.print(f"job {job.id} {'queued' if submission.created else 'already submitted'}")
            _secret(submission, output, to_stderr=True)
            with interruptible():
                _print_logs(jobs, job.id, 0, follow=True)
                job = jobs.get(job.id)
            raise typer.Exit(exit_code_of(job))
        if wait:
            with interruptible():
                job = jobs.wait(job.id)
            submission = JobSubmission(job, submission.callback_secret, submission.created)
    if output is Output.json:
        show(output, [submission], (), single=True)
    else:
        show_job(output, job)
        _secret(submission, output, to_stderr=False)
    if wait:
        raise typer.Exit(exit_code_of(job))


def _secret(submission: JobSubmission, output: Output, *, to_stderr: bool) -> None:
    if submission.callback_secret and (output is Output.table or to_stderr):
        console = err if to_stderr else out
        console.print(f"callback secret: {submission.callback_secret}", soft_wrap=True)


# -- reading -------------------------------------------------------------------------------


@app.command()
def get(ctx: typer.Context, job_id: JobId, output: Output = OUTPUT_OPTION) -> None:
    """One job, whatever its state."""
    with _jobs(ctx) as jobs:
        show_job(output, jobs.get(job_id))


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option(help="queued, running, succeeded, failed, timed_out, canceled or lost"),
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE")] = None,
    template: Annotated[str, typer.Option(help="only jobs of this template")] = "",
    limit: Annotated[int, typer.Option(help="at most this many, newest first; 0: all")] = 100,
    output: Output = OUTPUT_OPTION,
) -> None:
    """Your team's jobs, newest first."""
    if limit < 0:
        raise InvalidRequest(f"--limit {limit}: use a number of jobs, or 0 for all")
    with _jobs(ctx) as jobs:
        found = jobs.list(
            states=state or (),
            labels=parse_pairs(label, "--label"),
            template=template,
            page_size=min(limit, 1000) if limit else 1000,
        )
        rows = list(islice(found, limit or None))
    show(output, rows, JOB_COLUMNS)


def _print_logs(jobs: Jobs, job_id: str, offset: int, *, follow: bool) -> None:
    sinks: dict[str, BinaryIO] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    for chunk in jobs.logs(job_id, offset=offset, follow=follow):
        sink = sinks[chunk.stream]
        sink.write(chunk.data)
        sink.flush()


@app.command()
def logs(
    ctx: typer.Context,
    job_id: JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="until the job ends; exit with its code")
    ] = False,
    offset: Annotated[int, typer.Option(help="the first chunk: 0, or a chunk's seq + 1")] = 0,
) -> None:
    """A job's output as it was written: stdout to stdout, stderr to stderr."""
    with _jobs(ctx) as jobs, interruptible():
        _print_logs(jobs, job_id, offset, follow=follow)
        if follow:
            raise typer.Exit(exit_code_of(jobs.get(job_id)))


@app.command()
def events(
    ctx: typer.Context,
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="until the job ends")] = False,
    offset: Annotated[int, typer.Option(help="the first event: 0, or an event's seq + 1")] = 0,
    output: Output = OUTPUT_OPTION,
) -> None:
    """A job's state changes and workflow steps, one line each (JSON lines with -o json)."""
    with _jobs(ctx) as jobs, interruptible():
        for event in jobs.events(job_id, offset=offset, follow=follow):
            if output is Output.json:
                line = json.dumps(_plain(event))
            else:
                at = event.at.strftime("%H:%M:%S.%f")[:-3] if event.at else "-"
                what = f"{event.type} {event.state}" if event.state else event.type
                data = " ".join(f"{k}={v}" for k, v in event.data.items())
                line = f"{event.seq:>4}  {at}  #{event.attempt}  {what}: {event.reason}  {data}"
            sys.stdout.write(line.rstrip() + "\n")
            sys.stdout.flush()


# -- changing ------------------------------------------------------------------------------


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: JobId,
    reason: Annotated[str, typer.Option(help="recorded as the job's state reason")] = "",
    output: Output = OUTPUT_OPTION,
) -> None:
    """Stop a queued or running job; its processes and sandbox are killed."""
    with _jobs(ctx) as jobs:
        show_job(output, jobs.cancel(job_id, reason))


@app.command()
def retry(ctx: typer.Context, job_id: JobId, output: Output = OUTPUT_OPTION) -> None:
    """Queue a finished job again (failed, timed out, canceled, lost, or succeeded)."""
    with _jobs(ctx) as jobs:
        show_job(output, jobs.retry(job_id))
