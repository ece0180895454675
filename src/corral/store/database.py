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
from corral.store.notifications import Notifications

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


def _engine(url: str, settings: Settings) -> sa.Engine:
    """The SQLAlchemy engine of `url`; a URL it cannot use says what to do instead.

    A server database (PostgreSQL) is reached through a pool of
    `database_pool_size` connections kept open, and up to `database_pool_overflow` more
    opened under load; each is checked before use (pre-ping), so one the server dropped
    (a restart, an idle timeout) is replaced rather than failing a request."""
    check_database_url(url)
    try:
        dialect = sa.engine.make_url(url).get_backend_name()
        if dialect == "sqlite":
            return _sqlite_engine(url)
        return sa.create_engine(
            url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_pool_overflow,
            pool_pre_ping=True,
        )
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
        self.notifications = Notifications(db.url)
        self._autocommit_reads = db.dialect.name == "postgresql"

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
        db = _engine(url, settings)
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
        self.notifications.close()
        self._db.dispose()

    @property
    def connections_in_use(self) -> int:
        """Connections taken from the pool now (a waiting follower holds none)."""
        pool = self._db.pool
        return pool.checkedout() if isinstance(pool, sa.pool.QueuePool) else 0

    @property
    def url(self) -> str:
        return self._db.url.render_as_string(hide_password=True)

    def notify(self, conn: sa.Connection, channel: str, payload: str = "") -> None:
        """Wake other processes' waiters on `channel` once this write commits."""
        self.notifications.notify(conn, channel, payload)

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A transaction that will write: it holds the write lock from its start."""
        with self._db.connect() as conn:
            conn.execution_options(**{_IMMEDIATE: True})
            try:
                with conn.begin():
                    yield conn
                    self.notifications.send(conn)
            finally:
                self.notifications.discard(conn)

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A read. On PostgreSQL without a transaction: at READ COMMITTED each statement
        sees its own snapshot either way, and BEGIN and ROLLBACK would be two more round
        trips per read; SQLite's read transaction keeps one snapshot for all of them."""
        with self._db.connect() as conn:
            if self._autocommit_reads:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
                return
            with conn.begin():
                yield conn
