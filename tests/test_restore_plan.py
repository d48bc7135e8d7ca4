"""The restore planner (pure): which snapshot, when it may run, and every member's exact etcdutl command."""
from __future__ import annotations

import json

import pytest

from bot.domain.errors import Refusal
from bot.domain.plan import PlanState
from bot.domain.quorum import QuorumEvidence, QuorumVerdict, Seen, Voter
from bot.domain.restore import BUMP_REVISIONS, Membership, booted_revision
from bot.domain.snapshot import SnapshotRecord, SnapshotRef
from bot.ops.restore.plan import choose_snapshot, plan_restore
from bot.output.blocks import PlanView, restore_plan_reply
from helpers import snapshot_record

MEMBERS = Membership(tuple((f"{i:016x}", f"m{i}", (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",))
                           for i in (1, 2, 3)), "recorded", 1000.0)


def row(i: int, revision: int) -> SnapshotRecord:
    return snapshot_record(id=i, path=f"/snap/prod/prod-rev{revision}.db", revision=revision, hash="abc", total_keys=9,
                           total_size=20480, file_size=20512, sha256="0" * 64, encrypted=0, created_at=100.0 * i,
                           member="m1", live_keys=None)


ROWS = [row(3, 30), row(2, 20), row(1, 10)]  # newest first, as the catalog lists them


def evidence(healthy: int, voting: int = 3) -> QuorumEvidence:
    """`healthy` voters answer with a leader (m1); the launcher's status reports the others stopped."""
    return QuorumEvidence("prod", tuple(Voter(f"m{i}", Seen.LEADER if i <= healthy else Seen.STOPPED, i, 1)
                                        for i in range(1, voting + 1)))


LOST = evidence(1)
VIEW = PlanView(state=PlanState.PROPOSED, proposer="U0ONCALL01", approvers="x", expires_at=0, reaction="ok",
                reject_reaction="x")


def plan(quorum=LOST, force=False, version="3.5.1", launcher="command", actions=True, **kw):
    snapshot, newer = choose_snapshot(ROWS, kw.pop("wanted", None))
    return plan_restore("prod", snapshot, newer, kw.pop("membership", MEMBERS), quorum=quorum, force=force,
                        current_revision=kw.pop("current", None), data_dir="/var/lib/etcd/{name}",
                        etcd_version=version, launcher=launcher, launcher_has_actions=actions,
                        **{k: kw.pop(k) for k in ("recipe", "apiserver") if k in kw})


def test_the_newest_snapshot_by_default_and_newer_ones_are_named():
    assert plan().snapshot.revision == 30 and plan().newer == ()
    by_name = plan(wanted="prod-rev10.db")
    assert by_name.snapshot.revision == 10 and by_name.newer == ("prod-rev30.db", "prod-rev20.db")
    assert plan(wanted="20").snapshot.file_name == "prod-rev20.db"
    with pytest.raises(Refusal, match="no recorded snapshot named or at revision '99'"):
        plan(wanted="99")
    with pytest.raises(Refusal, match="no verified snapshot"):
        choose_snapshot([], None)


def store_only(name: str, created: float, revision: int = 40, foreign: str = "", sha256: str = "1" * 64,
               encrypted: bool = False) -> SnapshotRef:
    """An object only the store holds (no catalog row): the bot's own (signed manifest) or foreign."""
    return SnapshotRef(id=0, path=f"/snap/prod/{name}", revision=revision, hash="abc", total_keys=9,
                       total_size=20480, file_size=20512, sha256=sha256, encrypted=encrypted, created_at=created,
                       member="m1", remote_url=f"s3://b/p/prod/{name}", foreign=foreign)


def test_the_default_is_the_newest_the_catalog_knows_and_a_foreign_object_is_chosen_only_by_name_and_force():
    planted = store_only("planted.db", 9e9, revision=30, foreign="its manifest is not signed")
    signed = store_only("signed.db", 500.0)
    refs = [planted, signed, *(SnapshotRef.of(r) for r in ROWS)]
    assert choose_snapshot(refs, None) == (SnapshotRef.of(ROWS[0]), ("signed.db",))
    assert choose_snapshot(refs, "signed.db")[0] == signed          # the bot's own, only in the store: by name
    assert choose_snapshot(refs, "30")[0].file_name == "prod-rev30.db"  # a revision never names a foreign one
    with pytest.raises(Refusal, match="planted.db is foreign, not a snapshot this bot took: its manifest is not "
                                      "signed") as e:
        choose_snapshot(refs, "planted.db")
    assert "by name with --force" in (e.value.hint or "")
    assert choose_snapshot(refs, "planted.db", foreign_ok=True) == (planted, ())
    assert choose_snapshot(refs, "prod-rev20.db")[1] == ("signed.db", "prod-rev30.db")  # never a foreign name
    bare = store_only("bare.db", 1.0, foreign="it has no manifest", sha256="")
    with pytest.raises(Refusal, match="bare.db is foreign .it has no manifest.: nothing says what it holds"):
        choose_snapshot([bare], "bare.db", foreign_ok=True)
    with pytest.raises(Refusal, match="the bot's catalog records no snapshot of this cluster; the store holds 1 it "
                                      "wrote, the newest signed.db"):
        choose_snapshot([planted, signed], None)
    with pytest.raises(Refusal, match="no verified snapshot"):
        choose_snapshot([planted], None)


def test_a_cluster_that_encrypts_takes_a_plaintext_object_only_from_its_catalog():
    plain, sealed = store_only("plain.db", 2.0), store_only("sealed.db.age", 1.0, encrypted=True)
    refs = [plain, sealed, SnapshotRef.of(ROWS[0])]   # the catalog's row is plaintext (taken before age_recipients)
    with pytest.raises(Refusal, match="plain.db is plaintext, this cluster encrypts its snapshots"):
        choose_snapshot(refs, "plain.db", foreign_ok=True, encrypted_only=True)
    assert choose_snapshot(refs, "sealed.db.age", encrypted_only=True)[0] == sealed
    assert choose_snapshot(refs, None, encrypted_only=True)[0].file_name == "prod-rev30.db"
    assert choose_snapshot(refs, "plain.db")[0] == plain


def test_quorum_gate_and_force():
    with pytest.raises(Refusal, match="still has quorum .2 of 3") as e:
        plan(quorum=evidence(2))
    assert "--force" in (e.value.hint or "")
    forced = plan(quorum=evidence(3), force=True, current=75)
    assert forced.revisions_lost == 45 and forced.force


def test_a_command_launcher_needs_actions():
    with pytest.raises(Refusal, match=r"no \{action\}"):
        plan(actions=False)
    assert plan(launcher="manual", actions=False).launcher == "manual"


def test_every_member_gets_its_own_exact_command_and_a_new_token():
    p, other = plan(), plan()
    assert p.token != other.token and p.id in p.token
    initial = "m1=http://10.0.0.1:2380,m2=http://10.0.0.2:2380,m3=http://10.0.0.3:2380"
    for m in p.members:
        assert p.restore_args(m, "/tmp/s.db") == [
            "etcdutl", "snapshot", "restore", "/tmp/s.db", "--name", m.name, "--initial-cluster", initial,
            "--initial-cluster-token", p.token, "--initial-advertise-peer-urls", m.peer_url,
            "--data-dir", f"/var/lib/etcd/{m.name}"]
    assert not p.bump_supported
    newer = plan(version="3.5.10")
    assert newer.restore_args(newer.members[0], "s.db")[-3:] == ["--bump-revision", "1000000000", "--mark-compacted"]


def test_the_launcher_environment_per_action():
    p = plan()
    m = p.members[1]
    assert p.environment(m, "stop") == {"ETCD_CHATOPS_ACTION": "stop"}
    start = p.environment(m, "start")
    assert start["ETCD_NAME"] == "m2" and start["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == "http://10.0.0.2:2380"
    assert start["ETCD_LISTEN_CLIENT_URLS"] == "http://10.0.0.2:2379" and "ETCD_CHATOPS_SNAPSHOT" not in start
    restore = p.environment(m, "restore", "/abs/s.db")
    assert restore["ETCD_INITIAL_CLUSTER_TOKEN"] == p.token and restore["ETCD_CHATOPS_SNAPSHOT"] == "/abs/s.db"
    assert restore["ETCD_CHATOPS_ACTION"] == "restore"
    assert not any(k.startswith(("ETCD_CHATOPS_BUMP", "ETCD_CHATOPS_MARK")) for k in restore)  # 3.5.1: no bump


def test_a_launcher_is_told_to_bump_the_revision_where_etcdutl_can():
    """The check step expects the snapshot's revision plus the bump on 3.5.10 and later: the launcher's
    restore must apply it (before, a command launcher never heard of it and every such restore failed its check)."""
    p = plan(version="3.6.17")
    restore = p.environment(p.members[0], "restore", "/abs/s.db")
    assert restore["ETCD_CHATOPS_BUMP_REVISION"] == "1000000000" and restore["ETCD_CHATOPS_MARK_COMPACTED"] == "true"
    assert "ETCD_CHATOPS_BUMP_REVISION" not in p.environment(p.members[0], "start")


@pytest.mark.parametrize("version,bump", [("3.4.30", False), ("3.5.1", False), ("3.5.9", False), ("3.5.10", True),
                                          ("3.5.36", True), ("3.6.17", True), ("", False)])
def test_the_launcher_gets_the_revision_bump_exactly_when_the_members_etcdutl_takes_it(version, bump):
    """etcdutl's --bump-revision and --mark-compacted came in 3.5.10 (3.5.9's lacks them) and 3.6: the restore
    action is told to pass them (the command shown has them, and the check step expects the bumped revision)."""
    p = plan(version=version)
    env = p.environment(p.members[0], "restore", "/abs/s.db")
    wanted = {"ETCD_CHATOPS_BUMP_REVISION": "1000000000", "ETCD_CHATOPS_MARK_COMPACTED": "true"} if bump else {}
    assert {k: v for k, v in env.items() if k.startswith(("ETCD_CHATOPS_BUMP", "ETCD_CHATOPS_MARK"))} == wanted
    assert ("--bump-revision" in p.restore_args(p.members[0], "s.db")) is bump
    assert all("BUMP" not in k for k in p.environment(p.members[0], "start"))


def test_etcd_34_restores_with_its_etcdctl():
    """etcd 3.4 has no etcdutl (its etcdctl restores); 3.6's etcdctl no longer can (etcdutl only)."""
    old = plan(version="3.4.30")
    assert old.restore_args(old.members[0], "s.db")[:3] == ["etcdctl", "snapshot", "restore"]
    for version in ("3.5.1", "3.6.17", ""):
        assert plan(version=version).restore_tool == "etcdutl"


# ---------------------------------------------------------------- the quorum gate: evidence, never "I cannot reach it"

def voters(*seen: Seen, leaderless: tuple[str, ...] = (), leader: int = 0) -> QuorumEvidence:
    return QuorumEvidence("prod", tuple(Voter(f"m{i}", s, i, leader if s is Seen.LEADER else 0)
                                        for i, s in enumerate(seen, 1)), frozenset(leaderless), 3.0)


def test_unreachable_is_not_quorum_lost():
    """Members the bot cannot reach prove nothing, whatever the launcher says short of "stopped"."""
    for seen in (Seen.SILENT, Seen.RUNNING):
        nothing = voters(seen, seen, seen)
        assert nothing.verdict is QuorumVerdict.UNPROVEN and not nothing.settling
        assert nothing.reason == "I cannot reach any member of prod from here: this is not proof that it lost quorum"
    assert voters().verdict is QuorumVerdict.UNPROVEN  # no membership at all proves nothing either
    # m1 has no leader for long, but the launcher says m2 and m3 run: m1 may be cut off from a healthy pair
    partition = voters(Seen.NO_LEADER, Seen.RUNNING, Seen.SILENT, leaderless=("m1",))
    assert partition.verdict is QuorumVerdict.UNPROVEN and not partition.settling
    assert partition.reason.startswith("this is not proof that prod lost quorum: m1: answering, without a leader")


def test_quorum_loss_needs_members_stopped_or_leaderless_for_the_settle_time():
    killed = voters(Seen.STOPPED, Seen.STOPPED, Seen.LEADER, leader=1)  # m3 still names the dead leader
    assert killed.verdict is QuorumVerdict.LOST and (killed.voting, killed.answering) == (3, 1)
    assert killed.describe() == "m1, m2: stopped (the launcher's status); m3: answering, with a leader"
    assert voters(Seen.STOPPED, Seen.STOPPED, Seen.STOPPED).verdict is QuorumVerdict.LOST
    # an election in a healthy cluster: nobody has a leader for a moment; only the settle time tells
    election = voters(Seen.NO_LEADER, Seen.NO_LEADER, Seen.NO_LEADER)
    assert election.verdict is QuorumVerdict.UNPROVEN and election.settling
    settled = voters(Seen.NO_LEADER, Seen.NO_LEADER, Seen.NO_LEADER, leaderless=("m1", "m2", "m3"))
    assert settled.verdict is QuorumVerdict.LOST and "answering, without a leader for 3 s" in settled.describe()
    cut_off = voters(Seen.NO_LEADER, Seen.STOPPED, Seen.RUNNING, leaderless=("m1",))
    assert cut_off.verdict is QuorumVerdict.LOST  # m3 alone cannot make a quorum of 3
    # the manual launcher tells nothing: what the members that answer see decides, and the plan lists it
    manual = voters(Seen.NO_LEADER, Seen.SILENT, Seen.SILENT, leaderless=("m1",))
    assert manual.verdict is QuorumVerdict.LOST
    assert manual.describe() == "m1: answering, without a leader for 3 s; m2, m3: not answering the bot"
    assert voters(Seen.NO_LEADER, Seen.SILENT, Seen.SILENT).verdict is QuorumVerdict.UNPROVEN  # not for long yet
    # a leader cut off from its quorum steps down, and a follower notices, within an election timeout: look again
    for leader in (1, 2):
        stale = voters(Seen.LEADER, Seen.SILENT, Seen.SILENT, leader=leader)
        assert stale.verdict is QuorumVerdict.UNPROVEN and stale.settling
    held = voters(Seen.LEADER, Seen.LEADER, Seen.SILENT, leader=1)
    assert held.verdict is QuorumVerdict.HELD and held.reason.startswith("prod still has quorum (2 of 3")


def test_without_evidence_a_restore_needs_force_and_its_plan_says_the_cluster_may_be_healthy():
    with pytest.raises(Refusal) as refused:
        plan(quorum=voters(Seen.RUNNING, Seen.RUNNING, Seen.RUNNING))
    assert refused.value.reason == ("I cannot reach any member of prod from here: this is not proof that it lost "
                                    "quorum")
    assert "--force" in (refused.value.hint or "")
    forced = plan(quorum=voters(Seen.SILENT, Seen.SILENT, Seen.SILENT), force=True)
    assert forced.quorum_verdict is QuorumVerdict.UNPROVEN
    reply = restore_plan_reply(forced, VIEW, now=1000.0)
    first = reply.text.splitlines()[0]
    name = forced.snapshot.file_name
    assert first.startswith(f"Restore prod from {name} (revision {forced.snapshot.revision}), although prod may be "
                            "healthy — needs 1 approver")
    assert reply.blocks[0]["text"]["text"] == first.split(". Plan ")[0]
    assert "Quorum is lost" not in json.dumps(reply.blocks)
    lost = restore_plan_reply(plan(), VIEW, now=1000.0)
    assert "may be healthy" not in lost.text and "*Quorum is lost:* 1 of 3 voting members healthy" in json.dumps(
        lost.blocks)


def test_a_learner_that_never_started_is_left_out_and_the_plan_says_so():
    unstarted = "00000000000000aa"
    with_learner = Membership(MEMBERS.members + ((unstarted, "", ("http://10.0.0.9:2380",), ()),), "live", 1000.0,
                              frozenset({unstarted}))
    p = plan(membership=with_learner)
    assert [m.name for m in p.members] == ["m1", "m2", "m3"] and p.left_out == (unstarted,)
    assert "m1=http://10.0.0.1:2380,m2=http://10.0.0.2:2380,m3=http://10.0.0.3:2380" == p.initial_cluster
    text = json.dumps(restore_plan_reply(p, VIEW, now=1000.0).blocks)
    assert f"Left out:* {unstarted}: learner that never started" in text
    # a voter that never started is not left out silently: it votes, so the bot does not guess
    with pytest.raises(Refusal, match="has no name or peer URL"):
        plan(membership=Membership(with_learner.members, "live", 1000.0))


@pytest.mark.parametrize("launcher, recipe, apiserver, before, after", [
    ("command", None, "ask", "apiserver-stop stop", "check followups"),   # a person stops it: a step of its own
    ("manual", None, "ask", "apiserver-stop stop", "check followups"),
    ("ssh", "systemd", "ask", "apiserver-stop stop", "check followups"),   # external etcd: the apiservers elsewhere
    ("ssh", "static-pod", "ask", "apiserver-stop stop", "check apiserver followups"),   # the bot, both ways
    ("ssh", "static-pod", "none", "apiserver-stop stop", "check apiserver followups"),   # kubeadm always has one
    ("command", None, "none", "verify stop", "check followups"),   # no kube-apiserver uses this etcd
])
def test_kube_apiservers_stop_is_a_step_before_any_member_stops(launcher, recipe, apiserver, before, after):
    keys = [s.key for s in plan(launcher=launcher, recipe=recipe, apiserver=apiserver).steps]
    at = keys.index("stop")
    assert " ".join(keys[at - 1:at + 1]) == before and " ".join(keys[keys.index("check"):]) == after, keys


def test_a_plan_says_so_when_it_does_not_stop_kube_apiserver():
    asked = str(restore_plan_reply(plan(), VIEW).blocks)
    assert "1. Stop every kube-apiserver (a person does, then confirms with /etcd continue)" in asked
    assert "2. Stop every member" in asked and "does not stop kube-apiserver" not in asked
    none = restore_plan_reply(plan(apiserver="none"), VIEW)
    assert "Stop every kube-apiserver" not in str(none.blocks) and "1. Stop every member" in str(none.blocks)
    assert none.details is not None
    assert 'This plan does not stop kube-apiserver ([clusters.restore] apiserver = "none")' in none.details.text


def test_the_revision_a_restored_etcd_stands_at() -> None:
    """A snapshot of a cluster that never took a write holds revision 0 and etcd starts at 1; etcdutl's bump
    writes its revision above the snapshot's, 0 included (etcdutl 3.6: modifyLatestRevision)."""
    assert [booted_revision(0), booted_revision(1), booted_revision(41)] == [1, 1, 41]
    assert [booted_revision(0, BUMP_REVISIONS), booted_revision(41, BUMP_REVISIONS)] == \
        [BUMP_REVISIONS, 41 + BUMP_REVISIONS]
