"""The memberships the bot records (endpoint-drift fallback; later, restore's "last membership")."""
from __future__ import annotations

import sqlite3

from bot.etcd.model import Member
from helpers import open_store


def _members(*names: str) -> list[dict]:
    return [Member(i + 1, n, (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",)).to_json()
            for i, n in enumerate(names)]


async def test_one_row_per_change_and_the_last_one_wins(tmp_path):
    async with open_store(tmp_path) as store:
        assert await store.last_membership("prod") is None
        await store.record_membership("prod", _members("member1", "member2"))
        first = await store.last_membership("prod")
        await store.record_membership("prod", list(reversed(_members("member1", "member2"))))  # same membership
        again = await store.last_membership("prod")
        assert first is not None and again is not None
        assert again[0] == first[0] and again[1] >= first[1]
        await store.record_membership("prod", _members("member1", "member3"))
        await store.record_membership("staging", _members("s1"))
        members, _ = await store.last_membership("prod")
        assert [Member.from_json(m).name for m in members] == ["member1", "member3"]
        with sqlite3.connect(tmp_path / "etcd-chatops.db") as db:  # a row per change, not per check
            clusters = [r[0] for r in db.execute("SELECT cluster FROM memberships ORDER BY id")]
            assert clusters == ["prod", "prod", "staging"]
    async with open_store(tmp_path) as store:  # it survives a restart
        members, _ = await store.last_membership("prod")
        assert Member.from_json(members[1]) == Member(2, "member3", ("http://10.0.0.1:2380",), ("http://10.0.0.1:2379",))
