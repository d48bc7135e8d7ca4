"""The audit chain keyed with HMAC (audit_key_env / audit_key_file): what `audit verify`
says with and without a key, and that someone who can write the database but lacks the
key cannot rewrite a row and recompute the chain undetected. Real SQLite, real bot."""
from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_AUDIT_KEY

from bot.domain.record import AuditRecord
from bot.store.base import GENESIS, StoreError, audit_hash
from bot.store.sqlite import SqliteStore
from bot.testing.workspace import cluster_table, write_config
from helpers import as_released, ephemeral, reply

KEY_ENV = "ETCD_CHATOPS_TEST_AUDIT_KEY"
OTHER_ENV = "ETCD_CHATOPS_TEST_OTHER_KEY"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bot", "audit", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert TEST_AUDIT_KEY not in proc.stdout + proc.stderr
    return proc


def variant(config: Path, name: str, key_env: str | None) -> Path:
    """The same configuration (same database) with another audit key, or none."""
    lines = [line for line in config.read_text().splitlines() if not line.startswith("audit_key_env")]
    path = config.with_name(name)
    path.write_text("\n".join(([f'audit_key_env = "{key_env}"'] if key_env else []) + lines) + "\n")
    return path


def rewrite(db_path: Path, first: int, last: int | None = None, unkey: bool = True, **change: str) -> None:
    """What an attacker with write access and no key can do: change row `first`, recompute
    the sha256 links from it through `last` (the end by default), and point the next row at them."""
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    prev = GENESIS
    for row in [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY id")]:
        if row["id"] == first:
            row.update(change)
        if first <= row["id"] <= (last or row["id"]):
            row.update(prev_hash=prev, hash=audit_hash(prev, AuditRecord.of(row)),
                       key_id="" if unkey else row["key_id"])
        elif row["id"] > first:
            row["prev_hash"] = prev
        db.execute("UPDATE audit SET user = ?, prev_hash = ?, hash = ?, key_id = ? WHERE id = ?",
                   [row["user"], row["prev_hash"], row["hash"], row["key_id"], row["id"]])
        prev = row["hash"]
    db.commit()
    db.close()


async def test_a_keyed_chain_verifies_and_a_rewrite_without_the_key_does_not(cluster, slack, start_bot, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv(KEY_ENV, TEST_AUDIT_KEY)
    monkeypatch.setenv(OTHER_ENV, "another-key-" + "0" * 32)
    await start_bot([cluster_table("prod", cluster)], audit_key_env=KEY_ENV)
    await reply(slack, "status")
    await ephemeral(slack, "frobnicate")
    config, db = tmp_path / "config.toml", tmp_path / "etcd-chatops.db"

    ok = cli(config, "verify")
    assert ok.returncode == 0 and ok.stdout == "audit log intact: 2 row(s), hash chain verified, keyed with HMAC\n"
    assert cli(config, "export").stdout.count('"key_id": "') == 2

    no_key = cli(variant(config, "no-key.toml", None), "verify")
    assert no_key.returncode == 1
    assert "row 1 is keyed with HMAC and no audit key is configured (audit_key_env or audit_key_file)" in no_key.stdout
    wrong_key = cli(variant(config, "wrong-key.toml", OTHER_ENV), "verify")
    assert wrong_key.returncode == 1
    assert "row 1 is keyed with another key than the configured audit key" in wrong_key.stdout

    rewrite(db, 2, unkey=False, user="U0INNOCENT")  # a changed row with a recomputed sha256 where the HMAC was
    assert "row 2: content does not match its hash" in cli(config, "verify").stdout
    rewrite(db, 2, user="U0INNOCENT")  # ... or passed off as an unkeyed row
    assert "row 2 is not keyed although row 1 before it is" in cli(config, "verify").stdout
    rewrite(db, 1, user="U0INNOCENT")  # the whole chain rewritten without the key
    whole = cli(config, "verify")
    assert whole.returncode == 1 and "no row is keyed although an audit key is configured" in whole.stdout
    # Without a key, that rewrite cannot be told from the truth: verify says so.
    unkeyed = cli(variant(config, "no-key.toml", None), "verify")
    assert unkeyed.returncode == 0 and unkeyed.stdout == (
        "audit log intact: 2 row(s), hash chain verified, "
        "unkeyed: anyone who can write the database can rewrite it undetected\n")


async def test_a_chain_written_without_a_key_then_with_one(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, TEST_AUDIT_KEY)
    db = tmp_path / "etcd-chatops.db"
    config = write_config(tmp_path, [{"name": "prod", "endpoints": ["http://127.0.0.1:1"]}], audit_key_env=KEY_ENV)
    store = await SqliteStore(db).open()
    for action in ("command", "refused"):
        await store.audit(action, user="U0ONCALL01")
    await store.close()

    store = await SqliteStore(db, audit_key=TEST_AUDIT_KEY).open()
    await store.continue_audit_chain()  # as the bot does at start: the chain is keyed from now on
    await store.audit("command", user="U0ONCALL01")
    assert [r.action for r in await store.audit_rows()] == ["command", "refused", "audit_keyed", "command"]
    assert await store.verify_audit() == (4, None) and await store.audit_keyed_from() == 3
    await store.close()
    ok = cli(config, "verify")
    assert ok.returncode == 0 and ok.stdout == (
        "audit log intact: 4 row(s), hash chain verified, keyed with HMAC from row 3 "
        "(the rows before it were written without a key; the keyed rows cover them)\n")

    # Neither a bot without the key nor one with another key may go on writing the chain.
    for key, problem in ((None, "no audit key is configured (audit_key_env or audit_key_file)"),
                         ("another-key-" + "0" * 32, "the configured audit key is not the one it was written with")):
        store = await SqliteStore(db, audit_key=key).open()
        try:
            expected = f"the audit chain is keyed with HMAC up to row 4, but {problem}"
            with pytest.raises(StoreError, match=re.escape(expected)):
                await store.continue_audit_chain()
            with pytest.raises(StoreError, match="keyed with HMAC up to row 4"):
                await store.audit("command", user="U0ONCALL01")
            assert len(await store.audit_rows()) == 4
        finally:
            await store.close()

    # The unkeyed rows are covered too: row 3's HMAC is over row 2's hash.
    rewrite(db, 1, last=2, user="U0INNOCENT")
    tampered = cli(config, "verify")
    assert tampered.returncode == 1 and "row 3: content does not match its hash" in tampered.stdout


async def test_a_database_from_before_the_key_and_plan_columns_opens_and_verifies(tmp_path):
    db = tmp_path / "etcd-chatops.db"
    store = await SqliteStore(db).open()
    await store.audit("command", user="U0ONCALL01")
    await store.close()
    as_released(db, added_columns=False)  # as the first release left it
    store = await SqliteStore(db, audit_key=TEST_AUDIT_KEY).open()
    try:
        await store.continue_audit_chain()
        assert await store.verify_audit() == (2, None) and await store.audit_keyed_from() == 2
        await store.snapshot_for_plan(1, "p1")  # the column is there (no such row: nothing changes)
    finally:
        await store.close()
