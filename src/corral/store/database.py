"""Opening the database: SQLite (WAL) by default, any SQLAlchemy URL when given, migrated
to head before first use.

SQLite is tuned for a server and its CLI sharing one file: WAL (readers never block the
writer), ``synchronous=NORMAL`` (a commit survives a crash of the process; only a power
loss can roll back the last few, and sandboxes do not survive that either), foreign keys
on, and a busy timeout. Write transactions start with ``BEGIN IMMEDIATE`` so two
processes queue for the write lock instead of failing with "database is locked" when a
reader turns writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import event

from corral.config import Settings, check_database_url
from corral.errors import InvalidRequest
from corral.store.timing import time_transactions

log = logging.getLogger("corral.store")

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 10_000
_IMMEDIATE = "corral_write"


def sqlite_url(settings: Settings) -> str:
    return f"sqlite:///{settings.data_dir / 'corral.db'}"


def _sqlite_engine(url: str) -> sa.Engine:
    db = sa.create_engine(url)

    @event.listens_for(db, "connect")
    def configure(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own implicit BEGIN is off: the "begin" hook below issues it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "foreign_keys=ON",
            f"busy_timeout={BUSY_TIMEOUT_MS}",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(db, "begin")
    def begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return db


def _engine(url: str) -> sa.Engine:
    """The SQLAlchemy engine of `url`; a URL it cannot use says what to do instead."""
    check_database_url(url)
    try:
        dialect = sa.engine.make_url(url).get_backend_name()
        if dialect == "sqlite":
            return _sqlite_engine(url)
        return sa.create_engine(url)
    except sa.exc.NoSuchModuleError:
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={_shown(url)} names a database SQLAlchemy does not know: "
            "use sqlite:///PATH (or postgresql://…, once its driver is installed)"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise InvalidRequest(f"CORRAL_DATABASE_URL={_shown(url)} is not usable: {exc}") from None
    except ImportError as exc:  # the dialect's driver (e.g. psycopg) is not installed
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={_shown(url)} needs the Python package {exc.name!r}, which "
            "is not installed; install it beside Corral, or leave CORRAL_DATABASE_URL empty "
            "for SQLite in the data dir"
        ) from None


def _shown(url: str) -> str:
    """The URL as a message may show it: without its password."""
    try:
        return repr(sa.engine.make_url(url).render_as_string(hide_password=True))
    except sa.exc.ArgumentError:
        return "(unparsable)"


def migrate(conn: sa.Connection) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")


class Database:
    """An open database: connections and transactions for the store's parts."""

    def __init__(self, db: sa.Engine, settings: Settings) -> None:
        self._db = db
        self.settings = settings

    @classmethod
    def open(cls, settings: Settings, url: str | None = None) -> Self:
        """Open (and create, and migrate) the store at `url`, else `settings.database_url`,
        else SQLite in the data directory."""
        url = url or settings.database_url
        if not url:
            settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created owner-only before SQLite opens it (its -wal and -shm files copy
            # the mode): it holds sandboxes' environments.
            os.close(os.open(settings.data_dir / "corral.db", os.O_RDWR | os.O_CREAT, 0o600))
            url = sqlite_url(settings)
        db = _engine(url)
        time_transactions(db, write_option=_IMMEDIATE)
        store = cls(db, settings)
        try:
            with store._write() as conn:
                migrate(conn)
        except BaseException:
            db.dispose()
            raise
        log.debug("store open", extra={"url": db.url.render_as_string(hide_password=True)})
        return store

    def close(self) -> None:
        self._db.dispose()

    @property
    def url(self) -> str:
        return self._db.url.render_as_string(hide_password=True)

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A transaction that will write: it holds the write lock from its start."""
        with self._db.connect() as conn:
            conn.execution_options(**{_IMMEDIATE: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._db.connect() as conn, conn.begin():
            yield conn
