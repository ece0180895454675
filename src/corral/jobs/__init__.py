"""Jobs: a durable queue of work that workers run in fresh sandboxes.

    spec/        what a job is (workload + sandbox), validated from YAML, JSON or proto
    signing.py   the signature on callbacks: `sign` here, `verify` at the receiver
    queue.py     the job service: submit, get, list, cancel, retry, logs and events
    records.py   a job as the service returns it (what the API renders)
    worker.py    claims jobs with leases and heartbeats, runs them, ends them
    runner.py    one attempt of one job in one sandbox: files, steps, output, timeout
    sandbox.py   the sandbox a job runs in (warm or one-shot) and where a worker gets it
    callbacks.py signed POSTs of a job's events to its callback URL, with retries
    callback_policy.py  which callback URLs may be called: public addresses + the allowlist

`spec/` and `signing.py` are shared with the SDK and webhook receivers, so this file
imports nothing: `from corral.jobs.spec import JobSpec` loads no engine, store or server
(the "shared" contract in pyproject.toml).

Which state a job moves to, and when (retries, lost workers, cancels), is decided by
`corral.job_lifecycle`, whose docstring draws the diagram; the state names are
`corral.states`. Delivery is at least once: a job whose worker dies is requeued when its
lease expires and runs again from the start.
"""
