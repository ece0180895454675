"""Teams, their quotas and their API keys.

A key is shown once, when it is created: the store keeps only its sha256 digest (to
authenticate) and its first characters (to show and to revoke by).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from corral.errors import InvalidRequest, NotFound, QuotaExceeded, Unauthenticated
from corral.store.database import Database
from corral.store.schema import api_keys, teams

log = logging.getLogger("corral.store")

KEY_PREFIX = "crl_"
# E2B's key shape, which the e2b SDK checks before it sends one (E2B_VALIDATE_API_KEY).
E2B_KEY_PREFIX = "e2b_"
# "crl_" and 32 url-safe characters (192 random bits), or "e2b_" and 40 lower-case hex
# digits (160 bits).
_KEY = re.compile(r"crl_[A-Za-z0-9_-]{32}|e2b_[0-9a-f]{40}")
# Shown in listings and accepted by revoke: the prefix and the next 8 characters.
DISPLAY_PREFIX_LENGTH = 12
_TEAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_TEAM = "default"
DEFAULT_KEY_FILE = "default.key"


@dataclass(frozen=True)
class Team:
    """A tenant: it sees only its own sandboxes and jobs, within its quotas.

    The quotas bound the team's totals: its live sandboxes (paused ones included: they
    keep their memory) number at most `max_sandboxes` and together hold at most
    `max_memory_mib`, `max_cpu` cores and `max_disk_mib` of writable storage; a job's
    sandbox must fit in these totals too. At most `max_running_jobs` of its jobs run at
    once, and its stored job logs take at most `max_log_mib`. Each of its API keys may
    send `max_api_rate` requests a second (bursts of twice that) and hold
    `max_api_streams` streams open; 0 means the server's limits.
    """

    id: str
    name: str
    max_sandboxes: int = 20
    max_memory_mib: int = 8192
    max_cpu: float = 16.0
    max_disk_mib: int = 20480
    max_running_jobs: int = 8
    max_log_mib: int = 1024
    max_api_rate: float = 0.0
    max_api_streams: int = 0


# (field, lowest accepted value) of every quota, in the order of Team's fields.
QUOTAS: tuple[tuple[str, float], ...] = (
    ("max_sandboxes", 1),
    ("max_memory_mib", 16),
    ("max_cpu", 0.01),
    ("max_disk_mib", 1),
    ("max_running_jobs", 1),
    ("max_log_mib", 1),
    ("max_api_rate", 0),
    ("max_api_streams", 0),
)
_FLOAT_QUOTAS = ("max_cpu", "max_api_rate")
DEFAULT_QUOTAS: dict[str, Any] = {name: getattr(Team, name) for name, _ in QUOTAS}


# What a team's live sandboxes add up against its quotas: (quota, sandbox limit, unit).
SANDBOX_TOTALS: tuple[tuple[str, str, str], ...] = (
    ("max_memory_mib", "memory_mib", "MiB"),
    ("max_cpu", "cpu", "cores"),
    ("max_disk_mib", "disk_mib", "MiB"),
)
_ASK_LESS = "ask for less, or ask an admin for a larger quota"


def check_totals(
    team: Team, asked: Mapping[str, Any], live: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Refuse (QuotaExceeded) a sandbox with limits `asked` that would take the team past
    a quota, given the limits of its `live` sandboxes (None: could it ever fit, as a
    job's sandbox at submit)."""
    if live is not None and len(live) >= team.max_sandboxes:
        raise QuotaExceeded(
            f"the team has {len(live)} live sandboxes (paused ones included) and its quota "
            f"allows {team.max_sandboxes} (max_sandboxes); kill one it no longer needs or "
            "ask an admin for a larger quota"
        )
    for quota, limit, unit in SANDBOX_TOTALS:
        allowed, want = getattr(team, quota), asked.get(limit, 0)
        if live is None:
            if want > allowed:
                raise QuotaExceeded(
                    f"{limit}={want:g} is more than the team's quota of {allowed:g} {unit} "
                    f"for all its live sandboxes together ({quota}); {_ASK_LESS}"
                )
            continue
        used = sum(limits.get(limit, 0) for limits in live)
        if used + want > allowed:
            raise QuotaExceeded(
                f"{limit}={want:g} does not fit in the team's quota ({quota}): its "
                f"{len(live)} live sandboxes (paused ones included) hold {used:g} of "
                f"{allowed:g} {unit}; kill sandboxes it no longer needs, {_ASK_LESS}"
            )


def _checked_quotas(quotas: Mapping[str, Any]) -> dict[str, Any]:
    """`quotas` (Team's `max_*` fields), each checked; InvalidRequest names a bad one."""
    unknown = sorted(set(quotas) - set(DEFAULT_QUOTAS))
    if unknown:
        raise InvalidRequest(f"no quota {unknown[0]!r}; quotas are {', '.join(DEFAULT_QUOTAS)}")
    for field, low in QUOTAS:
        if field not in quotas:
            continue
        value = quotas[field]
        kind = float if field in _FLOAT_QUOTAS else int
        numeric = isinstance(value, int | kind) and not isinstance(value, bool)
        if not numeric or value < low:
            raise InvalidRequest(
                f"{field}={value!r} must be {'a number' if kind is float else 'an integer'} "
                f"of at least {low:g}"
            )
    return dict(quotas)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _team(row: sa.Row[*tuple[Any, ...]]) -> Team:
    return Team(row.id, row.name, **{name: getattr(row, name) for name, _ in QUOTAS})


_TEAM_COLUMNS = (teams.c.id, teams.c.name, *(teams.c[name] for name, _ in QUOTAS))


def lock_team(conn: sa.Connection, team_id: str) -> Team:
    """The team, its row locked until `conn`'s transaction ends (PostgreSQL; SQLite's
    BEGIN IMMEDIATE serializes writers already): quota checks in it count in turn."""
    row = conn.execute(
        sa.select(*_TEAM_COLUMNS).where(teams.c.id == team_id).with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"no team with id {team_id!r}")
    return _team(row)


class TeamStore(Database):
    """Teams and API keys: what `corral admin` manages and what the server authenticates."""

    def create_team(self, name: str, **quotas: Any) -> Team:
        """A new team; `quotas` are Team's `max_*` fields, the defaults where left out."""
        if not isinstance(name, str) or not _TEAM_NAME.fullmatch(name):
            raise InvalidRequest(
                f"team name {name!r} is malformed: use 1 to 63 lower-case letters, digits, "
                "'-' or '_', starting with a letter or digit"
            )
        values = {**DEFAULT_QUOTAS, **_checked_quotas(quotas)}
        team = Team("team_" + secrets.token_hex(8), name, **values)
        try:
            with self._write() as conn:
                conn.execute(
                    teams.insert().values(
                        id=team.id, name=name, **values, created_at=datetime.now(UTC)
                    )
                )
        except sa.exc.IntegrityError:
            raise InvalidRequest(f"a team named {name!r} exists already") from None
        log.info("team created", extra={"team": name, "team_id": team.id})
        return team

    def set_quotas(self, name: str, **quotas: Any) -> Team:
        """Change a team's quotas (Team's `max_*` fields); those left out stay as they are.

        A quota lowered under what the team uses now ends nothing: its live sandboxes and
        running jobs go on, and what it asks next is refused until it is back under.
        """
        values = _checked_quotas(quotas)
        with self._write() as conn:
            found = conn.execute(teams.update().where(teams.c.name == name).values(**values))
        if found.rowcount == 0:
            self.team(name)  # raises NotFound, saying how to create it
        log.info("team quotas set", extra={"team": name, **values})
        return self.team(name)

    def team(self, name: str) -> Team:
        with self._read() as conn:
            row = conn.execute(sa.select(*_TEAM_COLUMNS).where(teams.c.name == name)).first()
        if row is None:
            raise NotFound(
                f"no team named {name!r}; create it with `corral admin team create {name}`"
            )
        return _team(row)

    def team_by_id(self, team_id: str) -> Team:
        with self._read() as conn:
            row = conn.execute(sa.select(*_TEAM_COLUMNS).where(teams.c.id == team_id)).first()
        if row is None:
            raise NotFound(f"no team with id {team_id!r}")
        return _team(row)

    def teams(self) -> list[Team]:
        with self._read() as conn:
            rows = conn.execute(sa.select(*_TEAM_COLUMNS).order_by(teams.c.name)).all()
        return [_team(row) for row in rows]

    def create_api_key(self, team_name: str, *, e2b: bool = False) -> str:
        """A new key for the team; the plaintext is returned here and never again.
        With `e2b`, in E2B's shape (`e2b_` and hex): the same key to Corral."""
        team = self.team(team_name)
        if e2b:
            key = E2B_KEY_PREFIX + secrets.token_hex(20)
        else:
            key = KEY_PREFIX + secrets.token_urlsafe(24)
        with self._write() as conn:
            conn.execute(
                api_keys.insert().values(
                    id="key_" + secrets.token_hex(8),
                    team_id=team.id,
                    prefix=key[:DISPLAY_PREFIX_LENGTH],
                    key_hash=hash_key(key),
                    created_at=datetime.now(UTC),
                )
            )
        log.info(
            "api key created",
            extra={"team": team.name, "key_prefix": key[:DISPLAY_PREFIX_LENGTH]},
        )
        return key

    def revoke_api_key(self, key_or_prefix: str) -> None:
        """Revoke a key given whole or by its displayed prefix; revoking twice is a no-op."""
        if _KEY.fullmatch(key_or_prefix):
            where = api_keys.c.key_hash == hash_key(key_or_prefix)
        else:
            where = api_keys.c.prefix == key_or_prefix
        with self._write() as conn:
            found = conn.execute(sa.select(api_keys.c.id, api_keys.c.revoked_at).where(where)).all()
            if not found:
                raise NotFound(
                    f"no API key {key_or_prefix[:DISPLAY_PREFIX_LENGTH]!r}…; pass the whole key "
                    f"or its first {DISPLAY_PREFIX_LENGTH} characters"
                )
            if len(found) > 1:
                raise InvalidRequest(
                    f"{len(found)} keys start with {key_or_prefix!r}; pass the whole key"
                )
            if found[0].revoked_at is None:
                conn.execute(
                    api_keys.update()
                    .where(api_keys.c.id == found[0].id)
                    .values(revoked_at=datetime.now(UTC))
                )
        log.info("api key revoked", extra={"key_prefix": key_or_prefix[:DISPLAY_PREFIX_LENGTH]})

    def authenticate(self, api_key: str) -> Team:
        if isinstance(api_key, str) and _KEY.fullmatch(api_key):
            with self._read() as conn:
                row = conn.execute(
                    sa.select(*_TEAM_COLUMNS)
                    .join(api_keys, api_keys.c.team_id == teams.c.id)
                    .where(api_keys.c.key_hash == hash_key(api_key))
                    .where(api_keys.c.revoked_at.is_(None))
                ).first()
            if row is not None:
                return _team(row)
        raise Unauthenticated(
            "unknown or revoked API key; pass a valid one with --api-key or CORRAL_API_KEY "
            "(an admin creates one with `corral admin key create --team TEAM`)"
        )

    def ensure_default_team(self) -> tuple[Team, str | None]:
        """The team "default" and a working key in <data_dir>/default.key (mode 0600).

        Returns the new key when it had to create one, else None: then the key in the
        file still authenticates.
        """
        try:
            team = self.team(DEFAULT_TEAM)
        except NotFound:
            try:
                team = self.create_team(DEFAULT_TEAM)
            except InvalidRequest:  # another process created it just now
                team = self.team(DEFAULT_TEAM)
        path = self.settings.data_dir / DEFAULT_KEY_FILE
        try:
            existing = path.read_text().strip()
        except OSError:
            existing = ""
        if existing:
            try:
                if self.authenticate(existing).id == team.id:
                    return team, None
            except Unauthenticated:
                pass
        key = self.create_api_key(DEFAULT_TEAM)
        _write_secret(path, key + "\n")
        return team, key


def _write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
