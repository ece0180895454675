"""What a vm is (`corral vm`, the Agent/krunvm seed): its name, language, limits, network,
persist choice and isolation tier, checked the same way by the SDK, the CLI and the server.

A vm runs as a sandbox of its team's language template `lang-<language>` (a Debian base
with the language's packages, `corral.images.languages`), with its volume `vm-<name>` at
/persist when it persists, and the exchange directories /in (files `vm run --file`
uploads) and /out (files `vm run --out DIR` downloads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.errors import InvalidRequest
from corral.images.languages import LANGUAGES, LanguageBase, language_base
from corral.limits import Limits
from corral.network.policy import NetworkPolicy

__all__ = ["NETWORKS", "VmSpec", "canonical_language", "check_vm_name"]

# 50 characters, so that its volume's name (`vm-<name>`) fits a volume's 63.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,49}")
# The seed's spellings of a language, beside languages.py's names.
_ALIASES = {"node": "javascript", "nodejs": "javascript", "golang": "go"}
# The seed's network choices and the policy mode each one is (issue 12's modes).
NETWORKS = {"none": "none", "allow_all": "internet"}
PERSIST_PATH = "/persist"
IN_DIR = "/in"
OUT_DIR = "/out"
DEFAULT_CPU = 1.0
DEFAULT_MEMORY_MIB = 512
DEFAULT_PERSIST_MIB = 1024


def check_vm_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"vm name {name!r} is invalid: use 1 to 50 lower-case letters, digits or '-', "
            "starting with a letter or digit (e.g. py-1)"
        )
    return name


def canonical_language(language: object) -> str:
    """languages.py's name of `language` (python, javascript, ruby, go) or its alias."""
    if not isinstance(language, str):
        raise InvalidRequest(f"language must be a string, not {type(language).__name__}")
    name = _ALIASES.get(language, language)
    if name not in LANGUAGES:
        raise InvalidRequest(
            f"no vm language {language!r}; choose one of {', '.join(LANGUAGES)} "
            f"(or {', '.join(_ALIASES)})"
        )
    return name


@dataclass(frozen=True)
class VmSpec:
    """A vm's definition, checked: a bad field raises InvalidRequest naming it."""

    name: str
    language: str
    cpu: float = DEFAULT_CPU
    memory_mib: int = DEFAULT_MEMORY_MIB
    network: str = "none"
    persist: bool = False
    persist_mib: int = DEFAULT_PERSIST_MIB
    # The tier of its sandboxes (`auto`: the server's default; the server checks the name).
    isolation: str = "auto"

    def __post_init__(self) -> None:
        check_vm_name(self.name)
        object.__setattr__(self, "language", canonical_language(self.language))
        self.limits()  # InvalidLimits for a cpu or memory out of range
        if self.network not in NETWORKS:
            raise InvalidRequest(
                f"vm network {self.network!r} is not known; use one of {', '.join(NETWORKS)}"
            )
        if not isinstance(self.persist, bool):
            raise InvalidRequest(f"persist={self.persist!r}: use True or False")
        if not isinstance(self.isolation, str) or not self.isolation:
            raise InvalidRequest(
                f"vm isolation {self.isolation!r}: name a tier (auto, namespace, gvisor, microvm)"
            )
        size = self.persist_mib
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidRequest(f"persist_mib={size!r}: give a whole number of MiB >= 1")

    @property
    def base(self) -> LanguageBase:
        return language_base(self.language)

    @property
    def template(self) -> str:
        return template_name(self.language)

    @property
    def volume(self) -> str | None:
        return volume_name(self.name) if self.persist else None

    def limits(self) -> Limits:
        return Limits(cpu=self.cpu, memory_mib=self.memory_mib)

    def network_policy(self) -> NetworkPolicy:
        return NetworkPolicy(mode=NETWORKS[self.network])


def template_name(language: str) -> str:
    """The team's template a vm of `language` runs from (built on first use)."""
    return f"lang-{language}"


def volume_name(vm: str) -> str:
    return f"vm-{vm}"
