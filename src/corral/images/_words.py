"""Docker's word processing for the instructions it substitutes in (ENV, ARG, LABEL,
WORKDIR, USER, COPY, ADD, EXPOSE, STOPSIGNAL, FROM): quotes, the escape character and
`$VAR` substitution. RUN, CMD and ENTRYPOINT are not processed: their shell does it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from corral.errors import InvalidBuild

Fail = Callable[[str], InvalidBuild]
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def words(text: str, env: Mapping[str, str], escape: str, fail: Fail, *, split: bool) -> list[str]:
    """`text` as words (`split`), or as one word with its whitespace kept."""
    return _Lexer(text, env, escape, fail).words(split)


class _Lexer:
    """Docker's word processing: quotes, the escape character and variable substitution
    (`$V`, `${V}`, `${V:-word}`, `${V-word}`, `${V:+word}`, `${V+word}`, `${V:?msg}`);
    an unset variable is empty; substituted values are never split into more words."""

    def __init__(self, text: str, env: Mapping[str, str], escape: str, fail: Fail) -> None:
        self.text, self.env, self.escape, self.fail = text, env, escape, fail
        self.i = 0

    def words(self, split: bool) -> list[str]:
        words: list[str] = []
        cur: list[str] | None = None
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if split and c.isspace():
                if cur is not None:
                    words.append("".join(cur))
                    cur = None
                self.i += 1
                continue
            cur = [] if cur is None else cur
            if c == self.escape and self.i + 1 < len(text):
                cur.append(text[self.i + 1])
                self.i += 2
            elif c == "'":
                end = text.find("'", self.i + 1)
                if end < 0:
                    raise self.fail("a ' quote is not closed")
                cur.append(text[self.i + 1 : end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                self.double_quoted(cur)
            elif c == "$":
                cur.append(self.dollar())
            else:
                cur.append(c)
                self.i += 1
        if cur is not None:
            words.append("".join(cur))
        return words

    def double_quoted(self, cur: list[str]) -> None:
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c == '"':
                self.i += 1
                return
            if (
                c == self.escape
                and self.i + 1 < len(text)
                and text[self.i + 1] in ('"', "$", self.escape)
            ):
                cur.append(text[self.i + 1])
                self.i += 2
            elif c == "$":
                cur.append(self.dollar())
            else:
                cur.append(c)
                self.i += 1
        raise self.fail('a " quote is not closed')

    def dollar(self) -> str:
        text, start = self.text, self.i
        if text.startswith("${", start):
            depth, j = 1, start + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            if depth:
                raise self.fail(f"{text[start:]} has no closing }}")
            self.i = j
            return self.braced(text[start + 2 : j - 1])
        m = NAME.match(text, start + 1)
        if m is None:
            self.i += 1
            return "$"
        self.i = m.end()
        return self.env.get(m.group(), "")

    def braced(self, inner: str) -> str:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])(.*))?", inner, re.DOTALL)
        if m is None:
            raise self.fail(
                f"${{{inner}}} is not a substitution Corral knows: "
                "use ${V}, ${V:-default} or ${V:+value}",
            )
        name, op, word = m.group(1), m.group(2), m.group(3) or ""
        value = self.env.get(name)
        if op is None:
            return value or ""
        expanded = "".join(_Lexer(word, self.env, self.escape, self.fail).words(split=False))
        is_set = value is not None and (bool(value) or not op.startswith(":"))
        if op.endswith("-"):
            return value if is_set and value is not None else expanded
        if op.endswith("+"):
            return expanded if is_set else ""
        if not is_set:
            raise self.fail(f"{name}: {expanded or 'is not set'}")
        return value or ""
