"""A build context: the directory whose files COPY and ADD may put into an image.

It reads the context and nothing else: `.dockerignore` (Docker's rules: `*`, `?`, `[..]`,
`**`, `!` exceptions, a pattern also excluding what is under a matched directory), source
globs (Go's `filepath.Match`: `*` stops at `/`), and each copied file's content digest.
A path that leads out of the context through a symlink is refused wherever it appears:
a build reads only what its author put in the context. Symlinks that stay inside are
copied as symlinks, except a source named by the step itself, which is followed (Docker).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from corral.errors import InvalidBuild
from corral.images._archive import MAX_DEPTH, MAX_PATH_BYTES
from corral.images._steps import ContextFile

_MAGIC = re.compile(r"[*?\[]")
# Docker extracts what these start with; anything else ADD copies as a file.
_ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    exception: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            negate = body[:1] in ("^", "!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _rules(text: str) -> list[_Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if exception else line).lstrip("/")
        if pattern in ("", "."):
            continue
        rules.append(_Rule(_pattern_regex(pattern), exception))
    return rules


class BuildContext:
    """The files a build may copy, rooted at `root`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise InvalidBuild(f"the build context {root} is not a directory")
        ignore = self.root / ".dockerignore"
        self._rules: list[_Rule] = []
        if os.path.lexists(ignore):
            real = self._inside(".dockerignore", ".dockerignore")
            if not real.is_file():
                raise InvalidBuild(".dockerignore is not a file; make it a text file of patterns")
            self._rules = _rules(real.read_text())
        self._has_exceptions = any(r.exception for r in self._rules)

    def ignored(self, rel: str) -> bool:
        """Whether `.dockerignore` excludes `rel` (or a directory above it); never the
        context itself (`*` then `!src` still lets `COPY . /app` copy src)."""
        if rel == ".":
            return False
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for rule in self._rules:
            if any(rule.regex.fullmatch(p) for p in prefixes):
                excluded = not rule.exception
        return excluded

    def match(self, source: str, where: str) -> list[str]:
        """The context paths a COPY source names (a glob may name several), sorted."""
        clean = posixpath.normpath("/" + source).lstrip("/") or "."
        if posixpath.normpath(source).split("/")[0] == "..":
            raise InvalidBuild(
                f"{where}: {source} is outside the build context; "
                "a build copies only files inside the context directory"
            )
        if clean == ".":
            return ["."]
        found = [""]
        for part in clean.split("/"):
            nxt: list[str] = []
            for parent in found:
                if _MAGIC.search(part):
                    here = self._inside(parent or ".", where)
                    if here.is_dir():
                        names = sorted(n for n in os.listdir(here) if fnmatchcase(n, part))
                        nxt.extend(posixpath.join(parent, n) for n in names)
                elif os.path.lexists(self.root / parent / part):
                    nxt.append(posixpath.join(parent, part))
            found = nxt
        kept = [p for p in found if not self.ignored(p)]
        if not kept:
            raise InvalidBuild(
                f"{where}: {source} names no file in the build context"
                + (" (.dockerignore excludes what it names)" if found else "")
            )
        return kept

    def files(
        self,
        rel: str,
        dest: str,
        *,
        into_dir: bool,
        chmod: int | None,
        where: str,
        follow: bool = True,
    ) -> list[ContextFile]:
        """What copying `rel` to `dest` puts in the image: a file goes to `dest` (or into
        it when `into_dir`), a directory's contents go into `dest`. A symlink `rel` is
        followed when `follow` (Docker), else copied as a link (E2B's default)."""
        real = self._inside(rel, where)
        target = posixpath.join(dest, posixpath.basename(rel)) if into_dir else dest
        if not follow and (self.root / rel).is_symlink():
            return [self._entry(rel, self.root / rel, target, chmod, where)]
        if not real.exists():
            raise InvalidBuild(f"{where}: {rel} is a symlink to nothing in the build context")
        st = real.stat()
        if stat.S_ISDIR(st.st_mode):
            out = [ContextFile(rel, dest, "dir", _mode(st.st_mode, chmod), "")]
            self._walk(rel, dest, chmod, where, out)
            return out
        return [self._entry(rel, real, target, chmod, where)]

    def collect(
        self,
        matches: list[str],
        dest: str,
        *,
        into_dir: bool,
        chmod: int | None,
        where: str,
        follow: bool = True,
    ) -> tuple[ContextFile, ...]:
        """`files` of every match, in order."""
        return tuple(
            f
            for rel in matches
            for f in self.files(
                rel, dest, into_dir=into_dir, chmod=chmod, where=where, follow=follow
            )
        )

    def is_archive(self, rel: str, where: str) -> bool:
        """Whether ADD would unpack `rel`: a regular file that is a tar, or compressed."""
        real = self._inside(rel, where)
        if not real.is_file():
            return False
        with real.open("rb") as f:
            head = f.read(262)
        return head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar"

    def _walk(
        self, rel: str, dest: str, chmod: int | None, where: str, out: list[ContextFile]
    ) -> None:
        here = self.root / rel
        for name in sorted(os.listdir(here)):
            child = posixpath.normpath(posixpath.join(rel, name))
            target = posixpath.join(dest, name)
            if target.count("/") > MAX_DEPTH or len(os.fsencode(target)) > MAX_PATH_BYTES:
                raise InvalidBuild(
                    f"{where}: {child[:64]}... would land deeper than {MAX_DEPTH} directories "
                    f"or past {MAX_PATH_BYTES} bytes in the image; Corral stores neither"
                )
            if self.ignored(child):
                if (
                    self._has_exceptions
                    and (here / name).is_dir()
                    and not (here / name).is_symlink()
                ):
                    self._walk(child, target, chmod, where, out)
                continue
            path = self.root / child
            entry = self._entry(child, path, target, chmod, where)
            out.append(entry)
            if entry.kind == "dir":
                self._walk(child, target, chmod, where, out)

    def _entry(self, rel: str, path: Path, dest: str, chmod: int | None, where: str) -> ContextFile:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            self._inside(rel, where)
            link = os.readlink(path)
            digest = "sha256:" + hashlib.sha256(link.encode()).hexdigest()
            return ContextFile(rel, dest, "symlink", 0o777, digest, link)
        if stat.S_ISDIR(st.st_mode):
            return ContextFile(rel, dest, "dir", _mode(st.st_mode, chmod), "")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidBuild(
                f"{where}: {rel} is not a regular file, directory or symlink; "
                "remove it from the context or list it in .dockerignore"
            )
        with path.open("rb") as f:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        return ContextFile(rel, dest, "file", _mode(st.st_mode, chmod), digest)

    def _inside(self, rel: str, where: str) -> Path:
        """`rel` with its symlinks resolved, refused when that leaves the context."""
        path = self.root / rel
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            raise InvalidBuild(
                f"{where}: {rel} leads out of the build context through a symlink; a "
                "build reads only files inside the context: copy the file into the "
                "context, or make the link point inside it"
            )
        return real


def names_directory(dest: str) -> bool:
    """Whether a COPY destination says it is a directory (`/app/`, `.`, `sub/..`); the
    builder also copies a file into a destination that is a directory in the image."""
    return dest.endswith("/") or posixpath.basename(dest) in (".", "..")


def _mode(st_mode: int, chmod: int | None) -> int:
    return stat.S_IMODE(st_mode) if chmod is None else chmod
