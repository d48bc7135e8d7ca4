"""The snapshot store is not trusted: an object the bot did not write is *foreign*. Someone with write
access to the bucket plants a snapshot of their own etcd with a manifest dated 2030; the bot lists it as
foreign, never picks it by default, never drills it by default nor catalogues it, restores it only when
named with --force (and the plan says so first), and a cluster that encrypts refuses a plaintext object.
Real etcd, the real bot, the Slack stand-in, moto's S3 server or a `file://` directory."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from conftest import TEST_AUDIT_KEY, TEST_MANIFEST_KEY
from pyrage import x25519
from test_restore_e2e import approve_twice, keys

from bot.backup.manifest import Manifest
from bot.domain.restore import RestorePlan
from bot.etcd.bbolt import snapshot_status
from bot.testing.workspace import CHANNEL, LEAD, cluster_table
from helpers import APPROVAL, ephemeral, must, plan_of, plan_row, propose, reply, text_of, wait_done, wait_state

KEY_ENV = "ETCD_CHATOPS_TEST_AUDIT_KEY"
IN_2030 = 1893456000.0


def plant(put: Callable[[str, bytes], None], etcd, directory: Path, name: str, *, created_at: float = IN_2030,
          key: str | None = None) -> Manifest:
    """What someone with write access to the store does: a snapshot of `etcd` (their own, saved with
    etcdctl) as `name` in cluster prod's prefix, with a manifest that describes it exactly, signed with
    `key` when given (a key they should not have, or the right one to isolate another rule)."""
    path = directory / name
    etcd.etcdctl("snapshot", "save", str(path), endpoints=etcd.endpoints[:1])
    data = path.read_bytes()
    st = snapshot_status(path)
    manifest = Manifest(cluster="prod", file_name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                        hash=st.hash_hex, revision=st.revision, total_keys=st.total_keys,
                        total_size=st.total_size, member="member1", created_at=created_at)
    if key is not None:
        manifest = manifest.signed(key)
    put(name, data)
    put(name + ".manifest.json", manifest.to_json().encode())
    return manifest


def s3_put(s3) -> Callable[[str, bytes], None]:
    return lambda name, data: s3.client().put_object(Bucket=s3.bucket, Key=f"prod/prod/{name}", Body=data)


async def test_a_planted_object_is_foreign_never_the_default_and_restored_only_by_name_with_force(
        make_cluster, slack, start_bot, s3, tmp_path, monkeypatch, cli):
    monkeypatch.setenv(KEY_ENV, TEST_AUDIT_KEY)   # the audit key signs the manifests (no manifest key of its own)
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, snapshots={"store": s3.store_table()})], approval=APPROVAL,
                          audit_key_env=KEY_ENV)
    store = bot.ctx.store
    c.etcdctl("put", "/registry/ours", "1")
    assert "verified remotely" in text_of(await reply(slack, "snapshot", timeout=60))
    ours = keys(c)
    (own,) = await store.snapshots("prod")
    mine = Path(own.path).name
    evil = make_cluster(1, prefix="evil")
    evil.etcdctl("put", "/registry/attacker", "owned")
    planted = "prod-20300101T000000Z-rev99.db"
    plant(s3_put(s3), evil, tmp_path, planted)

    # listed as foreign, dated when the store received it (not by the 2030 its manifest claims)
    listing = (await reply(slack, "snapshots")).text
    line = next(x for x in listing.splitlines() if planted in x)
    assert "FOREIGN" in line and "its manifest is not signed" in line and "2030-01-01" not in line, listing
    assert "FOREIGN" not in next(x for x in listing.splitlines() if mine in x)
    listed = cli("snapshot", "list", "--config", str(tmp_path / "config.toml"), "--json")
    assert listed.returncode == 0, listed.stderr
    (view,) = json.loads(listed.stdout)
    assert {s["name"]: bool(s["foreign"]) for s in view["snapshots"]} == {mine: False, planted: True}
    assert next(s for s in view["snapshots"] if s["name"] == planted)["created_at"] < IN_2030
    fetched = cli("snapshot", "fetch", planted, "--dir", str(tmp_path / "got"), "--config",
                  str(tmp_path / "config.toml"))
    assert fetched.returncode == 0 and f"{planted} is FOREIGN, not taken by this bot" in fetched.stderr

    # a drill takes the bot's own; named, the foreign one is drilled but never catalogued
    drilled = await reply(slack, "drill", timeout=120)
    assert "passed" in drilled.text and mine in drilled.text, drilled.text
    named = await reply(slack, f"drill {planted}", timeout=120)
    assert "FOREIGN" in named.text and "not added to the catalog" in named.text, named.text
    assert [r.id for r in await store.snapshots("prod", include_pruned=True)] == [own.id]
    assert list(await store.last_drills("prod")) == [own.id]

    c.kill("member1")
    c.kill("member2")
    refused = await ephemeral(slack, f"restore {planted}")
    assert "is foreign, not a snapshot this bot took" in refused.text and "--force" in refused.text, refused.text
    assert await store.open_plan("prod") is None
    forced = await propose(slack, f"restore {planted} --force")
    assert forced.text.splitlines()[0].startswith(f"Restore prod from FOREIGN snapshot (not taken by this bot) "
                                                  f"{planted} (revision ")
    assert f"Plan {(await plan_row(store, forced)).id}, proposed by" in forced.text
    assert "FOREIGN snapshot (not taken by this bot)" in must(forced.blocks)[0]["text"]["text"]
    assert "this bot did not take" in must(forced.blocks)[1]["text"]["text"]
    record = await plan_row(store, forced)
    await slack.react(user=LEAD, channel=CHANNEL, ts=forced.ts, reaction="x")
    await wait_state(store, record.id, ("rejected",), timeout=30)

    plan = await propose(slack, "restore")
    record = await plan_row(store, plan)
    assert plan_of(RestorePlan, record).snapshot.file_name == mine and "FOREIGN" not in plan.text
    await approve_twice(slack, plan)
    await wait_done(store, record.id, timeout=180)
    assert keys(c) == ours and "/registry/attacker" not in keys(c)


async def test_a_cluster_that_encrypts_refuses_a_plaintext_object(cluster, slack, start_bot, s3, tmp_path,
                                                                   manifest_key):
    """Even one signed with the bot's own key (an object written before encryption was turned on, then lost
    from the catalog): the catalog never recorded it, so a restore or drill of it is refused."""
    identity = x25519.Identity.generate()
    await start_bot([cluster_table("prod", cluster, snapshots={
        "age_recipients": [str(identity.to_public())], "store": s3.store_table(**manifest_key)})])
    signed = plant(s3_put(s3), cluster, tmp_path, "prod-20261201T000000Z-rev5.db", created_at=1.7e9,
                   key=TEST_MANIFEST_KEY)
    unsigned = plant(s3_put(s3), cluster, tmp_path, "prod-20261202T000000Z-rev6.db", created_at=1.7e9)
    for text in (f"restore {signed.file_name} --force", f"drill {signed.file_name}",
                 f"restore {unsigned.file_name} --force", f"drill {unsigned.file_name}"):
        refused = await ephemeral(slack, text, timeout=30)
        assert "is plaintext, this cluster encrypts its snapshots (age_recipients)" in refused.text, (text,
                                                                                                      refused.text)
    listing = (await reply(slack, "snapshots")).text
    assert listing.count("FOREIGN") == 1 and unsigned.file_name in listing and signed.file_name in listing


async def test_a_drill_verifies_before_it_catalogues_and_a_failed_one_catalogues_nothing(
        cluster, slack, start_bot, file_store, tmp_path, manifest_key):
    table = cluster_table("prod", cluster, snapshots={"store": {"url": f"file://{file_store}", **manifest_key}})
    await start_bot([table])
    cluster.etcdctl("put", "/drill/catalogue", "x")
    await reply(slack, "snapshot", timeout=60)
    name = next(p.name for p in (file_store / "prod").iterdir() if p.name.endswith(".db"))
    # the bot's volume is lost: a new bot, an empty catalog, the same key
    bot = await start_bot([table], database=str(tmp_path / "new.db"), snapshot_dir=str(tmp_path / "new-snapshots"))
    default = await ephemeral(slack, "drill")
    assert f"the store holds 1 it wrote, the newest {name}" in default.text, default.text  # never by default
    obj = file_store / "prod" / name
    good = obj.read_bytes()
    obj.write_bytes(good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1:])
    failed = await reply(slack, f"drill {name}", timeout=120)
    assert "FAILED" in failed.text and "not the snapshot recorded" in failed.text, failed.text
    assert await bot.ctx.store.snapshots("prod", include_pruned=True) == []   # not catalogued, not "verified"
    obj.write_bytes(good)
    passed = await reply(slack, f"drill {name}", timeout=120)
    assert "passed" in passed.text and "FOREIGN" not in passed.text, passed.text
    (row,) = await bot.ctx.store.snapshots("prod", include_pruned=True)
    assert row.reason == "found in the store" and row.remote_state == "verified"
