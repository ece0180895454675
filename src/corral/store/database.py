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
import select
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from corral.config import Settings, check_database_url
from corral.errors import InvalidRequest, SchemaTooNew
from corral.store.notifications import Notifications
from corral.store.timing import time_transactions

if TYPE_CHECKING:
    from alembic.config import Config

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
    opened under load; each is checked before use (`_drop_hung_up`), so one the server
    dropped (a restart, an idle timeout, `pg_terminate_backend`) is replaced rather than
    failing a request."""
    check_database_url(url)
    try:
        parsed = sa.engine.make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        if parsed.drivername == "postgresql":
            # psycopg 3, the driver Corral installs (SQLAlchemy's default is psycopg2).
            parsed = parsed.set(drivername="postgresql+psycopg")
        db = sa.create_engine(
            parsed,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_pool_overflow,
        )
        event.listen(db, "checkout", _drop_hung_up)
        event.listen(db, "after_cursor_execute", _await_rows)
        return db
    except sa.exc.NoSuchModuleError:
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={_shown(url)} names a database SQLAlchemy does not know: "
            "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB"
        ) from None
    except sa.exc.ArgumentError as exc:
        raise InvalidRequest(f"CORRAL_DATABASE_URL={_shown(url)} is not usable: {exc}") from None
    except ImportError as exc:  # the dialect's driver (e.g. psycopg) is not installed
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={_shown(url)} needs the Python package {exc.name!r}, which "
            "is not installed; install it beside Corral, or leave CORRAL_DATABASE_URL empty "
            "for SQLite in the data dir"
        ) from None


def _drop_hung_up(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has hung up on; the pool then opens another.

    SQLAlchemy's pre-ping would ask the server (`SELECT 1`: a round trip per checkout, one in
    five of a job's). An idle connection is never sent anything unasked but for a
    server's goodbye (the error it sends as it terminates the session, then end of file),
    so a connection with bytes to read, or closed, is one to drop: found with no round trip."""
    if dbapi_connection.closed or select.select([dbapi_connection.fileno()], [], [], 0)[0]:
        raise sa.exc.DisconnectionError("the database closed this connection")


# conn.info's key for the psycopg pipeline a write transaction runs in (`Database._write`).
_PIPELINE = "corral_pipeline"
# The execution option of a statement whose result (rows, rowcount) nobody reads.
_UNREAD = "corral_unread"

Executable = TypeVar("Executable", bound=sa.Executable)


def unread(statement: Executable) -> Executable:
    """`statement`, marked as one whose result its callers never read (an INSERT, UPDATE
    or DELETE without RETURNING whose rowcount is not looked at): in a write on PostgreSQL
    it is not waited for, but goes to the server with the next statement that is, or
    with the COMMIT (`Database._pipelined`).

    Its result is not there yet when `execute` returns: rows would read as none, and a
    rowcount as -1. So a statement that returns rows is refused here (TypeError); the
    rowcount is the caller's promise."""
    if not isinstance(statement, sa.UpdateBase) or statement.exported_columns:
        raise TypeError(
            f"only an INSERT, UPDATE or DELETE without RETURNING may be unread: {statement}"
        )
    return statement.execution_options(**{_UNREAD: True})


def _await_rows(
    conn: sa.Connection,
    _cursor: Any,
    _statement: str,
    _parameters: Any,
    context: sa.engine.ExecutionContext,
    _executemany: bool,
) -> None:
    """In a pipelined write, fetch a statement's result before SQLAlchemy reads it,
    unless the statement is `unread`.

    In pipeline mode psycopg sends a statement and returns before its result comes back;
    SQLAlchemy looks at the cursor right after this hook. An error of an earlier unread
    statement is raised here, or at the commit: the transaction fails either way."""
    pipeline = conn.info.get(_PIPELINE)
    if pipeline is not None and not context.execution_options.get(_UNREAD):
        pipeline.sync()


def _sqlite_pragma(conn: sa.Connection, pragma: str) -> None:
    """Run a PRAGMA on the driver's connection, outside any transaction (SQLAlchemy's own
    execute would begin one first, and some pragmas are ignored inside one)."""
    conn.connection.driver_connection.execute(f"PRAGMA {pragma}")  # type: ignore[union-attr]


def _reach(db: sa.Engine) -> None:
    """Connect once: a database that cannot be reached says so, with what to check."""
    try:
        db.connect().close()
    except sa.exc.OperationalError as exc:
        url = db.url.render_as_string(hide_password=False)
        why = " ".join(str(exc.orig).split())  # psycopg's message spans lines
        raise InvalidRequest(
            f"CORRAL_DATABASE_URL={_shown(url)} cannot be reached: {why}; "
            "check that the database runs and the URL's host, port, user, password and "
            "database name"
        ) from None


def _shown(url: str) -> str:
    """The URL as a message may show it: without its password."""
    try:
        return repr(sa.engine.make_url(url).render_as_string(hide_password=True))
    except sa.exc.ArgumentError:
        return "(unparsable)"


# Store.open on PostgreSQL migrates under this transaction-scoped advisory lock, so that a
# server and its workers starting together on an empty database do not both create the
# tables (SQLite's BEGIN IMMEDIATE queues them already). Any constant: "corral" in ASCII.
_MIGRATION_LOCK = 0x636F7272616C


@dataclass(frozen=True)
class SchemaRevisions:
    """What a migration did: the revision it found (None: an empty database) and the
    revision it left (the code's head)."""

    before: str | None
    after: str


def alembic_config(conn: sa.Connection) -> Config:
    """Alembic's configuration for Corral's migrations, run on `conn`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def migrate(conn: sa.Connection) -> SchemaRevisions:
    """Bring the schema to the newest revision (a no-op when it is there already).

    A database migrated by a newer Corral (a revision this code does not have) is left
    alone: SchemaTooNew says which revision and to upgrade Corral."""
    from alembic import command
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    config = alembic_config(conn)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    assert head is not None, "the migrations have one head"
    known = {revision.revision for revision in script.walk_revisions()}
    before = MigrationContext.configure(conn).get_current_heads()
    if unknown := [revision for revision in before if revision not in known]:
        raise SchemaTooNew(
            f"the database {_shown(conn.engine.url.render_as_string(hide_password=False))} is "
            f"at schema revision {', '.join(unknown)}, which this Corral (schema {head}) does "
            "not know: a newer Corral migrated it. Upgrade Corral to that version or later; "
            "nothing was changed"
        )
    command.upgrade(config, "head")
    return SchemaRevisions(before[0] if before else None, head)


class Database:
    """An open database: connections and transactions for the store's parts."""

    # What opening it migrated (`migrate`): set by `open`.
    schema: SchemaRevisions

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
        time_transactions(db, write_option=_IMMEDIATE)
        store = cls(db, settings)
        try:
            _reach(db)
            with store.migrating() as conn:
                store.schema = migrate(conn)
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
    def networked(self) -> bool:
        """Whether a call waits on a database server (PostgreSQL), so that an event loop
        gains by making it in a thread; SQLite's calls are work in this process, which a
        thread only slows (hand-offs of the GIL)."""
        return self._autocommit_reads

    @property
    def url(self) -> str:
        return self._db.url.render_as_string(hide_password=True)

    def notify(self, conn: sa.Connection, channel: str, payload: str = "") -> None:
        """Wake other processes' waiters on `channel` once this write commits."""
        self.notifications.notify(conn, channel, payload)

    @contextmanager
    def migrating(self) -> Iterator[sa.Connection]:
        """The write transaction migrations run in: on SQLite, with foreign keys off.

        SQLite alters a table by copying it and dropping the old one (Alembic's batch mode);
        with foreign keys on, that drop would cascade to the rows that refer to the table
        (a rebuilt `teams` would take every API key with it). The pragma is set outside
        the transaction, where SQLite honours it, and set back before the connection
        returns to the pool."""
        with self._db.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                _sqlite_pragma(conn, "foreign_keys=OFF")
            try:
                conn.execution_options(**{_IMMEDIATE: True})
                with conn.begin():
                    yield conn
            finally:
                if sqlite:
                    _sqlite_pragma(conn, "foreign_keys=ON")

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A transaction that will write: it holds the write lock from its start (SQLite);
        on PostgreSQL it is `_pipelined`."""
        with self._db.connect() as conn:
            conn.execution_options(**{_IMMEDIATE: True})
            try:
                if self.networked:
                    with self._pipelined(conn):  # it sends the notifications
                        yield conn
                else:  # SQLite: no other process hears; `committed` tells this one's
                    with conn.begin():
                        yield conn
                self.notifications.committed(conn)
            finally:
                self.notifications.discard(conn)

    @contextmanager
    def _pipelined(self, conn: sa.Connection) -> Iterator[None]:
        """A PostgreSQL write transaction in psycopg's pipeline mode, whose round trips are
        only the reads it waits on and one at its end.

        psycopg would send its own BEGIN and wait for it (a round trip of its own), so the
        connection is in autocommit and the transaction's BEGIN and COMMIT are statements
        of the pipeline: BEGIN goes with the first read (`_await_rows` syncs each statement
        whose result is read), and the statements nobody reads (`unread` ones, the
        notifications) go with the COMMIT, whose result is awaited before this returns.
        On an error SQLAlchemy's rollback has psycopg roll back what the server holds."""
        import psycopg

        conn.execution_options(isolation_level="AUTOCOMMIT")
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with conn.begin():  # SQLAlchemy's: timed (`time_transactions`), rolled back on error
            try:
                with driver.pipeline() as pipeline:
                    conn.info[_PIPELINE] = pipeline
                    try:
                        driver.execute(b"BEGIN ISOLATION LEVEL READ COMMITTED")
                        yield
                        self.notifications.send(conn)
                        driver.execute(b"COMMIT")
                    finally:
                        del conn.info[_PIPELINE]
            except psycopg.Error as exc:  # of an unread statement, or the COMMIT
                raise sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error) from exc

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A read. On PostgreSQL without a transaction: at READ COMMITTED each statement
        sees its own snapshot either way, and BEGIN and ROLLBACK would be two more round
        trips per read; SQLite's read transaction keeps one snapshot for all of them."""
        with self._db.connect() as conn:
            if self._autocommit_reads:  # begin and commit then send nothing (still timed)
                conn.execution_options(isolation_level="AUTOCOMMIT")
            with conn.begin():
                yield conn
