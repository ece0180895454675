"""A throwaway PostgreSQL cluster for the tests: Debian's initdb and pg_ctl, data and
socket under a temp dir, on a free loopback port, fsync off; one fresh database per test.

PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
user Debian's package creates (else to whoever runs the tests). Clients reach it over
TCP on 127.0.0.1 with a password, as a deployment would.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

PG_ROOT = Path("/usr/lib/postgresql")
USER = "corral"
# Databases are created from this one, migrated once per session: a copy is far faster
# than running the fifteen migrations again for every test.
MIGRATED = "corral_migrated"


def bin_dir() -> Path | None:
    """The newest installed server's bin directory, if any."""
    found = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def unavailable() -> str | None:
    """Why no cluster can start here, or None."""
    if bin_dir() is None:
        return f"PostgreSQL is not installed (no {PG_ROOT}/*/bin/initdb): run `make setup`"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg package is not installed: run `make setup`"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the cluster as"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A running cluster: `url(name)` reaches its database `name`."""

    bin: Path
    root: Path
    port: int
    password: str
    owner: str | None  # the user it runs as, when not us

    def url(self, database: str, driver: str = "postgresql+psycopg", *, unix: bool = False) -> str:
        """Over TCP on loopback; with `unix`, over the cluster's Unix socket (as a server
        on the database's own host would connect)."""
        return URL.create(
            driver,
            username=USER,
            password=self.password,
            host=None if unix else "127.0.0.1",
            port=self.port,
            database=database,
            query={"host": str(self.root)} if unix else {},
        ).render_as_string(hide_password=False)

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run `statement` outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(self.url(database, "postgresql"), autocommit=True) as conn:
            conn.execute(statement.encode())

    def create_database(self, template: str = "template0") -> str:
        name = f"t_{secrets.token_hex(6)}"
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextmanager
    def database(self, template: str = "template0") -> Iterator[str]:
        """A fresh database (a copy of `template`) for one test: its URL; dropped after."""
        name = self.create_database(template)
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    def _run(self, *argv: str) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.owner:
            command = ["runuser", "-u", self.owner, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise ClusterFailed(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")

    def destroy(self) -> None:
        """Stop the cluster (at once: nothing in it is kept) and delete its files."""
        try:
            self._run("pg_ctl", "stop", "-D", str(self.root / "data"), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class ClusterFailed(RuntimeError):
    """initdb or pg_ctl failed (the message holds their output)."""


def start() -> Cluster:
    """Start a cluster (see the module's docstring); `Cluster.destroy` stops and deletes it."""
    found = bin_dir()
    assert found is not None, unavailable()
    root = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    owner = "postgres" if os.geteuid() == 0 else None
    pwfile = root / "pwfile"
    pg = Cluster(found, root, _free_port(), secrets.token_hex(16), owner)
    pwfile.write_text(pg.password + "\n")
    if owner:
        entry = pwd.getpwnam(owner)
        for path in (root, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    data = str(root / "data")
    # Its sessions' time zone is far from UTC (+13:45): the store must not depend on it.
    options = (
        f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
        "-c timezone=Pacific/Chatham"
    )
    try:
        pg._run("initdb", "-D", data, "-U", USER, "--pwfile", str(pwfile),
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")  # fmt: skip
        pg._run("pg_ctl", "start", "-D", data, "-w", "-l", str(root / "log"), "-o", options)
    except ClusterFailed as exc:
        log = root / "log"
        message = f"{exc}{log.read_text() if log.exists() else ''}"
        shutil.rmtree(root, ignore_errors=True)
        raise ClusterFailed(message) from None
    pg.sql(f'CREATE DATABASE "{MIGRATED}"')
    return pg
