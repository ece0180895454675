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

import argparse
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from corral.cli._common import (
    EXIT_CANCELED,
    EXIT_ERROR,
    EXIT_TIMED_OUT,
    add_network_options,
    add_output,
    add_pairs,
    add_volume_option,
    cell,
    command,
    connect_kwargs,
    err,
    group,
    interruptible,
    network_choice,
    out,
    parse_pairs,
    plain,
    print_table,
    show,
    whole,
    words_after_dashes,
)
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.cli._common import Commands, Parser
    from corral.client import Job, Jobs, JobSubmission

JOB_COLUMNS = ("id", "state", "attempt", "exit_code", "created_at", "state_reason")
# How `job logs -f`, `submit --wait` and `--follow` exit for a job stopped from outside: its
# command was killed (137), which would look like a kill or an out-of-memory.
EXIT_FOR_STATE = {"timed_out": EXIT_TIMED_OUT, "canceled": EXIT_CANCELED}


@contextmanager
def _jobs(args: argparse.Namespace) -> Iterator[Jobs]:
    from corral.client import Jobs

    jobs = Jobs(**connect_kwargs(args))
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


def show_job(output: str, job: Job) -> None:
    """One job: every field as JSON, or the ones people read, one per line."""
    if output == "json":
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
    print_table([[name, cell(value)] for name, value in fields])


# -- submit --------------------------------------------------------------------------------


def read_spec(source: str) -> dict[str, Any]:
    """The spec mapping in a YAML or JSON file (`-`: stdin)."""
    import yaml

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


def _yaml_problem(exc: Any) -> str:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = " ".join(filter(None, (exc.context, exc.problem)))
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def _inline_spec(command: list[str], shell: bool, code: str | None) -> dict[str, Any]:
    from corral.jobs.spec import LANGUAGES

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


def submit(args: argparse.Namespace) -> int:
    """Queue a job from a spec file (-f) or from the command after --.

    Options given with -f add to the file's fields (labels, env) or replace them.
    """
    from corral.client import JobSubmission
    from corral.jobs.spec import JobSpec, split_idempotency_key

    command, file, output = words_after_dashes(args.command), args.file, args.output
    if file is not None:
        if command or args.shell or args.code is not None:
            raise InvalidRequest("give either -f FILE or a command after --, not both")
        spec = read_spec(file)
    else:
        spec = _inline_spec(command, args.shell, args.code)
    for name, pairs in (
        ("labels", parse_pairs(args.label, "--label")),
        ("env", parse_pairs(args.env, "-e")),
    ):
        if pairs:
            given = spec.get(name)
            spec[name] = {**(given if isinstance(given, dict) else {}), **pairs}
    options = {
        "timeout": args.timeout,
        "retries": args.retries,
        "template": args.template,
        "isolation": args.isolation,
        "priority": args.priority,
        "callback_url": args.callback_url,
        "idempotency_key": args.idempotency_key or None,
    }
    spec.update({k: v for k, v in options.items() if v is not None})
    if network := network_choice(args):
        spec["network"], spec["network_allow"] = network
    if args.volume:
        in_file = spec.get("volumes")
        spec["volumes"] = [*(in_file if isinstance(in_file, list) else []), *args.volume]
    given = {"bandwidth_mbit": args.bandwidth_mbit, "connections": args.connections}
    if any(v is not None for v in given.values()):
        limits = spec.get("limits")
        limits = dict(limits) if isinstance(limits, dict) else {}
        spec["limits"] = {**limits, **{k: v for k, v in given.items() if v is not None}}
    if file is not None:
        try:  # the SDK checks it too; here the error can name the file
            JobSpec.from_dict(split_idempotency_key(spec)[0])
        except InvalidRequest as exc:
            raise InvalidRequest(f"{'stdin' if file == '-' else file}: {exc}") from None
    with _jobs(args) as jobs:
        submission = jobs.submit(spec)  # its idempotency_key goes with the request
        job = submission.job
        if args.follow:
            err(f"job {job.id} {'queued' if submission.created else 'already submitted'}")
            _secret(submission, output, to_stderr=True)
            with interruptible():
                _print_logs(jobs, job.id, 0, follow=True)
                job = jobs.get(job.id)
            return exit_code_of(job)
        if args.wait:
            with interruptible():
                job = jobs.wait(job.id)
            submission = JobSubmission(job, submission.callback_secret, submission.created)
    if output == "json":
        show(output, [submission], (), single=True)
    else:
        show_job(output, job)
        _secret(submission, output, to_stderr=False)
    return exit_code_of(job) if args.wait else 0


def _secret(submission: JobSubmission, output: str, *, to_stderr: bool) -> None:
    if submission.callback_secret and (output == "table" or to_stderr):
        (err if to_stderr else out)(f"callback secret: {submission.callback_secret}")


# -- reading -------------------------------------------------------------------------------


def get(args: argparse.Namespace) -> None:
    """One job, whatever its state."""
    with _jobs(args) as jobs:
        show_job(args.output, jobs.get(args.job_id))


def list_(args: argparse.Namespace) -> None:
    """Your team's jobs, newest first."""
    limit = args.limit
    with _jobs(args) as jobs:
        found = jobs.list(
            states=args.state,
            labels=parse_pairs(args.label, "--label"),
            template=args.template,
            page_size=min(limit, 1000) if limit else 1000,
        )
        rows = list(islice(found, limit or None))
    show(args.output, rows, JOB_COLUMNS)


def _print_logs(jobs: Jobs, job_id: str, offset: int, *, follow: bool) -> None:
    sinks: dict[str, BinaryIO] = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    for chunk in jobs.logs(job_id, offset=offset, follow=follow):
        sink = sinks[chunk.stream]
        sink.write(chunk.data)
        sink.flush()


def logs(args: argparse.Namespace) -> int:
    """A job's output as it was written: stdout to stdout, stderr to stderr."""
    with _jobs(args) as jobs, interruptible():
        _print_logs(jobs, args.job_id, args.offset, follow=args.follow)
        return exit_code_of(jobs.get(args.job_id)) if args.follow else 0


def events(args: argparse.Namespace) -> None:
    """A job's state changes and workflow steps, one line each (JSON lines with -o json)."""
    with _jobs(args) as jobs, interruptible():
        for event in jobs.events(args.job_id, offset=args.offset, follow=args.follow):
            if args.output == "json":
                line = json.dumps(plain(event))
            else:
                at = event.at.strftime("%H:%M:%S.%f")[:-3] if event.at else "-"
                what = f"{event.type} {event.state}" if event.state else event.type
                # A network event's reason already says what its data holds.
                shown = {} if event.type == "network" else event.data
                data = " ".join(f"{k}={v}" for k, v in shown.items())
                line = f"{event.seq:>4}  {at}  #{event.attempt}  {what}: {event.reason}  {data}"
            sys.stdout.write(line.rstrip() + "\n")
            sys.stdout.flush()


# -- changing ------------------------------------------------------------------------------


def cancel(args: argparse.Namespace) -> None:
    """Stop a queued or running job; its processes and sandbox are killed."""
    with _jobs(args) as jobs:
        show_job(args.output, jobs.cancel(args.job_id, args.reason))


def retry(args: argparse.Namespace) -> None:
    """Queue a finished job again (failed, timed out, canceled, lost, or succeeded)."""
    with _jobs(args) as jobs:
        show_job(args.output, jobs.retry(args.job_id))


def add_commands(commands: Commands) -> None:
    sub = group(commands, "job", "Queue jobs, follow their output, cancel or retry them.")

    def with_id(name: str, handler: Any) -> Parser:
        p = command(sub, name, handler)
        p.add_argument("job_id", metavar="ID", help="the job's id (`corral job list`)")
        return p

    p = command(sub, "submit", submit)
    p.add_argument("-f", "--file", help="a YAML or JSON spec; - reads stdin")
    p.add_argument("--shell", action="store_true", help="COMMAND is a sh script")
    p.add_argument("--code", metavar="LANG", help="COMMAND is source in LANG")
    add_pairs(p, "-l", "--label", help="a label of the job; repeatable")
    add_pairs(p, "-e", "--env", help="an environment variable; repeatable")
    p.add_argument("--timeout", type=whole(1), help="seconds for the whole job")
    p.add_argument("--retries", type=whole(0), help="extra attempts after a failure")
    p.add_argument("--template", help="the sandbox's template")
    p.add_argument("--isolation", help="auto, namespace, …")
    add_network_options(p, env=False)
    add_volume_option(p)
    p.add_argument("--priority", type=whole(), help="higher runs first, among the team's own jobs")
    p.add_argument(
        "--idempotency-key", default="", help="submitting the same key again returns the first job"
    )
    p.add_argument("--callback-url", help="POST the job's events here, signed")
    p.add_argument("--wait", action="store_true", help="wait for the end; exit with its code")
    p.add_argument(
        "-F", "--follow", action="store_true", help="stream its output; exit with its code"
    )
    add_output(p)
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="after --: the command and its arguments (or script, or source)",
    )

    add_output(with_id("get", get))

    p = command(sub, "list", list_)
    p.add_argument(
        "--state",
        action="append",
        default=[],
        help="queued, running, succeeded, failed, timed_out, canceled or lost; repeatable",
    )
    add_pairs(p, "-l", "--label", help="KEY=VALUE: only jobs with it; repeatable")
    p.add_argument("--template", default="", help="only jobs of this template")
    p.add_argument(
        "--limit", type=whole(0), default=100, help="at most this many, newest first; 0: all"
    )
    add_output(p)

    p = with_id("logs", logs)
    p.add_argument(
        "-f", "--follow", action="store_true", help="until the job ends; exit with its code"
    )
    p.add_argument(
        "--offset", type=whole(0), default=0, help="the first chunk: 0, or a chunk's seq + 1"
    )

    p = with_id("events", events)
    p.add_argument("-f", "--follow", action="store_true", help="until the job ends")
    p.add_argument(
        "--offset", type=whole(0), default=0, help="the first event: 0, or an event's seq + 1"
    )
    add_output(p)

    p = with_id("cancel", cancel)
    p.add_argument("--reason", default="", help="recorded as the job's state reason")
    add_output(p)
    add_output(with_id("retry", retry))
