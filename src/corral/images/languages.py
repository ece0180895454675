"""Language bases: which Debian packages make the root filesystem of a language's template
(`corral vm create --language ...`, DESIGN's `python`, `node`, `ruby`, `go` templates), and
a command that proves one works.

Data only: `corral.images.debian.bootstrap_layer(..., include=base.packages)` makes the
layer. The packages are Debian's own (bookworm: Python 3.11, Node.js 18, Ruby 3.1, Go
1.19), so a base builds offline from a local mirror holding them
(scripts/debian_archive.sh lists them for the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.errors import InvalidRequest

__all__ = ["LANGUAGES", "LanguageBase", "language_base"]


@dataclass(frozen=True)
class LanguageBase:
    """A language's base: the packages to install over Debian's `apt` variant, and a
    command (run by `sh -c` in a sandbox of it, cwd writable) that prints `hello`."""

    name: str
    packages: tuple[str, ...]
    hello: str


LANGUAGES: dict[str, LanguageBase] = {
    base.name: base
    for base in (
        LanguageBase("python", ("python3",), "python3 -c 'print(\"hello\")'"),
        LanguageBase("javascript", ("nodejs",), "node -e 'console.log(\"hello\")'"),
        LanguageBase("ruby", ("ruby",), "ruby -e 'puts \"hello\"'"),
        # `go run` builds first: its cache goes under $HOME, which a sandbox may write.
        LanguageBase(
            "go",
            ("golang-go",),
            'printf \'package main\\nimport "fmt"\\nfunc main() { fmt.Println("hello") }\\n\''
            " > hello.go && go run hello.go",
        ),
    )
}


def language_base(name: str) -> LanguageBase:
    try:
        return LANGUAGES[name]
    except KeyError:
        raise InvalidRequest(
            f"no base for the language {name!r}; choose one of {', '.join(LANGUAGES)}"
        ) from None
