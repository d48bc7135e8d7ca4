"""The config file: the documented shape loads; every mistake is one line naming the key, exit 2."""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

from bot.config import ConfigError, ReplicasConfig, load_config, parse_config
from bot.config import schema as config_schema
from helpers import must

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
    prod = must(config.cluster("prod"))
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
    (("channels = [\"C0INCIDENT\"]", "channels = [\"#incident\"]"),
     "clusters[0].channels[0]: '#incident' is not a Slack ID"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"docker\" }"),
     "clusters[0].launcher.kind: 'docker' is not a launcher kind (manual, command or ssh)"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"ssh\" }"),
     "clusters[0].launcher.recipe: an ssh launcher needs recipe: static-pod (kubeadm) or systemd"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"ssh\", recipe = \"systemd\" }"),
     "clusters[0].launcher.known_hosts: an ssh launcher needs known_hosts: the hosts' keys are pinned"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"manual\", recipe = \"systemd\" }"),
     "clusters[0].launcher.recipe: only an ssh launcher takes recipe"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"ssh\", recipe = \"docker\" }"),
     "clusters[0].launcher.recipe: 'docker' is not a recipe (static-pod or systemd)"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\" }"),
     "clusters[0].launcher.argv: a command launcher needs argv"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\", argv = [\"start\", \"{host}\"] }"),
     "clusters[0].launcher.argv[1]: unknown placeholder {host}"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\", argv = [\"go\", \"{action\"] }"),
     "clusters[0].launcher.argv[1]: expected '}' before end of string (write a literal brace as {{ or }})"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"command\", argv = [\"go\", \"{name!r}\"] }"),
     "clusters[0].launcher.argv[1]: write the placeholder as plain {name}"),
    (("launcher = { kind = \"manual\" }", "launcher = { kind = \"manual\" }\nrestore = { no_leader_seconds = 0 }"),
     "clusters[0].restore.no_leader_seconds: must be greater than 0"),
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


def test_a_launcher_has_actions_exactly_when_its_argv_substitutes_action(tmp_path):
    """The config check and has_actions read argv alike: `{{action}}` is the literal text "{action}", no field."""
    def launcher(argv: str):
        cluster = load_config(write(tmp_path, GOOD.replace('launcher = { kind = "manual" }',
                                                           f'launcher = {{ kind = "command", argv = {argv} }}'))
                              ).cluster("prod")
        assert cluster is not None
        return cluster.launcher
    literal = launcher('["etcd-member", "{{action}}", "{name}"]')
    assert not literal.has_actions and literal.argv[1] == "{{action}}"
    assert launcher('["etcd-member", "--do={action}", "{name}"]').has_actions


def test_duplicate_cluster_names(tmp_path):
    text = '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n[[clusters]]\nname = "a"\nendpoints = ["http://h:2"]\n'
    with pytest.raises(ConfigError, match=r"clusters\[1\].name: 'a' is used by another cluster"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("theirs", ["https://H1:2379/", "http://h1:2379", "HTTP://h1:2379"])
def test_two_clusters_with_one_endpoint_are_refused(tmp_path, theirs):
    """One etcd under two names would let two plans change it at once (one open plan per cluster name)."""
    def two(b_endpoint: str) -> str:
        return ('[[clusters]]\nname = "a"\nendpoints = ["http://h0:2379", "http://h1:2379"]\n'
                f'[[clusters]]\nname = "b"\nendpoints = ["http://h2:2379", "{b_endpoint}"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, two(theirs)))
    assert str(e.value).endswith("clusters[1].endpoints[1]: " + theirs.lower().rstrip("/") + " reaches h1:2379, an "
                                 "endpoint of cluster 'a' too (http://h1:2379); clusters 'a' and 'b' would be one "
                                 "etcd under two names")
    assert "\n" not in str(e.value)
    load_config(write(tmp_path, two("http://h1:2380")))   # another port: another etcd


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
    ("[[clusters]]\nname = \"a\"\nendpionts = [\"http://h:1\"]\n", "clusters[0].endpionts: unknown key"),
    ("[[clusters]]\nname = \"a\"\nendpoints = [\"http://h:1\"]\n[[clusters]]\nname = \"b\"\n"
     "endpoints = [\"https://H:1/\"]\n", "clusters 'a' and 'b' would be one etcd under two names"),
])
def test_the_cli_exits_2_with_one_line(tmp_path, body, fragment, cli):
    """A mistake in the file is not one on the command line: one line naming the key (a typo in a required
    key points at the typo), and no usage before or after it."""
    path = tmp_path / "c.toml"
    if body is not None:
        path.write_text(body)
    proc = cli("check-config", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"etcd-chatops check-config: error: config: {path}: ") and line.endswith(fragment)


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
    ('[snapshots]\nage_recipients = ["age1nope"]\n',
     "snapshots.age_recipients[0]: 'age1nope'... is not an age X25519 public key"),
    ('[snapshots]\nkeep = 3\n', "snapshots.keep: unknown key"),
    ('database_timeout_seconds = -1\n', "database_timeout_seconds: must be greater than 0"),
    ('[snapshots]\nkeep_plan_snapshots_days = 0\n', "snapshots.keep_plan_snapshots_days: must be greater than 0"),
    ('[snapshots]\nkeep_plan_snapshots_days = "30d"\n', "snapshots.keep_plan_snapshots_days: expected a number"),
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
        load_config(write(tmp_path,
                          '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n[clusters.access]\nreaderz = []\n'))


MINIMAL = '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n'


@pytest.mark.parametrize("snippet, message", [
    ('[approval]\nttl_minutes = inf\n', "approval.ttl_minutes: must be a finite number"),
    ('[approval]\nttl_minutes = nan\n', "approval.ttl_minutes: must be a finite number"),
    ('[approval]\nttl_minutes = -inf\n', "approval.ttl_minutes: must be a finite number"),
    ('[approval]\nttl_minutes = -5\n', "approval.ttl_minutes: must be greater than 0"),
    ('[approval]\nttl_minutes = 1e308\n', "approval.ttl_minutes: at most 10080 (7 days)"),
    ('[approval.replace]\nttl_minutes = 20000\n', "approval.replace.ttl_minutes: at most 10080 (7 days)"),
    ('database_timeout_seconds = nan\n', "database_timeout_seconds: must be a finite number"),
    ('[snapshots]\nkeep_days = inf\n', "snapshots.keep_days: must be a finite number"),
    ('[snapshots]\nkeep_last = -3\n', "snapshots.keep_last: must be at least 1"),
    (MINIMAL + 'timeout_seconds = nan\n', "clusters[0].timeout_seconds: must be a finite number"),
    (MINIMAL + 'catch_up_seconds = inf\n', "clusters[0].catch_up_seconds: must be a finite number"),
    (MINIMAL + 'catch_up_seconds = -1\n', "clusters[0].catch_up_seconds: must be greater than 0"),
    (MINIMAL + '[clusters.launcher]\ntimeout_seconds = nan\n',
     "clusters[0].launcher.timeout_seconds: must be a finite number"),
    (MINIMAL + 'defrag_disarm_below = 1.5\n', "clusters[0].defrag_disarm_below: must be greater than 0 and at most 1"),
    (MINIMAL + 'defrag_disarm_below = 0\n', "clusters[0].defrag_disarm_below: must be greater than 0 and at most 1"),
])
def test_numbers_must_be_finite_and_not_negative(tmp_path, snippet, message):
    """`ttl_minutes = inf` made a proposed plan that never expired and blocked its cluster."""
    text = snippet if snippet.startswith(MINIMAL) else snippet + MINIMAL
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('[[clusters]]\nname = "prod\\n"\nendpoints = ["http://h:1"]\n',
     "clusters[0].name: 'prod\\n' is not a cluster name"),
    (MINIMAL + 'channels = ["C0INCIDENT\\n"]\n', "clusters[0].channels[0]: 'C0INCIDENT\\n' is not a Slack ID"),
    ('[approval]\napprovers = ["U0LEAD0001\\n"]\n' + MINIMAL,
     "approval.approvers[0]: 'U0LEAD0001\\n' is not a Slack ID"),
    ('[approval]\nreaction = "ok\\n"\n' + MINIMAL, "approval.reaction: 'ok\\n' is not a Slack reaction name"),
    (MINIMAL + '[clusters.access]\noperators = ["U0ONCALL01\\n"]\n',
     "clusters[0].access.operators[0]: 'U0ONCALL01\\n' is not a Slack ID"),
])
def test_ids_and_names_must_match_whole(tmp_path, text, message):
    """A trailing newline slipped through `re.match` with `$`."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


def test_paths_of_the_wrong_kind(tmp_path, cli):
    (tmp_path / "state.db").mkdir()
    (tmp_path / "snaps").write_text("a file")
    for snippet, message in [('database = "state.db"\n', "database: state.db: is a directory, not a database file"),
                             ('snapshot_dir = "snaps"\n', "snapshot_dir: snaps: is not a directory")]:
        path = write(tmp_path, snippet + MINIMAL)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert message in str(e.value)
        proc = cli("check-config", str(path))
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr


def test_plan_snapshots_are_kept_30_days_unless_configured(tmp_path):
    text = '[snapshots]\nkeep_last = 1\n[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n' \
           '[[clusters]]\nname = "b"\nendpoints = ["http://h:2"]\n[clusters.snapshots]\nkeep_plan_snapshots_days = 90\n'
    a, b = load_config(write(tmp_path, text)).clusters
    assert (a.snapshots.keep_plan_snapshots_days, b.snapshots.keep_plan_snapshots_days) == (30.0, 90.0)


CLUSTER = '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n'


@pytest.mark.parametrize("top, message", [
    ('audit_key_env = "AUDIT_KEY_UNSET"\n', "audit_key_env: environment variable AUDIT_KEY_UNSET is not set"),
    ('audit_key_file = "nope.key"\n', "audit_key_file: nope.key: no such file"),
    ('audit_key_env = "AUDIT_KEY_GOOD"\naudit_key_file = "audit.key"\n',
     "audit_key_file: give audit_key_env or audit_key_file, not both"),
    ('audit_key_env = "AUDIT_KEY_SHORT"\n', "audit_key_env: the audit key has 12 characters; it needs at least 32"),
    ('audit_key_file = "short.key"\n', "audit_key_file: the audit key has 5 characters; it needs at least 32"),
    ('audit_key = "inline-keys-are-not-read-from-the-file"\n', "audit_key: unknown key"),
])
def test_audit_key_mistakes_name_the_key_and_never_the_key(tmp_path, monkeypatch, top, message):
    monkeypatch.setenv("AUDIT_KEY_GOOD", "k" * 40)
    monkeypatch.setenv("AUDIT_KEY_SHORT", "short-secret")
    monkeypatch.delenv("AUDIT_KEY_UNSET", raising=False)
    (tmp_path / "audit.key").write_text("f" * 64 + "\n")
    (tmp_path / "short.key").write_text("abcde\n")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, top + CLUSTER))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "short-secret" not in str(e.value) and "abcde" not in str(e.value)


def test_audit_key_from_the_environment_or_a_file(tmp_path, monkeypatch):
    assert load_config(write(tmp_path, CLUSTER)).audit_key is None
    monkeypatch.setenv("AUDIT_KEY", "e" * 40)
    config = load_config(write(tmp_path, 'audit_key_env = "AUDIT_KEY"\n' + CLUSTER))
    assert config.audit_key == "e" * 40 and "e" * 40 not in repr(config)
    (tmp_path / "audit.key").write_text("f" * 64 + "\n")
    assert load_config(write(tmp_path, 'audit_key_file = "audit.key"\n' + CLUSTER)).audit_key == "f" * 64


def test_approval_rules_come_per_kind(tmp_path):
    """The top-level [approval] keys still work; [approval.<kind>] overrides them for one kind."""
    config = load_config(write(tmp_path, GOOD))
    rules = config.approval.rule("replace"), config.approval.rule("restore")
    assert (rules[0].approvals_needed, rules[1].approvals_needed) == (1, 2)
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


def test_the_restore_table_and_the_retired_spelling(tmp_path, monkeypatch):
    """One key, one spelling: `[approval.restore] approvals_needed`; the old `restore_approvals` is refused
    with a line that names the new spelling."""
    from pyrage import x25519
    identity = str(x25519.Identity.generate())
    monkeypatch.setenv("RESTORE_IDENTITY", identity)
    cluster = ('[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n[clusters.restore]\n'
               'data_dir = "/srv/etcd/{name}"\nage_identity_env = "RESTORE_IDENTITY"\n')
    default = load_config(write(tmp_path, cluster))
    assert default.approval.rule("restore").approvals_needed == 2
    assert default.clusters[0].restore.data_dir == "/srv/etcd/{name}"
    assert default.clusters[0].restore.age_identity == identity and identity not in repr(default)
    canonical = load_config(write(tmp_path, "[approval.restore]\napprovals_needed = 3\n" + cluster))
    assert canonical.approval.rule("restore").approvals_needed == 3
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[approval]\nrestore_approvals = 3\n" + cluster))
    assert str(e.value).endswith("approval.restore_approvals: retired; write [approval.restore] approvals_needed = N")
    lenient = load_config(write(tmp_path, "[approval]\nallow_self_approval = true\n" + cluster)).approval
    assert lenient.rule("replace").allow_self_approval and not lenient.rule("restore").allow_self_approval


def test_every_kind_of_plan_has_its_approval_table():
    """`[approval.<kind>]` is a key of [approval] for each kind, with the kind's number of approvers."""
    from bot.config import APPROVALS_NEEDED, ApprovalConfig
    from bot.domain.plan import PlanKind
    assert set(APPROVALS_NEEDED) == set(PlanKind)
    for kind in PlanKind:
        config = parse_config({"approval": {kind.value: {}}, "clusters": [{"name": "a", "endpoints": ["http://h:1"]}]},
                              Path("/"))
        assert config.approval.rule(kind).approvals_needed == APPROVALS_NEEDED[kind] == ApprovalConfig().rule(kind) \
            .approvals_needed


@pytest.mark.parametrize("snippet, message", [
    ("[approval.restore]\napprovals_needed = 0\n", "approval.restore.approvals_needed: must be 1 or more"),
    ('[[clusters]]\nname = "b"\nendpoints = ["http://h:2"]\n[clusters.restore]\nage_identity_env = "PATH"\n',
     "clusters[0].restore.age_identity_env: not an age identity"),
    ('[[clusters]]\nname = "b"\nendpoints = ["http://h:2"]\nlauncher = { kind = "command", argv = ["x", "{verb}"] }\n',
     "use {name}, {peer_url}, {client_url} or {action}"),
])
def test_restore_config_mistakes(tmp_path, snippet, message):
    text = snippet if "[[clusters]]" in snippet else snippet + '[[clusters]]\nname = "a"\nendpoints = ["http://h:1"]\n'
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


def test_a_typo_in_a_required_key_points_at_the_typo(tmp_path):
    """Not at the key it leaves missing: the typo is what the person has to fix."""
    for text, message in [('[[clusters]]\nname = "a"\nendpionts = ["http://h:1"]\n',
                           "clusters[0].endpionts: unknown key"),
                          ('[[clusters]]\nnme = "a"\nendpoints = ["http://h:1"]\n', "clusters[0].nme: unknown key"),
                          ('[snapshots.store]\nurll = "s3://b/p"\n' + MINIMAL, "snapshots.store.urll: unknown key"),
                          ('[[cluster]]\nname = "a"\nendpoints = ["http://h:1"]\n', "cluster: unknown key")]:
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, text))
        assert str(e.value).endswith(message), str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[[clusters]]\nname = "a"\n'))
    assert str(e.value).endswith("clusters[0].endpoints: at least one endpoint is needed")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, '[snapshots.store]\nregion = "x"\n' + MINIMAL))
    assert str(e.value).endswith("snapshots.store.url: missing (like s3://etcd-backups/prod or file:///mnt/backups)")


@pytest.mark.parametrize("snippet, key", [
    ('source = "other.toml"\n' + MINIMAL, "source"),
    ('database_password = "pw"\n' + MINIMAL, "database_password"),
    (MINIMAL + 'password = "pw"\n', "clusters[0].password"),
    ('[snapshots]\nevery_seconds = 3600\n' + MINIMAL, "snapshots.every_seconds"),
    (MINIMAL + '[clusters.watch]\ninterval_seconds = 5\n', "clusters[0].watch.interval_seconds"),
    (MINIMAL + '[clusters.access]\nreader_users = ["U0SRE00001"]\n', "clusters[0].access.reader_users"),
    (MINIMAL + '[clusters.restore]\nage_identity = "AGE-SECRET-KEY-1X"\n', "clusters[0].restore.age_identity"),
])
def test_what_the_bot_holds_under_another_name_is_not_a_key(tmp_path, snippet, key):
    """Secrets come from their _env/_file keys, durations from their text keys, roles from their lists: the
    names the bot holds them by are refused like any unknown key (and the secret is not repeated)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, snippet))
    assert str(e.value).endswith(f"{key}: unknown key") and "pw" not in str(e.value).split(": ", 1)[1]


def test_a_date_is_one_line_naming_its_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[approval]\nttl_minutes = 2026-01-01\n" + MINIMAL))
    assert str(e.value).endswith("approval.ttl_minutes: no key takes a date or a time, got 2026-01-01")


def test_a_launchers_timeout_defaults_by_its_kind(tmp_path):
    def timeout(launcher: str) -> float:
        return load_config(write(tmp_path, MINIMAL + f"launcher = {launcher}\n")).clusters[0].launcher.timeout_seconds
    assert timeout('{ kind = "manual" }') == 600.0
    assert timeout('{ kind = "command", argv = ["start", "{name}"] }') == 120.0
    assert timeout('{ kind = "command", argv = ["start", "{name}"], timeout_seconds = 30 }') == 30.0


def test_a_copy_keeps_what_the_loader_read(tmp_path, monkeypatch):
    """dataclasses.replace on a loaded configuration (tests and the bot do) keeps its secrets and paths."""
    monkeypatch.setenv("AUDIT_KEY", "e" * 40)
    monkeypatch.setenv("ETCD_A_PW", "s3cret-pw")
    config = load_config(write(tmp_path, 'audit_key_env = "AUDIT_KEY"\n[snapshots.store]\nurl = "file:///b"\n'
                                         + MINIMAL + 'username = "root"\npassword_env = "ETCD_A_PW"\n'))
    monkeypatch.delenv("AUDIT_KEY")
    copy = dataclasses.replace(config, replicas=ReplicasConfig(replica_id="r1"))
    assert (copy.audit_key, copy.source, copy.database) == ("e" * 40, config.source, tmp_path / "etcd-chatops.db")
    assert copy.clusters[0].password == "s3cret-pw" and copy.manifest_keys() == ["e" * 40]
    assert copy.replicas.replica_id == "r1" and "s3cret-pw" not in repr(copy) and "e" * 40 not in repr(copy)


# ---------------------------------------------------------------- the published JSON Schema

SCHEMA = ROOT / "deploy" / "etcd-chatops.schema.json"


def test_the_published_schema_is_the_one_the_tables_generate():
    assert SCHEMA.read_text() == config_schema.text(), \
        "the configuration changed: python -m bot.config.schema > deploy/etcd-chatops.schema.json"


def shipped_configs() -> dict[str, str]:
    """The configurations a person copies: the README's example and the Kubernetes ConfigMaps."""
    readme = (ROOT / "README.md").read_text().split("## Configuration reference", 1)[1]
    (configmap,) = yaml.safe_load_all((ROOT / "deploy/kubernetes/configmap.yaml").read_text())
    (patch,) = yaml.safe_load((ROOT / "deploy/kubernetes-ha/configmap-patch.yaml").read_text())
    example = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert example is not None, "the README's configuration section has no TOML example"
    return {"README.md": example.group(1),
            "kubernetes/configmap.yaml": configmap["data"]["config.toml"],
            "kubernetes-ha/configmap-patch.yaml": patch["value"]}


@pytest.mark.parametrize("name", shipped_configs())
def test_the_documented_and_shipped_configurations_follow_the_schema(name):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(tomllib.loads(shipped_configs()[name])))
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("toml", [
    GOOD.replace("ttl_minutes = 30", "ttl_minuts = 30"),
    GOOD.replace("ttl_minutes = 30", 'ttl_minutes = "30"'),
    GOOD.replace("ttl_minutes = 30", "ttl_minutes = 0"),
    GOOD.replace('channels = ["C0INCIDENT"]', 'channels = ["#incident"]'),
    GOOD.replace('launcher = { kind = "manual" }', 'launcher = { kind = "ssh" }'),
    GOOD.replace('launcher = { kind = "manual" }', 'launcher = { kind = "manual" }\nwatch = { interval = "soon" }'),
    GOOD.replace('name = "prod"', 'name = "prod"\npassword = "inline"'),
    GOOD.replace('[[clusters]]', '[snapshots]\nkeep_last = 0\n[[clusters]]'),
    GOOD.replace('[[clusters]]', '[replicas]\nlease_seconds = 61\n[[clusters]]'),
    GOOD.replace('name = "prod"\n', ''),
    'database = "x.db"\n',
])
def test_the_schema_refuses_what_the_bot_refuses_by_shape(tmp_path, toml):
    """An editor flags these as the bot would: unknown keys (at every level), types, ranges, names, kinds."""
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, toml))
    assert not jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).is_valid(tomllib.loads(toml))


def test_the_readme_example_passes_check_config_as_written(tmp_path, monkeypatch, cli):
    """The README's reference example is what `check-config --example` prints, and the real CLI takes it as
    written once the files and variables it names exist (its paths are relative to the file)."""
    from pyrage import x25519
    example = shipped_configs()["README.md"]
    printed = cli("check-config", "--example")
    assert printed.returncode == 0 and printed.stdout == example and not printed.stderr
    (tmp_path / "config.toml").write_text(example)
    data = tomllib.loads(example)
    (prod,) = data["clusters"]
    identity = x25519.Identity.generate()
    for name in (prod["cacert"], prod["cert"], prod["key"], prod["restore"]["age_identity_file"]):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# stand-in\n{identity}\n")
    for variable in ("ETCD_CHATOPS_AUDIT_KEY", "ETCD_CHATOPS_MANIFEST_KEY", "ETCD_PROD_PASSWORD",
                     "ETCD_CHATOPS_ALERTMANAGER_TOKEN"):
        monkeypatch.setenv(variable, "stand-in-secret-" + "x" * 32)
    checked = cli("check-config", str(tmp_path / "config.toml"))
    assert checked.returncode == 0, checked.stderr
    assert "cluster prod: 3 endpoint(s), mutual TLS" in checked.stdout
    config = load_config(tmp_path / "config.toml")
    (cluster,) = config.clusters
    assert cluster.snapshots.keep_last == 30 and cluster.snapshots.every_seconds == 6 * 3600  # own, then [snapshots]
    assert cluster.access.approvers.users == ("U0LEAD0001",) and cluster.watch.cert_warning_seconds == 14 * 86400
    assert cluster.restore.age_identity == str(identity) and config.approval.rule("restore").approvals_needed == 2
    assert cluster.launcher.timeout_seconds == 600
    assert config.alertmanager.enabled and cluster.alert_match == {"cluster": "prod"}
    assert cluster.watch.quota_critical == 0.95


def _ssh_key(tmp_path, passphrase: bytes | None = None) -> str:
    """An ed25519 key as ssh-keygen writes it; with a passphrase, as PKCS#8 (OpenSSH's own encryption needs bcrypt,
    which the bot does not install: both formats are read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / ("id_locked" if passphrase else "id_ed25519")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(passphrase)) if passphrase else
                     key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    return str(path)


def _ssh(tmp_path, extra: str = "", key: str | None = None) -> str:
    (tmp_path / "known_hosts").write_text("")
    return (MINIMAL + '[clusters.launcher]\nkind = "ssh"\nrecipe = "static-pod"\n'
            f'key_file = "{key or _ssh_key(tmp_path)}"\nknown_hosts = "{tmp_path / "known_hosts"}"\n' + extra)


def test_an_ssh_launcher_in_table_form_with_hosts_and_per_host_paths(tmp_path):
    launcher = load_config(write(tmp_path, _ssh(tmp_path, 'hosts = { m2 = "10.0.0.9:2222", m3 = "[fd00::3]" }\n'
                                                          'manifests_dir = "/srv/{name}/manifests"\n'))
                           ).clusters[0].launcher
    assert launcher.kind == "ssh" and launcher.has_actions and launcher.timeout_seconds == 300.0
    assert launcher.host_of("m1", "https://10.0.0.2:2380") == ("10.0.0.2", 22)   # the peer URL's host by default
    assert launcher.host_of("m2", "https://10.0.0.3:2380") == ("10.0.0.9", 2222)
    assert launcher.host_of("m3", "https://10.0.0.4:2380") == ("fd00::3", 22)
    assert launcher.on_host(launcher.manifests_dir, "m2") == "/srv/m2/manifests"
    assert launcher.key is not None and "OPENSSH PRIVATE KEY" in launcher.key and "key=" not in repr(launcher)


@pytest.mark.parametrize(("extra", "message"), [
    ('hosts = { m1 = "10.0.0.2:99999" }\n', "clusters[0].launcher.hosts.m1: '10.0.0.2:99999' is not host or host:port"),
    ('manifests_dir = "/etc/k8s;reboot"\n', "clusters[0].launcher.manifests_dir: '/etc/k8s;reboot' has a character"),
    ('unit = "etcd-{host}.service"\n', "clusters[0].launcher.unit: 'etcd-{host}.service' has a character"),
    ('node_command = ["sudo -n etcd-chatops-node"]\n', "clusters[0].launcher.node_command[0]:"),
    ('argv = ["x"]\n', "clusters[0].launcher.argv: only a command launcher takes argv"),
])
def test_an_ssh_launchers_mistakes_name_their_key(tmp_path, extra, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, _ssh(tmp_path, extra)))
    assert message in str(e.value)


def test_an_ssh_key_that_is_not_usable_is_refused_without_showing_it(tmp_path):
    locked = _ssh_key(tmp_path, b"passphrase-123")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, _ssh(tmp_path, key=locked)))
    assert "clusters[0].launcher.key_file: the SSH key is encrypted with a passphrase" in str(e.value)
    garbage = tmp_path / "not-a-key"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWxvb2tpbmctYnl0ZXM=\n"
                       "-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, _ssh(tmp_path, key=str(garbage))))
    assert str(e.value).endswith("clusters[0].launcher.key_file: not an SSH private key (like ssh-keygen -t ed25519 "
                                 "writes)")
    assert "c2VjcmV0" not in str(e.value)


def test_the_ssh_key_is_redacted_from_every_log_line(tmp_path):
    """The key is a secret like the passwords: the bot registers it for its logs, line by line, so a log line
    that quoted it by mistake (its newlines escaped, as JSON writes them) shows none of it."""
    import logging

    from bot import logs
    config = load_config(write(tmp_path, _ssh(tmp_path)))
    key = config.clusters[0].launcher.key
    assert key is not None
    logs.register_secret(*config.secrets())   # as `etcd-chatops run` does
    record = logging.LogRecord("bot.ops.ssh", logging.ERROR, __file__, 1, "login failed with %r", (key,), None)
    line = logs.JsonFormatter().format(record)
    body = [part for part in key.splitlines() if part and not part.startswith("-----")]
    assert body and not [part for part in body if part in line], line
    assert logs.REDACTED in line
