"""The catalog of both places, end to end: `/etcd snapshots` and `snapshot list` show where each copy is,
retention prunes both places but never the newest verified remote copy, `snapshot fetch` verifies what it
downloads and refuses a tampered object, a bot that lost its volume lists the store from the manifests,
and restore and drills use a snapshot fetched from the store. S3 is moto's S3-protocol server on loopback;
`file://` is a directory. Real etcd, the real bot, the Slack stand-in."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from test_restore_e2e import approve_twice, hashes, keys

from bot.backup.manifest import Manifest
from bot.domain.restore import RestorePlan
from bot.testing.workspace import cluster_table
from helpers import APPROVAL, eventually, plan_of, plan_row, propose, reply, text_of, thread, wait_done

FILE_LINE = re.compile(r"\*File:\* `([^`]+)`")


class Place:
    """The store a test runs against: its [snapshots.store] table, its URL, and its objects' bytes."""

    def __init__(self, request, kind: str):
        self.kind = kind
        key = request.getfixturevalue("manifest_key")   # the bot signs its manifests: a new bot knows them again
        if kind == "s3":
            self.s3 = request.getfixturevalue("s3")
            self.table, self.url = self.s3.store_table(**key), self.s3.url()
        else:
            self.dir = request.getfixturevalue("file_store")
            self.table, self.url = {"url": f"file://{self.dir}", **key}, f"file://{self.dir}"

    def names(self) -> set[str]:
        """The objects of cluster prod (manifests included)."""
        if self.kind == "s3":
            return {k.rsplit("/", 1)[-1] for k in self.s3.keys("prod/prod/")}
        return {p.name for p in (self.dir / "prod").iterdir()}

    def read(self, name: str) -> bytes:
        return self.s3.read(f"prod/prod/{name}") if self.kind == "s3" else (self.dir / "prod" / name).read_bytes()

    def overwrite(self, name: str, data: bytes) -> None:
        """Change an object behind the bot's back (through boto3, or the directory)."""
        if self.kind == "s3":
            self.s3.client().put_object(Bucket=self.s3.bucket, Key=f"prod/prod/{name}", Body=data)
        else:
            (self.dir / "prod" / name).write_bytes(data)


def tampered(data: bytes) -> bytes:
    """The same size, one byte changed in the middle (inside a page)."""
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


async def snapshot_name(slack, cluster) -> str:
    cluster.etcdctl("put", f"/catalog/{os.urandom(4).hex()}", "x")  # a new revision: a new file name
    msg = await reply(slack, "snapshot", timeout=90)
    text = text_of(msg)
    found = FILE_LINE.search(text)
    assert found and "verified remotely" in text, text
    return found[1]


@pytest.mark.parametrize("kind", ["s3", "file"])
async def test_both_places_are_listed_pruned_and_fetched_verified(cluster, slack, start_bot, request, tmp_path,
                                                                  cli, kind):
    place = Place(request, kind)
    table = cluster_table("prod", cluster, snapshots={"store": {**place.table, "keep_local": 1}, "keep_last": 2})
    bot = await start_bot([table])
    store = bot.ctx.store
    s1, s2, s3 = [await snapshot_name(slack, cluster) for _ in range(3)]

    # keep_last 2: the oldest goes from both places; keep_local 1: the middle one stays only off-site
    rows = {Path(r.path).name: r for r in await store.snapshots("prod", include_pruned=True)}
    assert rows[s1].pruned_at and rows[s1].remote_pruned_at
    assert rows[s2].pruned_at and not rows[s2].remote_pruned_at and rows[s2].remote_state == "verified"
    assert not rows[s3].pruned_at and not rows[s3].remote_pruned_at
    assert place.names() == {s2, s2 + ".manifest.json", s3, s3 + ".manifest.json"}  # object and manifest gone
    audit = [r for r in await store.audit_rows() if r.action == "snapshot_pruned_remote"]
    assert [json.loads(r.detail)["file"] for r in audit] == [s1]

    listing = text_of(await reply(slack, "snapshots"))
    line = {n: next(x for x in listing.splitlines() if n in x) for n in (s2, s3)}
    assert "local + :cloud: remote (verified)" in line[s3] and ":cloud: remote only (verified)" in line[s2]
    assert s1 not in listing and f"store `{place.url}/prod/`" in listing

    config = str(tmp_path / "config.toml")
    listed = cli("snapshot", "list", "--config", config, "--cluster", "prod", "--json")
    assert listed.returncode == 0, listed.stderr
    (view,) = json.loads(listed.stdout)
    assert [(s["name"], s["place"], s["remote_state"]) for s in view["snapshots"]] == [
        (s3, "both", "verified"), (s2, "remote", "verified")]
    table_out = cli("snapshot", "list", "--config", config)
    assert table_out.returncode == 0 and s2 in table_out.stdout and "WHERE" in table_out.stdout

    # fetch: downloaded, verified against the manifest, 0600
    fetched = cli("snapshot", "fetch", s2, "--dir", str(tmp_path / "got"), "--config", config)
    assert fetched.returncode == 0, fetched.stderr
    got = tmp_path / "got" / s2
    assert hashlib.sha256(got.read_bytes()).hexdigest() == rows[s2].sha256
    assert stat.S_IMODE(got.stat().st_mode) == 0o600 and "size, sha256 and status match" in fetched.stdout

    # a tampered object is refused, and nothing is left behind
    place.overwrite(s2, tampered(place.read(s2)))
    refused = cli("snapshot", "fetch", s2, "--dir", str(tmp_path / "bad"), "--config", config)
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "not the snapshot" in refused.stderr
    assert "sha256" in refused.stderr and list((tmp_path / "bad").iterdir()) == []

    # bad input: one line and the usage, exit 2
    for args, reason in [((s2, "--dir", str(got.parent)), "exists; not overwritten"),
                         (("../x.db", "--dir", str(tmp_path)), "is not a snapshot file name"),
                         ((s2, "--dir", str(got), "--config", config), "not a directory")]:
        bad = cli("snapshot", "fetch", *args, *(() if "--config" in args else ("--config", config)))
        assert bad.returncode == 2 and reason in bad.stderr and "usage:" in bad.stderr, bad.stderr
    nope = cli("snapshot", "list", "--config", config, "--cluster", "nope")
    assert nope.returncode == 2 and "no cluster named 'nope'" in nope.stderr

    # the bot's volume lost: a new bot with an empty catalog lists the store from the manifests
    await start_bot([table], database=str(tmp_path / "new.db"), snapshot_dir=str(tmp_path / "new-snapshots"))
    fresh = (await reply(slack, "snapshots")).text
    assert s3 in fresh and s2 in fresh and fresh.count(":cloud: remote only (from its manifest)") == 2, fresh

    # without the old catalog to compare with, a tamper that also rewrote the manifest's sha256 and size is
    # still refused: the plaintext's status (sha256 trailer, hash, revision) is checked against the manifest
    bad = tampered(place.read(s3))
    manifest = Manifest.from_json(place.read(s3 + ".manifest.json"))
    place.overwrite(s3 + ".manifest.json", dataclasses.replace(
        manifest, sha256=hashlib.sha256(bad).hexdigest(), size=len(bad)).to_json().encode())
    place.overwrite(s3, bad)
    refused = cli("snapshot", "fetch", s3, "--dir", str(tmp_path / "bad"), "--config", config)
    assert refused.returncode == 1 and "not the snapshot its manifest describes" in refused.stderr, refused.stderr
    assert list((tmp_path / "bad").iterdir()) == []


async def test_a_store_that_cannot_be_reached_costs_one_line_and_the_local_part_shows(cluster, slack, start_bot,
                                                                                      s3, tmp_path, cli):
    await start_bot([cluster_table("prod", cluster, snapshots={"store": s3.store_table()})])
    name = await snapshot_name(slack, cluster)
    s3.stop()
    listing = await reply(slack, "snapshots", timeout=60)
    text = text_of(listing)
    assert listing.text.count("could not be listed") == 1 and name in listing.text, listing.text
    assert ":floppy_disk: local" in text
    listed = cli("snapshot", "list", "--config", str(tmp_path / "config.toml"))
    assert listed.returncode == 1 and name in listed.stdout
    assert [x for x in listed.stdout.splitlines() if x.startswith("STORE: ")]
    assert s3.secret_key not in text + listed.stdout + listed.stderr


# ---------------------------------------------------------------- restore and drill from the store

@pytest.mark.parametrize("how", ["keep_local_0", "volume_lost"])
async def test_restore_from_a_snapshot_only_the_store_holds(make_cluster, slack, start_bot, s3, tmp_path, how,
                                                            manifest_key):
    """Encrypted, and the only copy is the object: retention removed the local one (keep_local 0), or the
    bot's volume was lost (a new bot, an empty catalog: the object is found from its signed manifest, and
    named, since only the catalog gives the default). The plan says so; the restore fetches, verifies and
    decrypts it into 0600 temporary files gone afterwards."""
    from pyrage import x25519
    identity = x25519.Identity.generate()
    key_file = tmp_path / "restore.key"
    key_file.write_text(f"# created by the test\n{identity}\n")
    key_file.chmod(0o600)
    c = make_cluster(3)
    table = cluster_table("prod", c, snapshots={"age_recipients": [str(identity.to_public())],
                                                "store": {**s3.store_table(**manifest_key), "keep_local": 0}},
                          restore={"data_dir": str(c.base_dir / "data" / "{name}"), "age_identity_file": str(key_file),
                                   "apiserver": "none"})
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    for i in range(3):
        c.etcdctl("put", f"/registry/k{i}", f"v{i}")
    assert "verified remotely" in text_of(await reply(slack, "snapshot", timeout=60))
    before = keys(c)
    (row,) = await store.snapshots("prod", include_pruned=True)
    revision = row.revision
    assert row.pruned_at and row.remote_state == "verified" and not Path(row.path).exists()
    snapshot_dir = tmp_path / "snapshots"
    if how == "volume_lost":
        snapshot_dir = tmp_path / "new-snapshots"
        bot = await start_bot([table], approval=APPROVAL, database=str(tmp_path / "new.db"),
                              snapshot_dir=str(snapshot_dir))
        store = bot.ctx.store
        await reply(slack, "status")  # the new bot records the membership it sees
    c.etcdctl("put", "/registry/later", "gone after the restore")
    for m in ("member1", "member2"):
        c.kill(m)

    name = Path(row.path).name
    plan = await propose(slack, "restore" if how == "keep_local_0" else f"restore {name}")
    plan_text = text_of(plan) + json.dumps(plan.blocks) + await slack.wait_for(
        lambda: "From the snapshot store" in thread(slack, plan) and thread(slack, plan),
        what="where the file is, in the plan's thread")
    assert f"From the snapshot store:* `{s3.url()}/prod/{name}`" in plan_text, plan_text
    assert "from the snapshot store" in text_of(plan)
    record = await plan_row(store, plan)
    assert plan_of(RestorePlan, record).snapshot.remote_url == f"{s3.url()}/prod/{name}"
    await approve_twice(slack, plan)
    await wait_done(store, record.id, timeout=180)
    assert keys(c) == before and len(hashes(c, revision)) == 1
    assert [p.name for p in snapshot_dir.iterdir() if p.name.startswith(".fetch-")] == []  # no copy left
    verify = next(s for s in await store.steps(record.id) if s.key == "verify")
    assert "fetched from the store" in verify.detail, verify


async def test_a_drill_of_a_snapshot_only_the_store_knows_and_of_a_tampered_one(cluster, slack, start_bot,
                                                                                 file_store, tmp_path, manifest_key):
    table = cluster_table("prod", cluster, snapshots={"store": {"url": f"file://{file_store}", **manifest_key}})
    await start_bot([table])
    name = await snapshot_name(slack, cluster)
    # a new bot, an empty catalog: the drill finds the object from its signed manifest, fetches and boots it
    bot = await start_bot([table], database=str(tmp_path / "new.db"), snapshot_dir=str(tmp_path / "new-snapshots"))
    passed = await reply(slack, f"drill {name}", timeout=120)
    text = text_of(passed)
    assert "passed" in passed.text and name in passed.text, text
    assert f"fetched from the snapshot store: `file://{file_store}/prod/{name}`" in text
    (row,) = await bot.ctx.store.snapshots("prod", include_pruned=True)
    assert row.reason == "found in the store" and row.pruned_at
    assert (await bot.ctx.store.last_drills("prod"))[row.id].ok
    assert "drill passed" in text_of(await reply(slack, "snapshots"))

    place = file_store / "prod" / name
    place.write_bytes(tampered(place.read_bytes()))
    failed = await reply(slack, f"drill {name}", timeout=120)
    assert "FAILED" in failed.text and "not the snapshot recorded" in failed.text, failed.text
    assert not (await bot.ctx.store.last_drills("prod"))[row.id].ok
    scratch = tmp_path / "new-snapshots"
    await eventually(lambda: not [p for p in scratch.iterdir() if p.name.startswith(".fetch-")], 5,
                     "the fetched copies to be removed")
