"""The backup-missed condition: no verified snapshot within twice the schedule, or a failed off-site upload."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from bot.config import ClusterConfig, SnapshotPolicy
from bot.domain.snapshot import NewSnapshot, SnapshotRecord
from bot.testing.slack import Message
from bot.testing.workspace import CHANNEL, cluster_table
from bot.watch.backups import PROBE, Catalog, backup_missed
from bot.watch.conditions import Facts
from helpers import eventually, reply, snapshot_record, text_of

HOUR = 3600.0
NOW = 1_000_000.0
SCHEDULED = ClusterConfig(name="prod", endpoints=("http://10.0.0.1:2379",),
                          snapshots=SnapshotPolicy(every_seconds=HOUR))


def snap(age: float, **more: Any) -> SnapshotRecord:
    return snapshot_record(id=1, path=f"/snapshots/prod/prod-{int(age)}.db", created_at=NOW - age, revision=7, **more)


def facts(*rows: SnapshotRecord, since: float = NOW - 10 * HOUR, cluster: ClusterConfig = SCHEDULED,
          read: bool = True) -> Facts:
    return Facts(cluster=cluster, now=NOW, health=None, newest_snapshot=rows[0] if rows else None,
                 extra={PROBE: Catalog(since, rows)} if read else {})


def test_a_snapshot_within_twice_the_schedule_is_enough() -> None:
    assert backup_missed(facts(snap(1.5 * HOUR))) == []
    assert backup_missed(facts(snap(2 * HOUR - 1))) == []


def test_older_than_twice_the_schedule_is_missed_and_suggests_a_snapshot() -> None:
    [found] = backup_missed(facts(snap(2.5 * HOUR), snap(3.5 * HOUR))) or []
    assert found.key == ("backup_missed", "schedule")
    assert "prod-9000.db, 2.5 h old" in dict(found.figures)["newest verified snapshot"]
    assert found.suggestions[0] == "/etcd snapshot prod"


def test_without_any_snapshot_the_watch_counts_from_when_it_started() -> None:
    assert backup_missed(facts(since=NOW - HOUR)) == []
    [found] = backup_missed(facts(since=NOW - 3 * HOUR)) or []
    assert "none recorded" in dict(found.figures)["newest verified snapshot"]


def test_a_failed_last_upload_is_a_missed_backup_until_a_later_one_is_verified() -> None:
    failed = snap(600, remote_state="failed", remote_error="AccessDenied: bucket policy")
    [found] = backup_missed(facts(failed)) or []
    assert found.key == ("backup_missed", "upload") and "AccessDenied: bucket policy" in found.summary
    # an upload still running says nothing yet; the last one that ended counts
    assert backup_missed(facts(snap(60, remote_state="uploading"), failed)) == [found]
    assert backup_missed(facts(snap(60, remote_state="verified"), failed)) == []
    assert backup_missed(facts(snap(60, remote_state=""), snap(600))) == []  # no off-site copies configured


def test_only_clusters_with_a_schedule_and_only_once_the_catalog_was_read() -> None:
    unscheduled = replace(SCHEDULED, snapshots=SnapshotPolicy())
    assert backup_missed(facts(cluster=unscheduled, since=NOW - 100 * HOUR)) == []
    assert backup_missed(facts(snap(5 * HOUR), read=False)) is None


# ---------------------------------------------------------------- the real bot

def backup_alert(slack) -> Message | None:
    """The backup-missed alert's message in the channel (not a thread reply)."""
    return next((m for m in slack.messages if m.channel == CHANNEL and m.thread_ts is None
                 and "BACKUP MISSED" in text_of(m)), None)


def resolved_in_thread(slack, alert: Message) -> list[Message]:
    return [m for m in slack.messages if m.thread_ts == alert.ts and "resolved" in text_of(m).lower()]


async def test_no_snapshot_within_the_schedule_raises_backup_missed_and_a_snapshot_resolves_it(
        make_cluster, slack, start_bot, tmp_path) -> None:
    from bot.store.sqlite import SqliteStore
    c = make_cluster(1)
    # The last snapshot is an hour old, and the schedule (every minute) cannot write: its directory is a file.
    store = await SqliteStore(tmp_path / "etcd-chatops.db").open()
    await store.record_snapshot(NewSnapshot(
        cluster="nightly", path=str(tmp_path / "old.db"), member="member1", revision=1, hash="0",
        total_keys=1, live_keys=None, total_size=1, file_size=1, sha256="0", encrypted=False,
        requested_by="the schedule", reason="scheduled", duration=0.1, created_at=time.time() - HOUR))
    await store.close()
    (tmp_path / "snapshots").mkdir()
    blocker = tmp_path / "snapshots" / "nightly"
    blocker.write_text("not a directory")
    await start_bot([cluster_table("nightly", c, snapshots={"every": "1m"},
                                   watch={"interval": "1s", "grace": "1s"})])

    msg = await eventually(lambda: backup_alert(slack), 30, "the backup-missed alert")
    shown = text_of(msg)
    assert "nightly" in shown and "/etcd snapshot nightly" in shown and "old.db" in shown, shown
    assert "every 1 min" in shown
    blocker.unlink()
    answer = await reply(slack, "snapshot nightly", timeout=60)
    assert "verified" in text_of(answer), text_of(answer)
    resolved = await eventually(lambda: resolved_in_thread(slack, msg), 30, "the alert resolved in its thread")
    assert len(resolved) == 1
    assert len([m for m in slack.messages if m.thread_ts is None and "BACKUP MISSED" in text_of(m)]) == 1


async def test_a_failed_upload_raises_backup_missed_and_a_verified_upload_resolves_it(
        make_cluster, slack, start_bot, s3, fast_retries) -> None:
    """The off-site store is down when the schedule takes its first snapshot: the alert names the
    upload failure (one line, no credentials); the store back, `/etcd snapshot` uploads and verifies,
    and the alert resolves in its thread."""
    c = make_cluster(1)
    await asyncio.to_thread(s3.stop)
    bot = await start_bot([cluster_table("nightly", c, snapshots={"every": "1h", "store": s3.store_table()},
                                         watch={"interval": "1s", "grace": "1s"})])
    msg = await eventually(lambda: backup_alert(slack), 60, "the backup-missed alert")
    shown = text_of(msg)
    (row,) = await bot.ctx.store.snapshots("nightly")
    name = row.path.rsplit("/", 1)[-1]
    assert row.remote_state == "failed" and row.requested_by == "the schedule", row
    assert f"the off-site upload of {name} failed: {row.remote_error}" in shown, shown
    assert "\n" not in row.remote_error and "/etcd snapshot nightly" in shown
    assert s3.secret_key not in shown and s3.access_key not in shown

    await asyncio.to_thread(s3.start)  # back (same port, same bucket)
    c.etcdctl("put", "/next", "x")
    answer = text_of(await reply(slack, "snapshot nightly", timeout=120))
    assert "verified remotely" in answer, answer
    resolved = await eventually(lambda: resolved_in_thread(slack, msg), 30, "the alert resolved in its thread")
    assert len(resolved) == 1
    assert [m.ts for m in slack.messages if m.thread_ts is None and "BACKUP MISSED" in text_of(m)] == [msg.ts]
    assert [r.remote_state for r in await bot.ctx.store.snapshots("nightly")] == ["verified", "verified"]
