"""The config file: the documented shape loads; every mistake is one line naming the key, exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, load_config

GOOD = """
database = "etcd-chatops.db"
snapshot_dir = "snapshots"
[approval]
approvers = ["U0LEAD0001"]
approver_groups = []
reaction = "white_check_mark"
reject_reaction = "x"
ttl_minutes = 30
allow_self_approval = false
[[clusters]]
name = "prod"
endpoints = ["https://10.0.0.2:2379", "https://10.0.0.3:2379"]
channels = ["C0INCIDENT"]
cacert = "ca.crt"
cert = "client.crt"
key = "client.key"
launcher = { kind = "manual" }
"""


def write(tmp_path: Path, text: str) -> Path:
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("pem")
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    prod = config.cluster("prod")
    assert prod.endpoints == ("https://10.0.0.2:2379", "https://10.0.0.3:2379")
    assert prod.channels == ("C0INCIDENT",)
    assert prod.cacert == tmp_path / "ca.crt"  # relative to the config file
    assert prod.launcher.kind == "manual"
    assert config.database == tmp_path / "etcd-chatops.db"
    assert config.approval.approvers == ("U0LEAD0001",)
    assert config.approval.ttl_minutes == 30.0
    assert config.clusters_for_channel("C0INCIDENT") == [prod]


def test_defaults_for_a_minimal_file(tmp_path):
    config = load_config(write(tmp_path, '[[clusters]]\nname = "dev"\nendpoints = ["http://127.0.0.1:2379"]\n'))
    assert config.approval.reaction == "white_check_mark"
    assert config.approval.reject_reaction == "x"
    assert config.approval.allow_self_approval is False
    assert config.clusters[0].timeout_seconds == 2.0
    assert config.snapshot_dir == tmp_path / "snapshots"


@pytest.mark.parametrize("change, message", [
    (("endpoints = [\"https://10.0.0.2:2379\", \"https://10.0.0.3:2379\"]", "endpoints = [\"https://10.0.0.2:2379\", \"htp://10.0.0.3:2379\"]"),
     "clusters[0].endpoints[1]: 'htp://10.0.0.3:2379' is not an http(s)://host:port URL"),
    (("endpoints = [\"https://10.0.0.2:2379\", \"https://10.0.0.3:2379\"]", "endpoints = [\"https://10.0.0.2\"]"),
     "clusters[0].endpoints[0]: 'https://10.0.0.2' is not an http(s)://host:port URL (no port)"),
    (("ttl_minutes = 30", "ttl_minuts = 30"), "approval.ttl_minuts: unknown key"),
    (("ttl_minutes = 30", "ttl_minutes = \"30\""), "approval.ttl_minutes: expected a number, got a string"),
    (("ttl_minutes = 30", "ttl_minutes = 0"), "approval.ttl_minutes: must be greater than 0"),
    (("name = \"prod\"", "name = \"prod\"\nendpoint = []"), "clusters[0].endpoint: unknown key"),
    (("channels = [\"C0INCIDENT\"]", "channels = [\"#incident\"]"), "clusters[0].channels[0]: '#incident' is not a Slack ID"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"ssh\" }"), "clusters[0].launcher.kind: 'ssh' is not a launcher kind"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\" }"), "clusters[0].launcher.argv: a command launcher needs argv"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\", argv = [\"start\", \"{host}\"] }"),
     "clusters[0].launcher.argv[1]: unknown placeholder {host}"),
    (("cacert = \"ca.crt\"", "cacert = \"missing.crt\""), "clusters[0].cacert: missing.crt: no such file"),
    (("key = \"client.key\"", ""), "clusters[0].key: cert and key go together"),
    (("reject_reaction = \"x\"", "reject_reaction = \"white_check_mark\""), "approval.reject_reaction: must differ"),
    (("database = \"etcd-chatops.db\"", "database = 5"), "database: expected a string, got an integer"),
])
def test_each_mistake_names_its_key(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD.replace(old, new)))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_duplicate_cluster_names(tmp_path):
    text = '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n[[clusters]]\nname = "a"\nendpoints = ["http://h:2"]\n'
    with pytest.raises(ConfigError, match=r"clusters\[1\].name: 'a' is used by another cluster"):
        load_config(write(tmp_path, text))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[[clusters]\nname = "))
    with pytest.raises(ConfigError, match="clusters: at least one"):
        load_config(write(tmp_path, 'database = "x.db"\n'))


def test_password_from_the_environment_only(tmp_path, monkeypatch):
    text = '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\nusername = "root"\npassword_env = "ETCD_A_PW"\n'
    with pytest.raises(ConfigError, match="clusters\\[0\\].password_env: environment variable ETCD_A_PW is not set"):
        load_config(write(tmp_path, text))
    monkeypatch.setenv("ETCD_A_PW", "s3cret-pw")
    cluster = load_config(write(tmp_path, text)).clusters[0]
    assert cluster.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(cluster)


@pytest.mark.parametrize("body, fragment", [
    (None, "no such file"),
    ("[[clusters]]\nname = \"a\"\nendpoints = [\"http://h:1\"]\ncolour = 1\n", "clusters[0].colour: unknown key"),
])
def test_the_cli_exits_2_with_one_line(tmp_path, body, fragment):
    path = tmp_path / "c.toml"
    if body is not None:
        path.write_text(body)
    proc = subprocess.run([sys.executable, "-m", "bot", "check-config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and fragment in error_lines[0]
    assert "usage: etcd-chatops check-config" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_snapshot_policy_defaults_and_per_cluster_overrides(tmp_path):
    from pyrage import x25519
    key = str(x25519.Identity.generate().to_public())
    text = f"""
[snapshots]
keep_last = 5
every = "6h"
age_recipients = ["{key}"]
[[clusters]]
name = "a"
endpoints = ["http://h:1"]
[[clusters]]
name = "b"
endpoints = ["http://h:2"]
[clusters.snapshots]
keep_last = 30
keep_days = 7
every = "1h30m"
"""
    a, b = load_config(write(tmp_path, text)).clusters
    assert (a.snapshots.keep_last, a.snapshots.keep_days, a.snapshots.every_seconds) == (5, None, 21600)
    assert a.snapshots.encrypted and a.snapshots.age_recipients == (key,)
    assert (b.snapshots.keep_last, b.snapshots.keep_days, b.snapshots.every_seconds) == (30, 7.0, 5400)
    assert b.snapshots.age_recipients == (key,)


@pytest.mark.parametrize("snippet, message", [
    ('[snapshots]\nevery = "6"\n', "snapshots.every: '6' is not a duration like 6h"),
    ('[snapshots]\nevery = "10s"\n', "snapshots.every: '10s' is too often"),
    ('[snapshots]\nkeep_last = 0\n', "snapshots.keep_last: must be at least 1"),
    ('[snapshots]\nage_recipients = ["age1nope"]\n', "snapshots.age_recipients[0]: 'age1nope'... is not an age X25519 public key"),
    ('[snapshots]\nkeep = 3\n', "snapshots.keep: unknown key"),
    ('database_timeout_seconds = -1\n', "database_timeout_seconds: must be greater than 0"),
])
def test_snapshot_and_database_mistakes(tmp_path, snippet, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, snippet + '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n'))
    assert message in str(e.value)


def test_access_roles(tmp_path):
    text = """
[approval]
approvers = ["U0LEAD0001"]
approver_groups = ["S0LEADS001"]
[[clusters]]
name = "open"
endpoints = ["http://h:1"]
[[clusters]]
name = "closed"
endpoints = ["http://h:2"]
[clusters.access]
readers = ["U0SRE00001"]
operator_groups = ["S0SRE00001"]
approvers = ["U0OTHER001"]
"""
    open_, closed = load_config(write(tmp_path, text)).clusters
    assert open_.access.readers.open and open_.access.operators.open
    assert open_.access.approvers.users == ("U0LEAD0001",) and open_.access.approvers.groups == ("S0LEADS001",)
    assert closed.access.readers.users == ("U0SRE00001",) and not closed.access.readers.open
    assert closed.access.operators.users == () and closed.access.operators.groups == ("S0SRE00001",)
    assert closed.access.approvers.users == ("U0OTHER001",) and closed.access.approvers.groups == ()
    with pytest.raises(ConfigError, match=r"clusters\[0\].access.readerz: unknown key"):
        load_config(write(tmp_path, '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n[clusters.access]\nreaderz = []\n'))


def test_approval_rules_come_per_kind(tmp_path):
    """Issue 11: the top-level [approval] keys still work; [approval.<kind>] overrides them for one kind."""
    config = load_config(write(tmp_path, GOOD))
    assert (config.approval.rule("replace").approvals_needed, config.approval.rule("restore").approvals_needed) == (1, 2)
    assert config.approval.rule("replace").ttl_minutes == 30
    text = GOOD.replace("allow_self_approval = false", "allow_self_approval = false\n[approval.replace]\n"
                        "approvals_needed = 2\nttl_minutes = 5\n[approval.restore]\nallow_self_approval = true")
    config = load_config(write(tmp_path, text))
    replace, restore = config.approval.rule("replace"), config.approval.rule("restore")
    assert (replace.approvals_needed, replace.ttl_minutes, replace.allow_self_approval) == (2, 5, False)
    assert (restore.approvals_needed, restore.ttl_minutes, restore.allow_self_approval) == (2, 30, True)


@pytest.mark.parametrize("table, error", [
    ("[approval.replace]\napprovals_needed = 0", r"approval.replace.approvals_needed: must be 1 or more"),
    ("[approval.replace]\napprovals_needed = 1.5", r"approval.replace.approvals_needed: expected an integer"),
    ("[approval.replace]\napprovers = 2", r"approval.replace.approvers: unknown key"),
    ("[approval.upgrade]\napprovals_needed = 2", r"approval.upgrade: unknown key"),
])
def test_approval_rule_mistakes_name_the_key(tmp_path, table, error):
    text = GOOD.replace("allow_self_approval = false", f"allow_self_approval = false\n{table}")
    with pytest.raises(ConfigError, match=error):
        load_config(write(tmp_path, text))
