"""The store in SQLite, the embedded default: one file, one connection (through
sqlite-utils), on one thread of its own (the logic is sql.py's; the contract base.py's).

Every unit of work runs whole on that thread, so the event loop never waits on
the disk and a store's units are serialized. A unit is a coroutine, but this
connection's methods never suspend (they call sqlite3 and return), so `_to_end`
runs it to its end in one step, transaction and all. Processes sharing the file
are serialized by SQLite's lock: a transaction is BEGIN IMMEDIATE (the write lock
up front, so a read-then-write is never interleaved), waited for up to
`busy_timeout`, tried `retries` times, then StoreBusy.
"""
from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from bot.store.base import StoreBusy, StoreError
from bot.store.dialect import SQLITE
from bot.store.sql import Conflict, Connection, R, Row, SqlStore, Work

T = TypeVar("T")
UNIQUE = (sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY)


class SqliteConnection(Connection):
    def __init__(self, db: sqlite3.Connection, name: str):
        self._db, self._name = db, name

    async def rows(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(_dicts(self._db.execute(query, params)))

    async def execute(self, query: str, params: Sequence[Any] = (), *, savepoint: bool = False) -> int:
        try:
            return self._db.execute(query, params).rowcount
        except sqlite3.IntegrityError as e:
            if e.sqlite_errorcode in UNIQUE:
                raise Conflict(f"database {self._name}: {e}") from None
            raise

    async def lock(self, key: int, name: str = "") -> None:
        """Held already: a transaction here holds the whole file."""
        assert self._db.in_transaction, "a lock is held by a transaction"

    async def scan(self, query: str, params: Sequence[Any], until: Callable[[Row], R | None]) -> R | None:
        for row in _dicts(self._db.execute(query, params)):
            if (answer := until(row)) is not None:
                return answer
        return None

    async def columns(self) -> dict[str, set[str]]:
        return {table.name: set(table.columns_dict) for table in sqlite_utils.Database(self._db).tables}


class SqliteStore(SqlStore):
    dialect = SQLITE

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0, retries: int = 3, audit_key: str | None = None):
        self.path = Path(path)
        super().__init__(str(self.path), audit_key)
        self.busy_timeout = busy_timeout
        self.retries = retries
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._db: sqlite3.Connection | None = None
        self._schema_cookie = -1   # SQLite's counter of schema changes, when our tables were last checked

    async def open(self) -> SqliteStore:
        await self._on_thread(self._open)
        return self

    def _open(self) -> None:
        """Connect, check the tables already there before anything is written (a file of
        another program or a newer bot is refused by name, never half-altered), then migrate."""
        if self.path.is_dir():
            raise StoreError(f"database {self.path}: is a directory, not a database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn = SqliteConnection(db, self.name)
            _to_end(self._check(conn))
            sqlite_utils.Database(db).enable_wal()
            db.execute("PRAGMA synchronous = FULL")  # a step's outcome is on disk before the next step
            _in_transaction(db, lambda: _to_end(self._migrate(conn)))
            self._schema_cookie = _schema_cookie(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Close even an unusable database (no schema check, nothing to retry)."""
        try:
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        finally:
            self._db = None
            self._executor.shutdown(wait=True)

    async def _run(self, work: Work[T], *, transaction: bool = False) -> T:
        return await self._on_thread(self._call, work, transaction)

    def _call(self, work: Work[T], transaction: bool) -> T:
        if self._db is None:
            raise StoreError(f"database {self.path} is not open")
        db, conn = self._db, SqliteConnection(self._db, self.name)
        if (cookie := _schema_cookie(db)) != self._schema_cookie:
            self._refuse_foreign(_to_end(conn.columns()))  # someone changed the tables under us: check them again
            self._schema_cookie = cookie
        if transaction:
            return _in_transaction(db, lambda: _to_end(work(conn)))
        return _to_end(work(conn))

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(self.retries):
            try:
                return await loop.run_in_executor(self._executor, fn, *args)
            except OSError as e:
                raise StoreError(f"database {self.path}: {e.strerror or e}") from None
            except sqlite3.DatabaseError as e:  # corrupt ("file is not a database"), I/O, SQL on a foreign schema
                if not isinstance(e, sqlite3.OperationalError) or ("locked" not in str(e) and "busy" not in str(e)):
                    raise StoreError(f"database {self.path}: {e}") from None
                if attempt == self.retries - 1:
                    raise StoreBusy(f"database {self.path} is locked by another writer "
                                    f"(waited {self.busy_timeout * self.retries:g}s); nothing was changed") from None
        raise AssertionError("unreachable")


def _to_end(unit: Coroutine[Any, Any, T]) -> T:
    """Run a unit of work to its end here and now: it awaits only a SqliteConnection,
    whose methods return without suspending."""
    try:
        unit.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    unit.close()
    raise RuntimeError("a unit of work suspended on the SQLite store's thread: it may await only its connection")


def _in_transaction(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """`fn` in BEGIN IMMEDIATE ... COMMIT, rolled back if anything fails (the COMMIT too)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _dicts(cursor: sqlite3.Cursor) -> Iterator[Row]:
    """Rows as dicts by column name (the connection keeps sqlite3's tuples, which sqlite-utils expects)."""
    names = [column[0] for column in cursor.description or ()]
    for row in cursor:
        yield dict(zip(names, row, strict=True))


def _schema_cookie(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA schema_version").fetchone()[0])
