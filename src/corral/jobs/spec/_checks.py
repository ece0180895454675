"""The checks of a job spec's single values: each refusal names the field and says what
to use instead. Shared by the SDK (a spec is checked before it is sent) and the server, so
it imports nothing of the engine, the store or the server.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from corral.errors import InvalidLimits, InvalidRequest
from corral.limits import REQUEST_LIMITS, Limits
from corral.network.policy import NetworkPolicy

KINDS = ("command", "shell", "code", "workflow")
# A template build: only the template service submits one (`corral template build`).
BUILD_KIND = "build"
# Kinds the design has and this version does not run yet: refused by name.
LATER_KINDS = ("agent", "governed")
SHELLS = ("sh", "bash")
# Interpreter argv per language; the source file's path is appended.
LANGUAGES: dict[str, tuple[str, str]] = {
    "python": ("python3", ".py"),
    "node": ("node", ".js"),
    "bash": ("bash", ".sh"),
}
ISOLATIONS = ("auto", "namespace", "gvisor", "microvm", "process")

MAX_STEPS = 100
MAX_ARGS = 4096
MAX_TEXT = 1 << 20  # a script or source text
MAX_ENV = 256
MAX_ENV_BYTES = 64 * 1024
MAX_FILES = 256
MAX_FILES_BYTES = 6 << 20  # under the API's 8 MiB message limit
MAX_TIMEOUT = 24 * 3600
MAX_RETRIES = 20
MAX_BACKOFF = 3600.0
MAX_PRIORITY = 1000
MAX_LABELS = 64
MAX_LABEL_TEXT = 512
MAX_URL = 2048
LIMIT_FIELDS = REQUEST_LIMITS
_LABEL_KEY = re.compile(r"[ !#-\[\]-~]{1,128}")


def fail(where: str, message: str) -> InvalidRequest:
    where = where.rstrip(".")  # a step's prefix ("steps[0].") naming the step itself
    return InvalidRequest(f"{where}: {message}" if where else message)


def text(where: str, value: object, *, empty: bool = False, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise fail(where, f"must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise fail(where, "must not be empty")
    if len(value) > limit:
        raise fail(where, f"is {len(value)} characters; at most {limit}")
    if "\0" in value:
        raise fail(where, "must not contain NUL characters")
    return value


def whole(where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise fail(where, f"{value} is out of range: use {low} to {high}")
    return value


def argv_of(where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise fail(where, "must be a non-empty list of strings (argv), e.g. [python3, -V]")
    if len(value) > MAX_ARGS:
        raise fail(where, f"has {len(value)} arguments; at most {MAX_ARGS}")
    argv = tuple(text(f"{where}[{i}]", arg, empty=i > 0) for i, arg in enumerate(value))
    return argv


def strings(where: str, value: object, *, limit: int, names: bool) -> dict[str, str]:
    """A string-to-string mapping: environment (names=True) or labels/metadata."""
    if not isinstance(value, Mapping):
        raise fail(where, "must be a mapping of strings to strings")
    if len(value) > limit:
        raise fail(where, f"has {len(value)} entries; at most {limit}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool):  # YAML's `DEBUG: true` means the text "true"
            item = "true" if item else "false"
        elif isinstance(item, int | float):  # and `PORT: 8080` the text "8080"
            item = str(item)
        if not isinstance(key, str) or not isinstance(item, str):
            raise fail(where, f"entries must be strings, got {key!r}: {item!r}")
        if names:
            if not key or "=" in key or "\0" in key or "\0" in item:
                raise fail(where, f"{key!r} is not a valid variable (no '=' or NUL; not empty)")
        elif not _LABEL_KEY.fullmatch(key) or len(item) > MAX_LABEL_TEXT:
            raise fail(
                where,
                f"{key[:40]!r}: keys have 1 to 128 printable ASCII characters but no '\"' "
                f"or '\\', values at most {MAX_LABEL_TEXT} characters",
            )
        out[key] = item
    if names:
        size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in out.items())
        if size > MAX_ENV_BYTES:
            raise fail(where, f"is {size} bytes; at most {MAX_ENV_BYTES} (put data in files)")
    return out


def check_labels(value: object, where: str = "labels") -> dict[str, str]:
    """Labels (or metadata): at most 64 printable-ASCII keys with short text values."""
    return strings(where, value, limit=MAX_LABELS, names=False)


def check_fields(where: str, data: object, known: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise fail(where, f"must be a mapping, got {type(data).__name__}")
    for name in data:
        if name not in known:
            raise fail(
                where,
                f"unknown field {name!r}; the fields are {', '.join(known)}",
            )


def check_limits(value: object) -> dict[str, int | float]:
    check_fields("limits", value, LIMIT_FIELDS)
    assert isinstance(value, Mapping)
    given = {k: v for k, v in value.items() if v not in (None, 0)}
    try:
        Limits(**given)  # validates each value's type and range
    except InvalidLimits as exc:
        raise fail("limits", str(exc)) from None
    return given


def split_idempotency_key(data: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A spec mapping without its `idempotency_key`, and that key ("" when it has none).

    A spec file may carry the key beside the spec's fields, but the key belongs to the
    submit request (the same spec may be submitted under many keys), not to the spec.
    """
    spec = dict(data)
    key = spec.pop("idempotency_key", None)
    if key is None:
        return spec, ""
    if not isinstance(key, str):
        raise fail("idempotency_key", f"must be a string, got {type(key).__name__}")
    return spec, key


def optional_text(name: str, data: Mapping[str, Any], limit: int) -> str | None:
    value = data.get(name)
    return None if not value else text(name, value, limit=limit)


def choice(name: str, data: Mapping[str, Any], choices: Sequence[str]) -> str | None:
    value = optional_text(name, data, 64)
    if value is not None and value not in choices:
        raise fail(name, f"{value!r} is not supported; use one of {', '.join(choices)}")
    return value


def check_network(data: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """A spec's network mode (None when it names none: the job gets `none`) and allowlist
    entries, each in its normal form (aliases resolved)."""
    mode = optional_text("network", data, 64)
    allow = data.get("network_allow") or ()
    if isinstance(allow, str) or not isinstance(allow, Sequence):
        raise fail("network_allow", "must be a list of entries, e.g. [pypi.org, '*.x.org:443']")
    try:
        NetworkPolicy.parse(mode or "none")
    except InvalidRequest as exc:
        raise fail("network", str(exc)) from None
    try:
        policy = NetworkPolicy.parse(mode or "none", allow)
    except InvalidRequest as exc:
        raise fail("network_allow", str(exc)) from None
    return (policy.mode if mode else None), policy.entries


def check_workdir(value: object) -> str | None:
    if not value:
        return None
    path = text("workdir", value, limit=4096)
    if not path.startswith("/") or ".." in path.split("/"):
        raise fail("workdir", f"{path!r} must be an absolute path without '..'")
    return posixpath.normpath(path)


def check_backoff(value: object) -> float | None:
    if value in (None, 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("retry_backoff", f"must be a number of seconds, got {value!r}")
    if not 0 < value <= MAX_BACKOFF:
        raise fail("retry_backoff", f"{value} is out of range: use 0 to {MAX_BACKOFF:g}")
    return float(value)


def check_url(value: object) -> str | None:
    if not value:
        return None
    url = text("callback_url", value, limit=MAX_URL)
    if not url.startswith(("http://", "https://")) or len(url.split("/", 3)[2]) == 0:
        raise fail("callback_url", f"{url[:80]!r} must be an http:// or https:// URL")
    return url
