"""The configured backend: a path is SQLite, a postgresql:// URL PostgreSQL (base.py is the contract they keep)."""
from __future__ import annotations

from bot.config import Config
from bot.store.base import Store


def store_for(config: Config) -> Store:
    """The configured backend, not yet opened: a path is SQLite, a postgresql:// URL PostgreSQL."""
    if isinstance(config.database, str):
        from bot.store.postgres import PostgresStore
        return PostgresStore(config.database, password=config.database_password,
                             timeout=config.database_timeout_seconds, audit_key=config.audit_key)
    from bot.store.sqlite import SqliteStore
    return SqliteStore(config.database, busy_timeout=config.database_timeout_seconds, audit_key=config.audit_key)


async def open_store(config: Config) -> Store:
    """store_for(config), opened (closed again if opening fails)."""
    store = store_for(config)
    try:
        return await store.open()
    except BaseException:
        await store.close()
        raise
