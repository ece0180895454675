"""A job's spec: what to run (its workload) and where (its sandbox), validated strictly.

The same spec arrives three ways: as a JobSpec message (the API), as a mapping read from
YAML or JSON (`corral job submit -f job.yaml`), and as JSON from the store. Each goes
through `JobSpec.from_dict` or `JobSpec.from_proto`, which refuse unknown fields, naming
them, and bad values, saying what to use instead.

The SDK checks a spec before it sends it and the server checks it again, so this package
is shared by both sides: it imports nothing of the engine, the store or the server (an
import-linter contract in pyproject.toml holds it to that), and `from corral import Jobs`
stays light.

    _checks.py  the checks of single values, and the bounds they hold to
    _model.py   Workload, Step, JobFile, JobSpec, and JobSpec.from_dict
    _wire.py    the JSON-able mapping and the API message, both ways

    kind: workflow                      # command | shell | code | workflow
    template: host
    timeout: 300
    steps:
      - run: echo building              # a shell script
      - name: test
        command: [python3, -m, pytest]  # argv
        timeout: 120
      - code: print("hello")
        language: python
        continue_on_error: true
"""

from corral.jobs.spec._checks import (
    BUILD_KIND,
    KINDS,
    LANGUAGES,
    MAX_ENV,
    MAX_RETRIES,
    MAX_TIMEOUT,
    check_labels,
    split_idempotency_key,
)
from corral.jobs.spec._model import JobFile, JobSpec, Step, Workload
from corral.jobs.spec._wire import proto_to_dict

__all__ = [
    "BUILD_KIND",
    "KINDS",
    "LANGUAGES",
    "MAX_ENV",
    "MAX_RETRIES",
    "MAX_TIMEOUT",
    "JobFile",
    "JobSpec",
    "Step",
    "Workload",
    "check_labels",
    "proto_to_dict",
    "split_idempotency_key",
]
