"""Off-site snapshots end to end: the upload streams while the snapshot is saved,
is verified by reading it back, survives the store going down (the local file
is kept, the failure is said, a later try uploads it), leaves nothing visible
when the bot is killed mid-upload (and the next start aborts the leftover), and
stores an encrypted snapshot encrypted. S3 is moto's real S3-protocol server on
loopback; `file://` is a directory. Real etcd, the real bot, the Slack stand-in."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519
from test_snapshots import fill

from bot.backup.manifest import Manifest
from bot.backup.object_store import OffsiteStore
from bot.config.offsite import StoreConfig
from bot.domain.snapshot import SnapshotFailed
from bot.etcd.bbolt import snapshot_status
from bot.etcd.client import EtcdClient
from bot.etcd.snapshot_stream import save_snapshot
from bot.testing.workspace import BotProcess, cluster_table, write_config
from helpers import eventually, must, reply, text_of

FILE_LINE = re.compile(r"\*File:\* `([^`]+)`")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- 1. upload while saving

async def test_the_upload_streams_while_the_snapshot_is_saved(make_cluster, s3, tmp_path):
    """Not uploaded after saving: a multipart upload is in progress while the local file is still a `.part`."""
    c = make_cluster(1)
    await fill(c, 60)  # ~64 MB
    store = OffsiteStore.from_config(StoreConfig(s3.url(), endpoint=s3.endpoint, region="us-east-1"))
    both_seen = False

    async with EtcdClient(c.endpoints) as client:
        save = asyncio.create_task(save_snapshot(client, c.endpoints[0], "member1", tmp_path, "prod",
                                                 upload=lambda name: store.begin_upload("prod", name)))

        async def uploading_while_saving() -> bool:
            nonlocal both_seen
            if save.done():
                return True
            parts = list((tmp_path / "prod").glob("*.part"))
            uploads = await asyncio.to_thread(s3.unfinished_uploads)
            both_seen = both_seen or bool(parts and uploads and list((tmp_path / "prod").glob("*.part")))
            return both_seen

        await eventually(uploading_while_saving, 60, "the upload to run while the .part file grows", interval=0.01)
        saved = await save
    assert both_seen, "no multipart upload was seen while the local file was being written"
    assert saved.upload_error is None and saved.remote_url == f"{s3.url()}/prod/{saved.path.name}"
    local = saved.path.read_bytes()
    assert s3.read(f"prod/prod/{saved.path.name}") == local and sha256(local) == saved.sha256
    assert s3.unfinished_uploads() == []


@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_save_that_fails_aborts_its_upload(make_cluster, s3, tmp_path, encrypted):
    """The member dies mid-stream: no local file, no visible object, no unfinished upload, no worker left."""
    c = make_cluster(1)
    await fill(c, 60)
    store = OffsiteStore.from_config(StoreConfig(s3.url(), endpoint=s3.endpoint, region="us-east-1"))
    recipients = (str(x25519.Identity.generate().to_public()),) if encrypted else ()
    async with EtcdClient(c.endpoints) as client:
        save = asyncio.create_task(save_snapshot(client, c.endpoints[0], "member1", tmp_path, "prod", recipients,
                                                 upload=lambda name: store.begin_upload("prod", name)))
        await eventually(lambda: save.done() or asyncio.to_thread(s3.unfinished_uploads), 60,
                         "the multipart upload to start", interval=0.01)
        c.kill("member1")
        with pytest.raises(SnapshotFailed, match="broke after"):
            await save
    assert s3.keys() == {} and s3.unfinished_uploads() == []
    assert not list((tmp_path / "prod").iterdir())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapshot-")]


# ---------------------------------------------------------------- 2. verified remotely, on S3 and on a directory

@pytest.mark.parametrize("kind", ["s3", "file"])
async def test_a_snapshot_is_stored_off_site_and_verified(make_cluster, slack, start_bot, tmp_path, request, kind):
    c = make_cluster(3)
    await fill(c, 8, value_size=256 * 1024, seed=3)
    if kind == "s3":
        s3 = request.getfixturevalue("s3")
        table, url = s3.store_table(), s3.url()
        remote_bytes = lambda name: s3.read(f"prod/prod/{name}")  # noqa: E731
    else:
        directory = request.getfixturevalue("file_store")
        table, url = {"url": f"file://{directory}"}, f"file://{directory}"
        remote_bytes = lambda name: (directory / "prod" / name).read_bytes()  # noqa: E731
    bot = await start_bot([cluster_table("prod", c, snapshots={"store": table})])

    msg = await reply(slack, "snapshot", timeout=60)
    text = text_of(msg)
    name = must(FILE_LINE.search(text))[1]
    assert f"stored at {url}/prod/{name} · verified remotely" in text, text
    assert f"stored at {url}/prod/{name} · verified remotely" in msg.text  # the notification text too
    (row,) = await bot.ctx.store.snapshots("prod")
    local = Path(row.path).read_bytes()
    assert remote_bytes(name) == local and sha256(local) == row.sha256
    manifest = Manifest.from_json(remote_bytes(name + ".manifest.json"))
    status = snapshot_status(Path(row.path))
    assert (manifest.cluster, manifest.file_name, manifest.sha256, manifest.size) == ("prod", name, row.sha256,
                                                                                      len(local))
    assert (manifest.hash, manifest.revision, manifest.total_keys, manifest.total_size) == \
        (status.hash_hex, status.revision, status.total_keys, status.total_size)
    assert manifest.member == row.member and not manifest.encrypted
    assert row.remote_state == "verified" and row.remote_url == f"{url}/prod/{name}"
    assert row.remote_verified_at >= row.created_at and row.remote_error is None


# ---------------------------------------------------------------- 3. the store down during the upload

async def test_the_store_down_mid_upload_keeps_the_local_snapshot_and_a_later_try_uploads_it(
        make_cluster, slack, start_bot, s3, tmp_path, fast_retries):
    c = make_cluster(1)
    await fill(c, 60)  # ~64 MB: the upload is under way when the store goes down
    bot = await start_bot([cluster_table("prod", c, snapshots={"store": s3.store_table()})])
    start = len(slack.messages)
    await slack.send_command("snapshot", user_id="U0ONCALL01", channel_id="C0INCIDENT")
    await eventually(lambda: asyncio.to_thread(s3.unfinished_uploads), 60, "the multipart upload to start",
                     interval=0.01)
    await asyncio.to_thread(s3.stop)
    msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=120,
                                       what="the snapshot's message")
    text = text_of(msg)
    name = must(FILE_LINE.search(text))[1]
    failure = re.search(r"off-site upload FAILED: (.*); the local snapshot is kept", text)
    assert failure and "\n" not in failure[1], text
    assert s3.secret_key not in text and s3.access_key not in text
    (row,) = await bot.ctx.store.snapshots("prod")
    path = Path(row.path)
    assert path.name == name and sha256(path.read_bytes()) == row.sha256  # kept, whole
    assert row.remote_state == "failed" and row.remote_error == failure[1]

    await asyncio.to_thread(s3.start)  # back (same port, same bucket)
    assert s3.keys() == {}  # nothing visible; the upload could not be aborted while the store was down
    c.etcdctl("put", "/next", "x")
    text = text_of(await reply(slack, "snapshot", timeout=120))
    assert "verified remotely" in text, text
    rows = await bot.ctx.store.snapshots("prod")
    assert [r.remote_state for r in rows] == ["verified", "verified"]  # the failed one was uploaded again
    assert s3.unfinished_uploads() == []  # and the interrupted upload aborted before the next one
    assert s3.read(f"prod/prod/{name}") == path.read_bytes()
    actions = [r.action for r in await bot.ctx.store.audit_rows()]
    assert actions.count("snapshot_offsite_failed") == 1 and actions.count("snapshot_offsite") == 2
    everything = json.dumps([dataclasses.asdict(r) for r in await bot.ctx.store.audit_rows()])
    assert s3.secret_key not in everything and s3.access_key not in everything


# ---------------------------------------------------------------- 4. the bot killed mid-upload

async def test_a_bot_killed_mid_upload_leaves_no_object_and_the_next_start_aborts_the_upload(
        make_cluster, slack, creds, s3, tmp_path):
    c = make_cluster(1)
    await fill(c, 60)
    # the killed bot's hold on the cluster's snapshot lease lapses after lease_seconds (3 s, not the default 10 s)
    config = write_config(tmp_path, [cluster_table("prod", c, snapshots={"store": s3.store_table()})],
                          replicas={"lease_seconds": 3})
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
    try:
        slack.bot_url = bot.url
        await slack.send_command("snapshot", user_id="U0ONCALL01", channel_id="C0INCIDENT")
        await eventually(lambda: asyncio.to_thread(s3.unfinished_uploads), 60, "the multipart upload to start",
                         interval=0.01)
        bot.kill()  # SIGKILL mid-upload
        assert s3.keys() == {}, "a killed upload must not leave a visible object"
        assert len(s3.unfinished_uploads()) == 1  # S3 keeps the parts until someone aborts

        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
        slack.bot_url = bot.url
        c.etcdctl("put", "/next", "x")
        text = text_of(await reply(slack, "snapshot", timeout=120))
        assert "verified remotely" in text, text
    finally:
        await asyncio.to_thread(bot.stop)
    assert s3.unfinished_uploads() == []  # the leftover was aborted
    name = must(FILE_LINE.search(text))[1]
    assert set(s3.keys()) == {f"prod/prod/{name}", f"prod/prod/{name}.manifest.json"}
    assert "aborted unfinished uploads" in (tmp_path / "bot.log").read_text()


# ---------------------------------------------------------------- 5. encrypted stays encrypted

async def test_an_encrypted_snapshot_is_stored_encrypted(make_cluster, slack, start_bot, s3):
    c = make_cluster(1)
    values = await fill(c, 4, value_size=256 * 1024, seed=9)
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    bot = await start_bot([cluster_table("prod", c, snapshots={"store": s3.store_table(),
                                                                "age_recipients": [recipient]})])
    text = text_of(await reply(slack, "snapshot", timeout=60))
    name = must(FILE_LINE.search(text))[1]
    assert name.endswith(".db.age") and "verified remotely" in text, text
    remote = s3.read(f"prod/prod/{name}")
    assert remote.startswith(b"age-encryption.org/v1\n")
    assert not any(v[:64] in remote for v in values), "plaintext values in the stored object"
    (row,) = await bot.ctx.store.snapshots("prod")
    assert remote == Path(row.path).read_bytes() and sha256(remote) == row.sha256
    magic = bytes.fromhex("edda0ced")  # bbolt's (0xED0CDAED, little-endian) in the first meta page
    plain = pyrage.decrypt(remote, [identity])
    assert plain[16:20] == magic and magic not in remote[:8192]
    assert all(v[:64] in plain for v in values)
    manifest = Manifest.from_json(s3.read(f"prod/prod/{name}.manifest.json"))
    assert manifest.encrypted and len(manifest.recipients) == 1 and recipient not in manifest.to_json()


# ---------------------------------------------------------------- 6. keep_local

async def test_keep_local_drops_local_copies_verified_off_site(make_cluster, slack, start_bot, file_store):
    c = make_cluster(1)
    bot = await start_bot([cluster_table("prod", c, snapshots={"store": {"url": f"file://{file_store}",
                                                                         "keep_local": 1}})])
    names = []
    for key in ("/a", "/b"):
        c.etcdctl("put", key, "x")
        text = text_of(await reply(slack, "snapshot", timeout=60))
        assert "verified remotely" in text, text
        names.append(must(FILE_LINE.search(text))[1])
    rows = await bot.ctx.store.snapshots("prod", include_pruned=True)
    by_name = {Path(r.path).name: r for r in rows}
    assert not Path(by_name[names[0]].path).exists() and by_name[names[0]].pruned_at is not None
    assert Path(by_name[names[1]].path).exists() and by_name[names[1]].pruned_at is None
    assert all(r.remote_state == "verified" for r in rows)
    assert sorted(p.name for p in (file_store / "prod").iterdir() if not p.name.endswith(".json")) == sorted(names)
