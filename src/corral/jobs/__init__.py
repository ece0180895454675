"""Jobs: a durable queue of work that workers run in fresh sandboxes.

    spec.py      what a job is (workload + sandbox), validated from YAML, JSON or proto
    queue.py     the job service: submit, get, list, cancel, retry, logs and events
    worker.py    claims jobs with leases and heartbeats, runs them, ends them
    runner.py    one attempt of one job in one sandbox: files, steps, output, timeout
    callbacks.py signed POSTs of a job's events to its callback URL, with retries
    callback_policy.py  which callback URLs may be called: public addresses + the allowlist

Delivery is at least once: a job whose worker dies is requeued when its lease expires
and runs again from the start.
"""
