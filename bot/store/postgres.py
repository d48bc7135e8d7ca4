"""The store in PostgreSQL, shared by several replicas (the logic is sql.py's;
the contract base.py's; the tables and columns are SQLite's, one name for one thing).

Driver: psycopg 3 with psycopg-pool. It is asyncio-native (no thread per
call), binds parameters on the server (no SQL built from values), and the
pool checks a connection before handing it out, so after PostgreSQL restarts
the first call fails with one line and the next one reconnects. (asyncpg is
as fast but has its own placeholder dialect and no libpq: no PG* environment,
no .pgpass, no service files, which operators expect of a PostgreSQL client.)

Connections are in autocommit; a unit of work that asks for a transaction gets
one. A writer waits 3x `timeout` for a lock (a row, an advisory lock) before
StoreBusy, as SQLite's three tries; nothing is retried.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.adapt import AdaptersMap, Dumper
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bot.config import dsn
from bot.store.base import StoreBusy, StoreError
from bot.store.dialect import POSTGRESQL
from bot.store.sql import Conflict, Connection, R, Row, SqlStore, Work

T = TypeVar("T")
Conn = psycopg.AsyncConnection[dict[str, Any]]


class _FlagDumper(Dumper):
    """A Python bool as the schema's INTEGER 0/1 flags (`encrypted`, `ok`), as SQLite binds it."""

    oid = psycopg.postgres.types["int4"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


ADAPTERS = AdaptersMap(psycopg.adapters)
ADAPTERS.register_dumper(bool, _FlagDumper)

log = logging.getLogger(__name__)
# How long open() waits for its pool's first connection (milliseconds, usually). Beside a busy CPU one took
# over 1 s: a store that may not open then would keep the bot from starting, so past this it opens anyway.
WARM_UP_SECONDS = 5.0


@lru_cache(maxsize=512)
def _placeholders(query: str) -> str:
    """sql.py's `?` as psycopg's `%s` (and a literal % doubled)."""
    return query.replace("%", "%%").replace("?", "%s")


class PostgresConnection(Connection):
    def __init__(self, conn: Conn, error: Callable[[psycopg.Error], StoreError]):
        self._conn, self._error = conn, error

    async def rows(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return await (await self._conn.execute(_placeholders(query), params)).fetchall()

    async def execute(self, query: str, params: Sequence[Any] = (), *, savepoint: bool = False) -> int:
        try:
            if savepoint:
                async with self._conn.transaction():
                    return (await self._conn.execute(_placeholders(query), params)).rowcount
            return (await self._conn.execute(_placeholders(query), params)).rowcount
        except errors.UniqueViolation as e:
            raise Conflict(str(self._error(e))) from None

    async def lock(self, key: int, name: str = "") -> None:
        if name:
            await self._conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [key, name])
        else:
            await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [key])

    async def scan(self, query: str, params: Sequence[Any], until: Callable[[Row], R | None]) -> R | None:
        async with self._conn.transaction(), self._conn.cursor(name="scan") as cur:  # a server-side cursor
            await cur.execute(_placeholders(query), params)
            async for row in cur:
                if (answer := until(row)) is not None:
                    return answer
        return None

    async def columns(self) -> dict[str, set[str]]:
        have: dict[str, set[str]] = {}
        for r in await self.rows("SELECT table_name, column_name FROM information_schema.columns "
                                 "WHERE table_schema = current_schema()"):
            have.setdefault(r["table_name"], set()).add(r["column_name"])
        return have


class PostgresStore(SqlStore):
    """One pool per store; a unit of work takes a connection for its duration."""

    dialect = POSTGRESQL

    def __init__(self, url: str, *, password: str | None = None, timeout: float = 5.0, pool_size: int = 8,
                 audit_key: str | None = None):
        self.url = dsn.check_url(url)
        super().__init__(dsn.redact(url), audit_key)
        self.timeout = timeout
        self._secrets = [s for s in [*dsn.secrets_of(url), password] if s]
        self._kwargs: dict[str, Any] = {
            "autocommit": True, "row_factory": dict_row, "context": ADAPTERS, "application_name": "etcd-chatops",
            "connect_timeout": max(1, round(timeout)),
            # A writer waits 3x timeout for a lock (the audit tail, a plan row) before StoreBusy, as SQLite's
            # 3 tries; no statement runs longer than 6x; a server gone silent (no RST) is noticed within ~15 s.
            "options": f"-c lock_timeout={int(timeout * 3000)} -c statement_timeout={int(timeout * 6000)}",
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": int(timeout * 3000),
            **({"password": password} if password else {})}
        self._pool_size = pool_size
        self._pool: AsyncConnectionPool[Conn] | None = None

    async def open(self) -> PostgresStore:
        """Connect once directly (so a refusal reads as PostgreSQL's own one line, not a pool
        timeout), migrate, then start the pool and wait for its first connection (up to WARM_UP_SECONDS):
        the first call is not the one that pays for connecting, within its shorter deadline. A pool
        slower than that is no failure to open: it keeps connecting, as the calls wait for it."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **self._kwargs)
        except psycopg.Error as e:
            raise StoreError(f"database {self.name}: {self._line(e)}") from None
        try:
            async with conn, conn.transaction():
                await self._migrate(PostgresConnection(conn, self._error))
        except psycopg.Error as e:
            raise self._error(e) from None
        self._pool = pool = self._new_pool()
        await pool.open(wait=False)
        try:
            async with pool.connection(timeout=WARM_UP_SECONDS):
                pass
        except (PoolTimeout, psycopg.Error) as e:
            log.warning("database: the pool holds no connection yet; the first calls wait for one",
                        extra={"ctx_database": self.name, "ctx_waited": WARM_UP_SECONDS,
                               "ctx_error": self._line(e)})
        return self

    def _new_pool(self) -> AsyncConnectionPool[Conn]:
        return AsyncConnectionPool(self.url, kwargs=self._kwargs, min_size=1, max_size=self._pool_size, open=False,
                                   check=AsyncConnectionPool.check_connection, timeout=self.timeout,
                                   name="etcd-chatops", reconnect_timeout=60)

    async def _renew_pool(self, failed: AsyncConnectionPool[Conn]) -> None:
        """After a call found no connection: a fresh pool, so reconnecting starts again at once
        (the pool's own retries back off to many seconds during a long outage, and would keep
        the bot failing that long after PostgreSQL is back). Once per failed pool: the swap
        happens before any await, so concurrent failures do not make several."""
        if self._pool is not failed:
            return
        self._pool = fresh = self._new_pool()
        await fresh.open(wait=False)
        await failed.close(timeout=1.0)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _line(self, e: BaseException) -> str:
        """PostgreSQL's message in one line, with any password scrubbed (libpq does not echo
        it, but a URL in a message would)."""
        text = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(self.url, self.name)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _error(self, e: psycopg.Error) -> StoreError:
        if isinstance(e, errors.LockNotAvailable):
            return StoreBusy(f"database {self.name}: a lock is held by another writer "
                             f"(waited {self.timeout * 3:g}s); nothing was changed")
        return StoreError(f"database {self.name}: {self._line(e)}")

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; every driver error leaves as one StoreError line."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"database {self.name} is not open")
        try:
            async with pool.connection(timeout=self.timeout) as conn:
                yield conn
        except PoolTimeout:
            await self._renew_pool(pool)
            raise StoreError(f"database {self.name}: no connection within {self.timeout:g}s "
                             "(PostgreSQL down or unreachable?)") from None
        except psycopg.Error as e:
            raise self._error(e) from None

    async def _run(self, work: Work[T], *, transaction: bool = False) -> T:
        async with self._conn() as conn:
            if transaction:
                async with conn.transaction():
                    return await work(PostgresConnection(conn, self._error))
            return await work(PostgresConnection(conn, self._error))
