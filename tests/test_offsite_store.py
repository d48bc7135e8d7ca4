"""The off-site store itself (bot/backup): its configuration, the manifest, and
RemoteStore against a real S3-protocol server (moto on loopback) and a
`file://` directory: the same calls, the same layout, the same answers."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from bot.backup.manifest import CLOCK_SKEW, Manifest, ManifestError, authenticate, key_id
from bot.backup.object_store import ObjectStoreError, OffsiteStore
from bot.config import ConfigError, load_config, parse_config
from bot.config.offsite import StoreConfig
from helpers import eventually, must

MiB = 1 << 20
SHA = "ab" * 32


def manifest(**changes) -> Manifest:
    base = dict(cluster="prod", file_name="prod-20261201T100000Z-rev10.db", sha256=SHA, size=2_100_032,
                hash="6e2b3e1a", revision=10, total_keys=9, total_size=2_097_152, member="m1",
                created_at=1796140000.5)
    return Manifest(**{**base, **changes})


# ---------------------------------------------------------------- configuration

def config_with(tmp_path: Path, store: str, cluster_store: str = "") -> str:
    return (f'[snapshots.store]\n{store}\n[[clusters]]\nname = "prod"\nendpoints = ["http://127.0.0.1:2379"]\n'
            f'[[clusters]]\nname = "stage"\nendpoints = ["http://127.0.0.1:2381"]\n{cluster_store}')


def test_the_store_table_with_a_per_cluster_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(config_with(tmp_path, 'url = "s3://etcd-backups/prod/"\nendpoint = "http://minio:9000"\n'
                                          'region = "eu-west-1"\nkeep_local = 3',
                                '[clusters.snapshots.store]\nurl = "file:///mnt/backups"\n'))
    prod, stage = load_config(path).clusters
    assert prod.snapshots.store == StoreConfig("s3://etcd-backups/prod", "http://minio:9000", "eu-west-1", 3)
    assert stage.snapshots.store == StoreConfig("file:///mnt/backups")


@pytest.mark.parametrize("store, message", [
    ('url = "ftp://host/x"', "snapshots.store.url: 'ftp://host/x': the scheme must be one of s3://, gs://, az://, file://"),
    ('url = "s3://"', "snapshots.store.url: 's3://': no bucket or container"),
    ('url = "file://relative/dir"', "snapshots.store.url: 'file://relative/dir': a file URL names an absolute path"),
    ('url = "s3://key:secret@bucket/p"', "snapshots.store.url: s3:// URL: no user or password in it"),
    ('url = "s3://b/p?X-Amz-Credential=x"', "snapshots.store.url: s3:// URL: no query or fragment"),
    ('endpoint = "http://minio:9000"', "snapshots.store.url: missing"),
    ('url = "gs://b/p"\nendpoint = "http://x:1"', "snapshots.store.endpoint: only an s3:// store takes an endpoint"),
    ('url = "s3://b/p"\nendpoint = "minio:9000"', "snapshots.store.endpoint: 'minio:9000' is not an http:// or"),
    ('url = "s3://b/p"\nkeep_local = -1', "snapshots.store.keep_local: must be 0 or more"),
    ('url = "s3://b/p"\naccess_key_id = "AKIA..."', "snapshots.store.access_key_id: credentials never go in the file"),
    ('url = "s3://b/p"\nsecret_access_key_env = "X"', "snapshots.store.secret_access_key_env: credentials never go"),
    ('url = "s3://b/p"\nbucket = "x"', "snapshots.store.bucket: unknown key"),
])
def test_store_mistakes_are_one_line_naming_the_key(tmp_path, store, message):
    path = tmp_path / "c.toml"
    path.write_text(config_with(tmp_path, store))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_config_shows_where_snapshots_go(tmp_path, cli):
    path = tmp_path / "c.toml"
    path.write_text(config_with(tmp_path, 'url = "s3://etcd-backups/prod"'))
    out = cli("check-config", str(path))
    assert out.returncode == 0 and "snapshots off-site: s3://etcd-backups/prod/prod/" in out.stdout
    assert out.stdout.count("warning: prod's snapshot store has no manifest key") == 1
    assert "every object its catalog does not know is foreign" in out.stdout
    (tmp_path / "m.key").write_text("m" * 32)
    path.write_text(f'audit_key_file = "{tmp_path / "m.key"}"\n' + config_with(tmp_path, 'url = "s3://e/p"'))
    out = cli("check-config", str(path))
    assert out.returncode == 0 and "warning" not in out.stdout and "m" * 32 not in out.stdout
    assert out.stdout.count("manifests signed with the audit key (HMAC-SHA256)") == 2
    path.write_text(config_with(tmp_path, 'url = "http://etcd-backups/prod"'))
    out = cli("check-config", str(path))
    assert out.returncode == 2 and "the scheme must be one of" in out.stderr and "Traceback" not in out.stderr


def test_no_store_by_default():
    config = parse_config({"clusters": [{"name": "prod", "endpoints": ["http://127.0.0.1:2379"]}]}, Path("/"))
    assert config.clusters[0].snapshots.store is None


# ---------------------------------------------------------------- manifest

def test_the_manifest_round_trips_and_rejects_what_it_cannot_trust():
    m = manifest(encrypted=True, recipients=("sha256:0123456789abcdef",))
    assert Manifest.from_json(m.to_json()) == m
    data = json.loads(m.to_json())
    for broken, why in [({**data, "sha256": "nope"}, "sha256 is not 64"),
                        ({k: v for k, v in data.items() if k != "revision"}, "has no revision"),
                        ({**data, "size": "12"}, "size has the wrong type"),
                        ({**data, "extra": 1}, "unknown key 'extra'"),
                        ({**data, "recipients": []}, "encryption flag and recipients disagree"),
                        ({**data, "file_name": "../x.db"}, "is not a file name"),
                        ({**data, "version": 99}, "this bot reads up to 2"),
                        ({**data, "hmac": "ab" * 32}, "hmac is not 64 hex digits with a 16-digit key_id"),
                        ({**data, "created_at": float("inf")}, "created_at is not a time"),
                        ({**data, "created_at": 1e300}, "created_at is not a time")]:
        with pytest.raises(ManifestError, match=why):
            Manifest.from_json(json.dumps(broken))
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_json(b"\xff{")


KEY = "0123456789abcdef" * 3


def test_a_signed_manifest_authenticates_only_with_its_key_unchanged_and_not_dated_ahead():
    now = 1796140000.0
    signed = manifest(created_at=now).signed(KEY)
    assert signed.version == 2 and len(signed.hmac) == 64 and signed.key_id == key_id(KEY)
    assert KEY not in signed.to_json()
    read = Manifest.from_json(signed.to_json())
    assert read == signed and authenticate(read, KEY, now) == ""
    # only the values count, not the file's layout (key order, spaces, an int time)
    data = json.loads(signed.to_json())
    relaid = json.dumps({**dict(reversed(list(data.items()))), "created_at": int(now)})
    assert authenticate(Manifest.from_json(relaid), KEY, now) == ""
    for changed in ({"revision": 11}, {"sha256": "cd" * 32}, {"cluster": "stage"}, {"version": 1},
                    {"encrypted": True, "recipients": ["sha256:0123456789abcdef"]}):
        tampered = Manifest.from_json(json.dumps({**data, **changed}))
        assert authenticate(tampered, KEY, now) == "its manifest does not match its HMAC: changed after it was signed"
    assert authenticate(signed, "another key, just as long as the first", now) == \
        "its manifest is signed with another key"
    assert authenticate(manifest(created_at=now), KEY, now).startswith("its manifest is not signed")
    assert authenticate(signed, None, now) == "no manifest key is configured, so no manifest can be checked"
    assert authenticate(signed, KEY, now - CLOCK_SKEW) == ""     # the bot's clock a little behind
    assert authenticate(signed, KEY, now - CLOCK_SKEW - 1) == \
        "its manifest is dated in the future (2026-12-01 15:46 UTC)"


def test_the_manifest_key_is_named_never_given_and_the_audit_key_stands_in(tmp_path, monkeypatch):
    monkeypatch.setenv("MANIFEST_KEY", KEY)
    monkeypatch.setenv("AUDIT_KEY", "a" * 32)
    monkeypatch.setenv("SHORT_KEY", "x" * 31)
    (tmp_path / "m.key").write_text(KEY + "\n")
    path = tmp_path / "c.toml"
    path.write_text('audit_key_env = "AUDIT_KEY"\n' + config_with(
        tmp_path, 'url = "s3://b/p"\nmanifest_key_env = "MANIFEST_KEY"',
        '[clusters.snapshots.store]\nurl = "file:///mnt/backups"\n'))
    config = load_config(path)
    prod, stage = config.clusters
    assert must(prod.snapshots.store).manifest_key == KEY and must(stage.snapshots.store).manifest_key == "a" * 32
    assert KEY not in repr(config) and sorted(config.manifest_keys()) == sorted([KEY, "a" * 32])
    path.write_text(config_with(tmp_path, f'url = "s3://b/p"\nmanifest_key_file = "{tmp_path / "m.key"}"'))
    prod, stage = load_config(path).clusters
    assert must(prod.snapshots.store).manifest_key == KEY == must(stage.snapshots.store).manifest_key
    for store, message in [
            ('url = "s3://b/p"\nmanifest_key = "inline"',
             "snapshots.store.manifest_key: never inline; give manifest_key_env or manifest_key_file"),
            ('url = "s3://b/p"\nmanifest_key_env = "SHORT_KEY"',
             "snapshots.store.manifest_key_env: the manifest key has 31 characters; it needs at least 32"),
            ('url = "s3://b/p"\nmanifest_key_env = "UNSET_KEY"',
             "snapshots.store.manifest_key_env: environment variable UNSET_KEY is not set"),
            ('url = "s3://b/p"\nmanifest_key_env = "MANIFEST_KEY"\nmanifest_key_file = "m.key"',
             "snapshots.store.manifest_key_file: give manifest_key_env or manifest_key_file, not both"),
            ('url = "s3://b/p"\nmanifest_key_env = "MANIFEST_KEY"\nsecret_key = "x"',
             "snapshots.store.secret_key: credentials never go in the file")]:
        path.write_text(config_with(tmp_path, store))
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the store, on S3 and on a directory

@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.e2e), "file"])  # s3: a moto server (end to end)
def store(request, tmp_path) -> OffsiteStore:
    if request.param == "file":
        return OffsiteStore.from_config(StoreConfig(f"file://{tmp_path}/offsite"))
    s3 = request.getfixturevalue("s3")
    return OffsiteStore.from_config(StoreConfig(s3.url(), endpoint=s3.endpoint, region="us-east-1"))


async def test_upload_list_head_read_manifest_fetch_delete(store, tmp_path):
    data = os.urandom(3 * MiB) * 7  # 21 MiB: several parts
    upload = store.begin_upload("prod", "prod-1.db")
    for i in range(0, len(data), MiB):
        await asyncio.to_thread(upload.write, data[i:i + MiB])  # (from a worker thread, as the save does)
    assert await store.list("prod") == []  # nothing visible before it is complete
    await asyncio.to_thread(upload.close)
    sha = hashlib.sha256(data).hexdigest()
    assert upload.size == len(data)
    m = manifest(file_name="prod-1.db", sha256=sha, size=len(data))
    await store.write_manifest(m)
    listed = await store.list("prod")
    assert [(o.name, o.size) for o in listed] == [("prod-1.db", len(data))]  # the manifest is not a snapshot
    assert await store.list("stage") == []
    assert (await store.head("prod", "prod-1.db")).size == len(data)
    assert await store.head("prod", "nothing.db") is None
    assert await store.read_manifest("prod", "prod-1.db") == m
    assert await store.read_manifest("prod", "nothing.db") is None
    assert await store.sha256("prod", "prod-1.db") == (sha, len(data))
    dest = tmp_path / "fetched.db"
    assert await store.fetch_to("prod", "prod-1.db", dest) == (sha, len(data))
    assert dest.read_bytes() == data and dest.stat().st_mode & 0o777 == 0o600
    assert store.display_url("prod", "prod-1.db") == f"{store.config.url}/prod/prod-1.db"
    await store.delete("prod", "prod-1.db")
    assert await store.list("prod") == [] and await store.read_manifest("prod", "prod-1.db") is None
    await store.delete("prod", "prod-1.db")  # gone already: not an error


async def test_an_aborted_upload_leaves_nothing(store):
    upload = store.begin_upload("prod", "prod-2.db")
    await asyncio.to_thread(upload.write, os.urandom(20 * MiB))
    await asyncio.to_thread(upload.abort)
    await asyncio.to_thread(upload.abort)  # idempotent
    with pytest.raises(ObjectStoreError, match="aborted"):
        await asyncio.to_thread(upload.close)
    other = store.begin_upload("prod", "prod-5.db")
    with pytest.raises(RuntimeError, match="from a worker thread"):
        other.write(b"x")  # on the event loop it would deadlock: refused
    await asyncio.to_thread(other.abort)
    assert await store.list("prod") == []
    assert await store.abort_leftovers("prod") == 0


async def test_a_killed_writer_leaves_an_unfinished_upload_that_is_aborted_later(s3):
    store = OffsiteStore.from_config(StoreConfig(s3.url(), endpoint=s3.endpoint, region="us-east-1"))
    upload = store.begin_upload("prod", "prod-3.db")
    await asyncio.to_thread(upload.write, os.urandom(20 * MiB))  # parts go up; the writer then "dies"
    await eventually(lambda: asyncio.to_thread(s3.unfinished_uploads), 10, "the multipart upload to start")
    assert s3.unfinished_uploads() == ["prod/prod/prod-3.db"] and s3.keys() == {}
    assert await store.abort_leftovers("prod") == 0  # its own upload, still running: not a leftover
    restarted = OffsiteStore.from_config(store.config)  # the bot started again
    assert await restarted.abort_leftovers("prod") == 1
    assert s3.unfinished_uploads() == [] and s3.keys() == {}


async def test_a_dead_server_is_one_line_without_credentials(s3):
    store = OffsiteStore.from_config(StoreConfig(s3.url(), endpoint=s3.endpoint, region="us-east-1"))
    s3.stop()
    with pytest.raises(ObjectStoreError) as e:
        await store.list("prod")
    text = str(e.value)
    assert text.startswith(f"listing {s3.url()}/prod/: ") and "\n" not in text
    assert s3.access_key not in text and s3.secret_key not in text


async def test_a_killed_writer_on_a_directory_leaves_a_staging_file_that_is_removed_later(tmp_path):
    store = OffsiteStore.from_config(StoreConfig(f"file://{tmp_path}/offsite"))
    upload = store.begin_upload("prod", "prod-4.db")
    await asyncio.to_thread(upload.write, os.urandom(20 * MiB))  # the writer "dies" here
    await eventually(lambda: list((tmp_path / "offsite" / "prod").iterdir()), 10, "the staging file")
    assert [p.name for p in (tmp_path / "offsite" / "prod").iterdir()] == ["prod-4.db#1"]
    assert await store.list("prod") == []  # not a visible snapshot
    assert await store.abort_leftovers("prod") == 0  # its own upload, still running: left alone
    assert await OffsiteStore.from_config(store.config).abort_leftovers("prod") == 1  # the bot started again
    assert list((tmp_path / "offsite" / "prod").iterdir()) == []


def test_an_error_line_never_carries_a_query_string_or_signature():
    from bot.backup.object_store import one_line
    error = RuntimeError("Error performing GET https://acct.blob.core.windows.net/c/prod/x.db?sv=2022&sig=SECRETSAS "
                         "in 1s\n  Authorization=AWS4 Signature=abc123 Debug source: Generic {...}")
    text = one_line(error)
    assert "SECRETSAS" not in text and "abc123" not in text and "\n" not in text and "Debug source" not in text
    assert text.startswith("Error performing GET https://acct.blob.core.windows.net/c/prod/x.db?…")


async def test_a_real_connection_error_is_one_line_that_names_the_cause():
    """obstore's text is a sentence, a blank line and a 40-line debug dump; the line keeps the
    sentence and the dump's root cause (it showed 240 characters of the dump before)."""
    import socket
    from datetime import timedelta

    import obstore
    from obstore.store import S3Store

    from bot.backup.object_store import one_line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # nothing listens on it
    store = S3Store("bucket", endpoint=f"http://127.0.0.1:{port}", region="us-east-1", access_key_id="AKIATEST",
                    secret_access_key="not-a-secret", client_options={"allow_http": True},
                    retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2),
                                  "backoff": {"init_backoff": timedelta(milliseconds=10),
                                              "max_backoff": timedelta(milliseconds=10), "base": 2}})
    with pytest.raises(Exception) as e:
        await obstore.put_async(store, "prod/x.db", b"x")
    text = one_line(e.value)
    assert text.endswith("(Connection refused)") and "Debug" not in text and "{" not in text, text
    assert len(text) < 200
