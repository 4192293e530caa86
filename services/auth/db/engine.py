"""Engines and transactions: SQLite (WAL) or PostgreSQL, run off the event loop.

Domain code is plain synchronous functions over an ORM `Session`; `Database`
runs each in a worker thread (`asyncio.to_thread`) inside one transaction, so
the event loop never waits on SQL. SQLite write transactions start with BEGIN
IMMEDIATE so concurrent writers queue on the busy timeout instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.common.errors import Unavailable

T = TypeVar("T")
_DETAIL = re.compile(r"\nDETAIL:[^\n]*")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL, foreign keys and a busy timeout.

    Every engine hides bound parameters from its errors and logs: they hold key
    digests and password hashes, which must never reach a log through a StatementError.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(
            url, pool_pre_ping=True, pool_size=8, max_overflow=8, hide_parameters=True
        )
        event.listen(engine, "handle_error", _without_detail)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("tokenyard_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _without_detail(context: ExceptionContext) -> None:
    """Drop PostgreSQL's DETAIL line from driver errors: it quotes row values
    (`Key (digest)=(...) already exists`), which hide_parameters does not cover."""
    for err in (context.original_exception, context.sqlalchemy_exception):
        if err is not None and err.args and isinstance(err.args[0], str):
            err.args = (_DETAIL.sub("", err.args[0]), *err.args[1:])


def _unavailable() -> Unavailable:
    """What a caller sees when the database cannot be reached: retryable, no SQL."""
    return Unavailable("the database is unreachable; retry", reason="DATABASE_UNAVAILABLE")


class Database:
    """One engine plus helpers that run a function in a transaction, in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._writer = self.engine.execution_options(tokenyard_write=True)
        self._idle = threading.Condition()
        self._in_flight = 0

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self.engine.dialect.name

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(session, *args)` in a read transaction (rolled back after).

        A connection lost mid-read (server restart, pg_terminate_backend) is retried
        once on a fresh one; a database still out of reach is Unavailable.
        """
        for attempt in range(2):
            try:
                with self._tracked(), Session(self.engine, expire_on_commit=False) as session:
                    return fn(session, *args)
            except OperationalError as exc:
                if not (exc.connection_invalidated and attempt == 0):
                    raise _unavailable() from None
        raise AssertionError("unreachable")

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(session, *args)` in a write transaction, committed on success.

        Not retried (the commit may have happened): a lost connection is Unavailable.
        """
        try:
            with (
                self._tracked(),
                Session(self._writer, expire_on_commit=False) as session,
                session.begin(),
            ):
                return fn(session, *args)
        except OperationalError:
            raise _unavailable() from None

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """`read_sync` in a worker thread."""
        return await asyncio.to_thread(self.read_sync, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """`write_sync` in a worker thread."""
        return await asyncio.to_thread(self.write_sync, fn, *args)

    def close(self, wait: float = 10.0) -> None:
        """Close every pooled connection, after in-flight transactions end (up to `wait` s)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=wait)
        self.engine.dispose()
