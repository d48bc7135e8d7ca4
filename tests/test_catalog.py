"""The catalog of both places without etcd: how rows and a store's listing merge, which remote copies retention
removes, and how a fetched copy is checked (on a file:// store)."""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import pytest

from bot.backup.catalog import Expected, FetchFailed, Origin, catalog
from bot.backup.manifest import Manifest
from bot.backup.object_store import OffsiteStore
from bot.config import SnapshotPolicy
from bot.config.offsite import StoreConfig
from bot.domain.snapshot import CatalogEntry, RemoteState, SnapshotRecord
from bot.ops.snapshots import remote_to_prune
from bot.output import blocks
from bot.output import text as render
from bot.output.model import catalog_view
from helpers import snapshot_record

DAY = 86400.0
NOW = 100 * DAY


def row(i: int, *, local: bool = True, remote: str = "", remote_pruned: bool = False, age_days: float = 0.0,
        plan: str | None = None, error: str = "") -> SnapshotRecord:
    return snapshot_record(id=i, cluster="prod", path=f"/snap/prod/prod-{i}.db", revision=10 * i, hash=f"{i:x}",
                           total_keys=i, live_keys=i, total_size=20480, file_size=20512, sha256=f"{i:064x}",
                           encrypted=0, member="m1", requested_by="U0ONCALL01", reason="requested",
                           created_at=NOW - age_days * DAY + i, plan_id=plan, pruned_at=None if local else 1.0,
                           remote_url=f"s3://b/p/prod/prod-{i}.db" if remote else None, remote_state=remote,
                           remote_error=error, remote_pruned_at=2.0 if remote_pruned else None)


def only_remote(name: str, created: float) -> CatalogEntry:
    return CatalogEntry(cluster="prod", name=name, revision=99, hash="abc", total_keys=5, total_size=20480,
                        file_size=20512, sha256="f" * 64, encrypted=True, member="m2", created_at=created,
                        local_path=None, remote_url=f"s3://b/p/prod/{name}", remote_state=RemoteState.LISTED)


def test_the_listing_and_the_rows_merge_and_each_entry_says_where_it_is():
    rows = [row(1, remote="verified"), row(2, local=False, remote="verified"), row(3, remote="failed",
                                                                                 error="connection refused"),
            row(4, local=False, remote="verified", remote_pruned=True), row(5)]
    listed = {"prod-1.db": None, "prod-2.db": None, "old.db.age": only_remote("old.db.age", NOW - 5 * DAY)}
    view = catalog_view("prod", rows, listed, "s3://b/p/prod/")
    by = {e.name: e for e in view.entries}
    assert [e.name for e in view.entries] == ["prod-5.db", "prod-3.db", "prod-2.db", "prod-1.db", "old.db.age"]
    assert "prod-4.db" not in by  # neither copy is left
    assert (by["prod-1.db"].place, by["prod-2.db"].place, by["prod-5.db"].place) == ("both", "remote", "local")
    assert by["prod-3.db"].remote_word == "upload FAILED" and by["old.db.age"].place == "remote"
    text = render.catalog_text(view)
    assert "upload of prod-3.db failed: connection refused" in text and "stored (manifest only)" in text
    assert render.catalog_json(view)["snapshots"][2] | {"place": "remote", "remote_state": "verified"} == \
        render.catalog_json(view)["snapshots"][2]
    slack = blocks.snapshots_reply(view)
    assert ":cloud: remote only (verified)" in slack.text and "upload failed: connection refused" in slack.text


def test_a_verified_copy_the_listing_lacks_is_called_missing_and_an_unlisted_store_is_one_line():
    rows = [row(1, remote="verified"), row(2, local=False, remote="verified"),
            row(3, local=False, remote="failed")]  # its only copy is gone: not shown
    view = catalog_view("prod", rows, {}, "s3://b/p/prod/")
    assert {e.remote_state for e in view.entries} == {RemoteState.MISSING}
    assert [(e.name, e.place) for e in view.entries] == [("prod-2.db", "none"), ("prod-1.db", "local")]
    assert ":x: no copy left · :warning: the store no longer has it" in blocks.snapshots_reply(view).text
    down = catalog_view("prod", rows, None, "s3://b/p/prod/", "no answer within 10s")
    reply = blocks.snapshots_reply(down)
    assert reply.text.count("could not be listed") == 1 and "no answer within 10s" in reply.text
    assert "prod-1.db" in reply.text  # the local part still shows
    assert render.catalog_text(down).endswith("STORE: no answer within 10s")


def test_retention_of_the_remote_copies_keeps_the_newest_verified_one():
    policy = SnapshotPolicy(keep_last=2)
    # newest first: 5 (upload failed), 4, 3 verified and local, 2 and 1 verified and only remote now
    rows = [row(5, remote="failed"), row(4, remote="verified"), row(3, remote="verified"),
            row(2, local=False, remote="verified"), row(1, local=False, remote="verified"),
            row(0, local=False, remote="verified", remote_pruned=True)]
    assert sorted(r.id for r in remote_to_prune(rows, policy, NOW, None)) == [1, 2]
    # every remote copy is old and the age rule alone would drop them all: the newest verified stays
    aged = [row(i, local=False, remote="verified", age_days=30) for i in (3, 2, 1)]
    assert sorted(r.id for r in remote_to_prune(aged, SnapshotPolicy(keep_days=7), NOW, None)) == [1, 2]
    assert remote_to_prune(aged, SnapshotPolicy(keep_last=None, keep_days=None), NOW, None) == []  # no rule
    assert sorted(r.id for r in remote_to_prune(aged, SnapshotPolicy(keep_last=1), NOW, None)) == [1, 2]
    # only one verified copy, however old: kept
    assert remote_to_prune([row(5, remote="failed", age_days=90), row(1, local=False, remote="verified",
                                                                         age_days=90)],
                           SnapshotPolicy(keep_last=1, keep_days=1), NOW, None) == []
    # a plan's pre-change snapshot stays while its plan is open
    planned = [row(3, remote="verified"), row(2, remote="verified", plan="p1", age_days=60),
               row(1, remote="verified", age_days=60)]
    old = SnapshotPolicy(keep_last=1, keep_plan_snapshots_days=30)
    assert [r.id for r in remote_to_prune(planned, old, NOW, "p1")] == [1]
    assert sorted(r.id for r in remote_to_prune(planned, old, NOW, None)) == [1, 2]


# ---------------------------------------------------------------- fetching from a file:// store (no etcd)

async def test_a_fetch_is_checked_against_size_and_sha256_and_leaves_nothing_behind(file_store, tmp_path):
    config = StoreConfig(f"file://{file_store}")
    data = b"etcd snapshot bytes" * 1000
    (file_store / "prod").mkdir()
    (file_store / "prod" / "a.db").write_bytes(data)
    good = Expected("a.db", len(data), hashlib.sha256(data).hexdigest())
    scratch = tmp_path / "scratch"
    origin = Origin(config, "prod", scratch)
    async with origin.fetched(good) as path:
        assert path.read_bytes() == data and (path.stat().st_mode & 0o777) == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    for wrong, said in [(Expected("a.db", len(data) + 1, good.sha256), "bytes, expected"),
                        (Expected("a.db", len(data), "0" * 64), "sha256"),
                        (Expected("gone.db", 1, "0" * 64), "cannot download gone.db")]:
        with pytest.raises(FetchFailed, match=said) as e:
            async with origin.fetched(wrong):
                raise AssertionError("a bad copy was handed out")
        assert "\n" not in str(e.value)
    assert list(scratch.iterdir()) == []  # every copy removed, good or bad



KEY = "k" * 40


async def test_an_object_is_the_bot_s_own_only_with_a_manifest_signed_by_its_key(file_store):
    """Each way an object can fail to be the bot's own, against one signed with the key; and the upgrade:
    an earlier version's unsigned manifest stays the bot's own only where the catalog knows the object."""
    config = StoreConfig(f"file://{file_store}", manifest_key=KEY)
    remote = OffsiteStore.from_config(config)
    (file_store / "prod").mkdir()

    def described(name: str, **changes: Any) -> Manifest:
        (file_store / "prod" / name).write_bytes(b"snapshot " + name.encode())
        return dataclasses.replace(Manifest(cluster="prod", file_name=name, sha256=f"{len(name):064x}", size=9,
                                            hash="abc", revision=7, total_keys=3, total_size=20480, member="m1",
                                            created_at=NOW), **changes)

    def put(name: str, manifest: Manifest | str) -> None:
        text = manifest if isinstance(manifest, str) else manifest.to_json()
        (file_store / "prod" / (name + ".manifest.json")).write_text(text)

    await remote.write_manifest(described("own.db"))                       # the bot writes it: signed
    put("unsigned.db", described("unsigned.db"))                           # anyone: no HMAC
    put("v1.db", dataclasses.replace(described("v1.db"), version=1))       # an earlier bot: version 1, no HMAC
    put("known-v1.db", dataclasses.replace(described("known-v1.db"), version=1))
    put("other-key.db", described("other-key.db").signed("o" * 40))
    put("future.db", described("future.db", created_at=time.time() + 3600).signed(KEY))
    put("soon.db", described("soon.db", created_at=time.time() + 60).signed(KEY))   # within the clock skew
    put("changed.db", dataclasses.replace(described("changed.db").signed(KEY), revision=8))
    put("elsewhere.db", described("elsewhere.db", file_name="own.db").signed(KEY))
    put("garbled.db", "{not json")
    (file_store / "prod" / "garbled.db").write_bytes(b"a garbled manifest")
    (file_store / "prod" / "bare.db").write_bytes(b"no manifest")
    known = dataclasses.replace(row(1, local=False, remote="verified"), path="/snap/prod/known-v1.db",
                                sha256=f"{len('known-v1.db'):064x}")   # uploaded by the bot before the upgrade

    view = await catalog(config, "prod", [known], open_store=lambda c: remote)
    by = {e.name: e for e in view.entries}
    assert {n: e.foreign for n, e in by.items() if not e.foreign} == {"own.db": "", "soon.db": "",
                                                                      "known-v1.db": ""}
    assert by["known-v1.db"].snapshot_id == 1   # the catalog's row, not the manifest, describes it
    reasons = {n: e.foreign for n, e in by.items() if e.foreign}
    assert reasons == {
        "unsigned.db": "its manifest is not signed (written by someone without the key, or by a bot before version 2)",
        "v1.db": "its manifest is not signed (written by someone without the key, or by a bot before version 2)",
        "other-key.db": "its manifest is signed with another key",
        "future.db": reasons["future.db"],
        "changed.db": "its manifest does not match its HMAC: changed after it was signed",
        "elsewhere.db": "its manifest describes another object",
        "garbled.db": "its manifest is unreadable or invalid",
        "bare.db": "it has no manifest"}
    assert reasons["future.db"].startswith("its manifest is dated in the future (")
    # a foreign object is dated by the store's clock, and without a manifest it is described by nothing
    assert by["future.db"].created_at < time.time() and not by["bare.db"].described and by["unsigned.db"].described
    text = render.catalog_text(view)
    assert "FOREIGN bare.db: not taken by this bot: it has no manifest" in text
    bare = next(line for line in text.splitlines() if "bare.db" in line and line.startswith("|"))
    assert [cell.strip() for cell in bare.split("|")][3:6] == ["?", "?", "?"]
    assert {s["name"]: s["foreign"] for s in render.catalog_json(view)["snapshots"]}["own.db"] is None
    slack = blocks.snapshots_reply(view).text
    assert slack.count("*FOREIGN*") == len(reasons) and "bare.db` · 11 B ·" in slack

    # without a key nothing the catalog does not know is the bot's own
    keyless = StoreConfig(f"file://{file_store}")
    view = await catalog(keyless, "prod", [known], open_store=lambda c: OffsiteStore.from_config(keyless))
    assert {e.name for e in view.entries if not e.foreign} == {"known-v1.db"}
    assert {e.foreign for e in view.entries if e.name == "own.db"} == {
        "no manifest key is configured, so no manifest can be checked"}
