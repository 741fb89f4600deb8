"""Engines and sessions: one engine per process and URL, schema created on first use."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gridtune.errors import UserError
from models.schema import Base

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
# Any fixed number: serialises concurrent create_all calls from many workers on Postgres.
_SCHEMA_LOCK_ID = 0x6772_6964


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers run beside the one writer; the busy timeout makes many worker threads
    # queue for the write lock instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def describe_database(engine: Engine) -> str:
    """Which database this is, for messages: a SQLite file's absolute path, else the URL without password."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return f"the SQLite file {Path(url.database).resolve()} (DATABASE_URL)"
    return f"{url.render_as_string(hide_password=True)} (DATABASE_URL)"


class RawJSON(str):
    """JSON text already serialized (a large document written to a file first): a JSON column
    stores it as it is instead of serializing it again."""


def _json_dumps(value) -> str:
    return value if isinstance(value, RawJSON) else json.dumps(value)  # as it is: no 2nd copy of a big text


def _build_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"DATABASE_URL is not a database URL: {url!r}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False},
                                   json_serializer=_json_dumps)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            # Worker pools run many threads, but each holds a connection only for a short query:
            # 20 per process is plenty and keeps several workers under Postgres's default
            # max_connections (100). Threads beyond that wait for a free connection. All 20 stay
            # open once opened (no overflow: an overflow connection is closed when returned, and
            # reopening one is a backend fork + connect per checkout; docs/benchmarks.md, "Round 4").
            # No pool_pre_ping (a round trip per checkout, two per request): a dead pooled
            # connection fails its statement with a disconnect error, SQLAlchemy then drops every
            # older pooled connection, and the callers retry (DB_UNAVAILABLE in worker/generation.py).
            engine = create_engine(
                parsed, pool_pre_ping=False, pool_size=20, max_overflow=0, pool_timeout=60,
                json_serializer=_json_dumps,
            )
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise UserError(f"DATABASE_URL {safe_url(url)}: unsupported database: {exc}") from None
    return engine


def create_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        Base.metadata.create_all(conn)
        add_missing_columns(conn)


def add_missing_columns(conn) -> None:
    """Additive migration: columns a newer gridtune declares that an older database lacks.

    Only nullable columns without server defaults are ever added to existing tables, so an old
    database keeps working without a migration tool; nothing is renamed or dropped.
    """
    existing_tables = set(inspect(conn).get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        present = {column["name"] for column in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise UserError(f"the database's table {table.name} lacks the required column {column.name}: "
                                "use a new database (DATABASE_URL) for this gridtune version")
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def get_engine(url: str) -> Engine:
    """The process's engine for `url`, with the schema in place. Raises UserError if unusable."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _build_engine(url)
            try:
                create_schema(engine)
            except OperationalError as exc:
                engine.dispose()
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise UserError(f"cannot reach the database at {safe_url(url)}: {reason}") from None
            except SQLAlchemyError as exc:
                engine.dispose()
                raise UserError(f"database {safe_url(url)}: {exc.__class__.__name__}: {exc}") from None
            _engines[url] = engine
        return engine


_autocommit: dict[Engine, Engine] = {}


def autocommit(engine: Engine) -> Engine:
    """`engine` (same pool) whose connections run each statement in its own transaction: for the
    worker's single-statement reads and writes, without BEGIN and COMMIT/ROLLBACK round trips."""
    view = _autocommit.get(engine)
    if view is None:
        view = _autocommit.setdefault(engine, engine.execution_options(isolation_level="AUTOCOMMIT"))
    return view


def dispose_engines() -> None:
    """Close every pooled connection (after fork, and in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
            _session_factories.pop(engine, None)
            _autocommit.pop(engine, None)
        _engines.clear()


_session_factories: dict[Engine, sessionmaker] = {}


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = _session_factories.get(engine)
    if factory is None:  # building a sessionmaker creates a class: once per engine, not per call
        factory = _session_factories.setdefault(engine, sessionmaker(engine, expire_on_commit=False))
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
