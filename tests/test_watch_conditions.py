"""The watch's decisions without servers: which conditions are open given one round's
facts, what each suggests, grace, flapping and holding back."""
from __future__ import annotations

import dataclasses
import re

import pytest
from test_rendering import NASTY, pieces, plan_row

from bot.commands.grammar import UsageError
from bot.commands.table import parse
from bot.config import ClusterConfig, ConfigError, parse_config
from bot.domain.cluster import Alarm, Member, MemberHealth
from bot.domain.plan import PlanKind, PlanState
from bot.output import blocks
from bot.output.model import AlertView, short_duration
from bot.watch import (  # registered, as in the bot (backup_missed says nothing without a schedule)
    certificates,
    conditions,
    mixin,  # noqa: F401
)
from bot.watch.conditions import Facts, Finding, evaluate, expected, next_name
from bot.watch.tracker import FLAP_WINDOW, Act, Tracker
from helpers import cluster_health, member_status, snapshot_record

PROD = ClusterConfig(name="prod", endpoints=("http://10.0.0.1:2379",))


def member(i: int, up: bool = True, name: str | None = None, **status) -> MemberHealth:
    m = Member(i, f"member{i}" if name is None else name, (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",))
    if not up:
        return MemberHealth(m, error="connection refused")
    return MemberHealth(m, status=member_status(member_id=i, endpoint=m.client_urls[0], **status))


def facts(*members: MemberHealth, alarms: tuple[Alarm, ...] = (), **kw) -> Facts:
    """A round after every probe answered (no https URL: no certificate read)."""
    kw.setdefault("extra", {certificates.PROBE: []})
    return Facts(cluster=PROD, now=1000.0, health=cluster_health(*members, alarms=alarms), **kw)


def by_kind(f: Facts) -> dict[str, list[Finding]]:
    found = evaluate(f).findings
    out: dict[str, list[Finding]] = {}
    for x in found:
        out.setdefault(x.kind, []).append(x)
    return out


def test_a_healthy_cluster_has_no_open_condition():
    verdicts = evaluate(facts(member(1), member(2), member(3)))
    assert (verdicts.findings, verdicts.unknown, verdicts.failures) == ([], set(), [])


def test_member_down_suggests_a_filled_in_replace_and_status():
    found = by_kind(facts(member(1, up=False), member(2), member(3)))
    assert list(found) == ["member_down"]
    (down,) = found["member_down"]
    assert down.subject == "member1" and "connection refused" in down.summary
    assert down.suggestions == ("/etcd replace member1 member4 http://NEW-HOST:2380 --cluster prod",
                                "/etcd status prod")
    assert ("quorum", "2 of 3 voters healthy, 2 needed") in down.figures


def test_at_quorum_loss_no_member_down_suggests_a_replacement_which_would_be_refused():
    """A replacement needs quorum (etcd changes no membership without it, and the planner refuses): at a quorum
    loss the members' alerts suggest looking, offer no replacement button, and the quorum-lost alert offers
    the restore."""
    found = by_kind(facts(member(1, up=False), member(2, up=False), member(3)))
    for down in found["member_down"]:
        assert not any("replace" in s for s in down.suggestions), down.suggestions
        assert down.suggestions == ("/etcd status prod",) and down.offers == ()
    assert found["quorum_lost"][0].offers == ("restore",)
    (one,) = by_kind(facts(member(1, up=False), member(2), member(3)))["member_down"]
    assert one.offers == ("replace",)


def test_two_members_down_are_never_suggested_the_same_new_name():
    found = by_kind(facts(member(1, up=False), member(2, up=False), member(3), member(4), member(5)))
    names = [down.suggestions[0].split()[3] for down in found["member_down"]]
    assert names == ["member6", "member7"], found["member_down"]


def test_the_replacement_name_is_free():
    assert next_name("member1", {"member1", "member2", "member7"}) == "member8"
    assert next_name("etcd-a", {"etcd-a", "etcd-b"}) == "etcd-a-new"
    assert next_name("", set()) == "member-new"


def test_quorum_lost_names_the_newest_verified_snapshot():
    newest = snapshot_record(path="/snaps/prod-20261201T1200Z-r42.db", revision=42)
    found = by_kind(facts(member(1, up=False), member(2, up=False), member(3), newest_snapshot=newest))
    (lost,) = found["quorum_lost"]
    assert lost.suggestions[0] == "/etcd restore prod-20261201T1200Z-r42.db --cluster prod"
    assert ("quorum", "1 of 3 voters healthy, 2 needed") in lost.figures
    assert len(found["member_down"]) == 2
    without = by_kind(facts(member(1, up=False), member(2, up=False), member(3)))["quorum_lost"][0]
    assert without.suggestions[0] == "/etcd snapshots prod" and ("newest verified snapshot", "none recorded") in \
        without.figures


def test_a_cluster_that_does_not_answer_is_unreachable_not_quorum_lost_and_nothing_else_can_tell():
    """Nothing answering the bot is not proof of a quorum loss (a rotated CA, a cut network): the alert says so
    and suggests looking, never a restore, which the quorum gate would refuse without --force."""
    verdicts = evaluate(Facts(cluster=PROD, now=0.0, health=None, error="all endpoints: deadline exceeded"))
    found, unknown = verdicts.findings, verdicts.unknown
    assert [f.kind for f in found] == ["unreachable"] and "deadline exceeded" in found[0].summary
    assert "not proof that prod lost quorum" in found[0].summary
    assert not any("restore" in s for s in found[0].suggestions)
    assert unknown == {"member_down", "quorum_lost", "alarm", "quota", "leader_churn", "certificate", "no_leader",
                       "peer_failures", "peer_rtt", "grpc_failed", "grpc_slow", "proposals_failed", "wal_fsync",
                       "backend_commit", "fragmentation", "db_growth"}


def test_alarms_suggest_defrag_or_consistency():
    found = by_kind(facts(member(1), member(2), member(3), alarms=(Alarm(1, "NOSPACE"), Alarm(2, "NOSPACE"),
                                                                    Alarm(3, "CORRUPT"))))["alarm"]
    nospace, corrupt = sorted(found, key=lambda f: f.subject, reverse=True)
    assert nospace.subject == "NOSPACE" and nospace.suggestions[0] == "/etcd defrag prod"
    assert ("raised on", "member1, member2") in nospace.figures
    assert corrupt.subject == "CORRUPT" and corrupt.suggestions[0] == "/etcd consistency prod"


def test_quota_opens_above_80_percent_on_any_member():
    quotas = {1: 1000_000, 2: 1000_000, 3: 1000_000}
    calm = facts(member(1, db_size=800_000), member(2), member(3), quotas=quotas)
    assert "quota" not in by_kind(calm)
    (full,) = by_kind(facts(member(1, db_size=850_000), member(2), member(3), quotas=quotas))["quota"]
    assert "member1" in full.summary and full.suggestions == ("/etcd defrag prod",)
    assert full.figures == (("member1", "850 kB of 1.0 MB (85 %)"),)
    assert "quota" not in by_kind(facts(member(1, db_size=850_000), member(2), member(3)))  # quota unknown


def test_a_member_added_with_an_unusable_peer_url_is_one_member_down_that_shows_the_url():
    """etcd accepts `member add --peer-urls=http://127.0.0.1:238000`; the watch reads it, says it is unusable,
    and suggests a replacement with etcd's default peer port."""
    odd = MemberHealth(Member(9, "", ("http://127.0.0.1:238000",), ()), error="unstarted: no client URL published yet")
    verdicts = evaluate(facts(member(1), member(2), member(3), odd))
    assert verdicts.failures == [] and verdicts.unknown == set()
    (down,) = [f for f in verdicts.findings if f.kind == "member_down"]
    assert down.subject == "0000000000000009"
    assert ("peer URLs", "unusable URL 'http://127.0.0.1:238000' (port out of range)") in down.figures
    assert down.suggestions[0] == "/etcd replace 0000000000000009 member-new https://NEW-HOST:2380 --cluster prod"


def test_a_condition_that_raises_is_unknown_and_the_others_go_on(monkeypatch):
    def broken(f: Facts) -> list[Finding]:
        raise ValueError("Port out of range 0-65535")
    monkeypatch.setitem(conditions.CONDITIONS, "broken", conditions.Condition("broken", "broken", broken))
    verdicts = evaluate(facts(member(1, up=False), member(2), member(3)))
    assert [f.key for f in verdicts.findings] == [("member_down", "member1")]
    assert verdicts.unknown == {"broken"}
    (failure,) = verdicts.failures
    assert failure.key == ("broken", None) and "Port out of range" in str(failure.error)


def test_a_member_whose_check_raises_costs_its_own_finding_and_its_alert_stands_still(monkeypatch):
    real = conditions.new_peer_url

    def fragile(peer_urls: tuple[str, ...]) -> str:
        if peer_urls == ("http://10.0.0.2:2380",):
            raise ValueError("Port out of range 0-65535")
        return real(peer_urls)
    monkeypatch.setattr(conditions, "new_peer_url", fragile)
    verdicts = evaluate(facts(member(1, up=False), member(2, up=False), member(3), member(4), member(5)))
    assert [f.key for f in verdicts.findings] == [("member_down", "member1")]
    assert verdicts.unsure == {("member_down", "member2")} and [f.key for f in verdicts.failures] == [
        ("member_down", "member2")]
    t = Tracker(grace=0)
    member2 = dataclasses.replace(DOWN, subject="member2")
    t.step([DOWN, member2], set(), 0.0)
    decisions = t.step(verdicts.findings[:1], verdicts.unknown, 100.0, unsure=verdicts.unsure)
    assert [(d.act, d.track.finding.subject) for d in decisions] == [(Act.UPDATE, "member1")]
    assert t.tracks[member2.key].open and t.tracks[member2.key].absent_since is None   # not resolved: unknown


def test_leader_churn_opens_above_three_changes():
    assert "leader_churn" not in by_kind(facts(member(1), leader_changes=3))
    (churn,) = by_kind(facts(member(1), leader_changes=4))["leader_churn"]
    assert churn.suggestions == ("/etcd perf prod",) and "4 leader changes in 5 minutes" in churn.summary


# ---------------------------------------------------------------- grace, flapping, holding back

DOWN = Finding("member_down", "member1", "connection refused", members=("member1", "0000000000000001"))


def run(tracker: Tracker, rounds: list[tuple[float, bool]], **kw) -> list[tuple[float, Act]]:
    out = []
    for now, present in rounds:
        out += [(now, d.act) for d in tracker.step([DOWN] if present else [], set(), now, **kw)]
    return out


def test_a_condition_opens_after_grace_once_and_resolves_after_grace():
    t = Tracker(grace=45)
    acts = run(t, [(0, True), (15, True), (30, True), (45, True), (60, True), (75, False), (90, False), (120, False)])
    assert [a for _, a in acts if a != Act.UPDATE] == [Act.OPEN, Act.RESOLVE]
    assert acts[0] == (45, Act.OPEN) and (120, Act.RESOLVE) in acts
    track = t.tracks[DOWN.key]
    assert (track.opened_at, track.resolved_at) == (0, 75)   # it lasted from 0 until first seen gone


def test_a_round_a_few_milliseconds_early_still_opens_and_resolves_on_time():
    """Grace is 3 intervals; the rounds drift 10 ms early. Without the jitter allowance the alert
    waited a 4th round (the fleet bench saw 75 s from kill to alert against a 65 s goal)."""
    rounds = [(15 * i - 0.01 * i, i < 6) for i in range(12)]
    acts = [(round(now), a) for now, a in run(Tracker(grace=45, jitter=1.0), rounds) if a != Act.UPDATE]
    assert acts == [(45, Act.OPEN), (135, Act.RESOLVE)]
    assert [a for _, a in run(Tracker(grace=45), rounds) if a != Act.UPDATE][:1] == [Act.OPEN]
    assert run(Tracker(grace=45), rounds)[0][0] > 59   # the old behaviour: one round late


def test_a_blip_shorter_than_grace_posts_nothing():
    assert run(Tracker(grace=45), [(0, True), (15, True), (30, False), (45, False), (200, False)]) == []


def test_flapping_ten_times_a_minute_is_one_alert_that_says_so():
    t = Tracker(grace=45)
    acts = run(t, [(i * 3.0, i % 2 == 0) for i in range(40)])   # down 3 s, up 3 s, for two minutes
    assert [a for _, a in acts if a != Act.UPDATE] == [Act.OPEN]
    assert acts[0][0] == 12.0 and t.tracks[DOWN.key].flapping   # third appearance, long before grace
    assert t.tracks[DOWN.key].flaps >= 9
    # It resolves once it has been quiet for a flap window, not after grace.
    assert run(t, [(120.0 + 45, False)]) == [] and run(t, [(117.0 + FLAP_WINDOW, False)]) == [(177.0, Act.RESOLVE)]


def test_back_soon_after_resolving_reopens_the_same_alert():
    t = Tracker(grace=2)
    acts = run(t, [(0, True), (2, True), (3, False), (5, False), (10, True), (11, False), (13, False),
                   (13 + FLAP_WINDOW, False), (80, True), (82, True)])
    assert [a for _, a in acts if a != Act.UPDATE] == [Act.OPEN, Act.RESOLVE, Act.REOPEN, Act.RESOLVE, Act.OPEN]


def test_an_unknown_round_keeps_an_open_alert_open():
    t = Tracker(grace=0)
    assert run(t, [(0, True)]) == [(0, Act.OPEN)]
    assert t.step([], {"member_down"}, 100.0) == [] and t.tracks[DOWN.key].open


def test_a_held_condition_keeps_its_age_and_opens_at_once_when_no_longer_held():
    t = Tracker(grace=45)
    assert run(t, [(0, True), (60, True)], postable=lambda f: False) == []
    assert run(t, [(61, True)]) == [(61, Act.OPEN)] and t.tracks[DOWN.key].opened_at == 0


def test_the_bots_own_plan_holds_back_what_it_causes():
    replace = plan_row(1, "running")   # replaces member1 by member4
    assert expected(replace, DOWN)
    assert expected(replace, dataclasses.replace(DOWN, subject="0000000000000009", members=("", "0000000000000009")))
    assert not expected(replace, dataclasses.replace(DOWN, subject="member2", members=("member2", "02")))
    assert not expected(dataclasses.replace(replace, state=PlanState.FAILED), DOWN)
    restore = dataclasses.replace(replace, kind=PlanKind.RESTORE)
    assert expected(restore, Finding("quorum_lost", "cluster", "x"))
    assert not expected(dataclasses.replace(restore, state=PlanState.PROPOSED), Finding("quorum_lost", "cluster", "x"))
    defrag = dataclasses.replace(replace, kind=PlanKind.DEFRAG)
    assert expected(defrag, Finding("leader_churn", "leader", "x"))
    assert not expected(defrag, Finding("quorum_lost", "cluster", "x"))
    assert not expected(defrag, Finding("unreachable", "cluster", "x"))
    assert not expected(None, DOWN)


# ---------------------------------------------------------------- messages, config, grammar

def view(**kw) -> AlertView:
    fields = dict(cluster="prod", condition="member_down", title="member down", subject="member1",
                  summary="connection refused", figures=(("quorum", "2 of 3"),),
                  suggestions=("/etcd replace member1 member4 http://NEW-HOST:2380 --cluster prod",),
                  opened_at=1000.0, now=1000.0 + 252)
    return AlertView(**{**fields, **kw})


def test_the_alert_message_shows_the_command_as_code_and_the_resolution_its_duration():
    reply = blocks.alert_reply(view())
    assert "`/etcd replace member1 member4 http://NEW-HOST:2380 --cluster prod`" in str(reply.blocks)
    assert "open for 4m 12s" in reply.text
    resolved = view(resolved_at=1252.0, now=1300.0)
    assert "resolved after 4m 12s" in blocks.alert_note(resolved).text
    assert "after flapping (5 times within a minute)" in blocks.alert_reply(
        view(resolved_at=1252.0, flaps=5, flapping=True)).text
    assert "/etcd replace" not in str(blocks.alert_reply(resolved).blocks)
    assert "flapping (9 times in the last minute)" in blocks.alert_reply(view(flaps=9, flapping=True)).text
    assert [short_duration(s) for s in (0, 12, 252, 3700, 90000)] == ["0s", "12s", "4m 12s", "1h 1m", "1d 1h"]


def test_the_alerts_listing_shows_what_is_held_back_and_why():
    listing = blocks.alerts_reply("prod", [], held=[view(held="muted")])
    assert listing.text.startswith("cluster prod: no open conditions, 1 held back")
    assert "member down member1: connection refused (held back: muted; seen for 4m 12s)" in listing.text
    assert "not known here" in blocks.alerts_reply("prod", [view()], held=None).text  # another replica watches
    assert "held back" not in blocks.alerts_reply("prod", [view()], held=[]).text


@pytest.mark.parametrize("nasty", NASTY)
def test_no_value_becomes_slack_markup_in_an_alert(nasty):
    v = view(cluster=nasty, subject=nasty, summary=nasty, figures=((nasty, nasty),), suggestions=(nasty,))
    held = [dataclasses.replace(v, held=nasty)]
    for reply in (blocks.alert_reply(v), blocks.alerts_reply(nasty, [v], muted=nasty, held=held),
                  blocks.mute_reply(nasty, 0, nasty, "U0ONCALL01")):
        for text in pieces(reply):
            assert not re.search(r"<(?![@!]date|@U0ONCALL01>)", text.replace("<!date^", "<@date")), text


def config(watch: dict) -> ClusterConfig:
    return parse_config({"clusters": [{"name": "prod", "endpoints": ["http://127.0.0.1:2379"], "watch": watch}]},
                        base=__import__("pathlib").Path("/tmp")).clusters[0]


def test_watch_config_defaults_and_one_line_errors():
    default = config({}).watch
    assert (default.enabled, default.interval_seconds, default.grace_seconds) == (True, 15.0, 45.0)
    assert config({"interval": "1s", "grace": "2s", "enabled": False}).watch.interval_seconds == 1.0
    for bad, message in (({"interval": "soon"}, "clusters[0].watch.interval: 'soon' is not a duration"),
                         ({"interval": "0.5s"}, "clusters[0].watch.interval: '0.5s' is too often; the shortest"),
                         ({"grace": 45}, "clusters[0].watch.grace: expected a string"),
                         ({"enabled": "yes"}, "clusters[0].watch.enabled: expected true or false"),
                         ({"intervall": "1s"}, "clusters[0].watch.intervall: unknown key")):
        with pytest.raises(ConfigError) as e:
            config(bad)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_mute_takes_an_optional_cluster_a_duration_and_a_reason():
    assert parse("mute 30m deploying the new disks").args == {"duration": "30m", "reason": "deploying the new disks"}
    named = parse("mute prod 2h why")
    assert named.cluster == "prod" and named.args == {"duration": "2h", "reason": "why"}
    assert parse("unmute prod").cluster == "prod" and parse("alerts").name == "alerts"
    for bad, reason in (("mute", "missing <duration>"), ("mute 1h", "missing <reason>"),
                        ("mute prod soon x", "soon is not a duration")):
        with pytest.raises(UsageError) as e:
            parse(bad)
        assert e.value.reason.startswith(reason) and "/etcd mute [cluster] <duration> <reason...>" in e.value.usage


@pytest.mark.parametrize("text, word", [
    ("mute 0s maintenance", "0s"), ("mute -5m maintenance", "-5m"), ("mute 0.5s maintenance", "0.5s"),
    ("mute prod 0s maintenance", "0s"), ("mute 90 maintenance", "90"), ("mute 0s", "0s"), ("mute +0m x", "+0m"),
    ("mute 3x because", "3x"), ("mute prod 3x because", "3x"), ("mute 1hour because", "1hour"),
])
def test_mute_refuses_zero_negative_and_sub_second_durations(text: str, word: str) -> None:
    """They read as a cluster name before ("missing <reason>"), or muted for less than a second; a word that
    starts like a number is the duration meant (`3x` named a cluster "3x" before, and then "because" was
    said to be no duration)."""
    with pytest.raises(UsageError) as e:
        parse(text)
    assert e.value.reason == f"{word} is not a duration: <duration> takes 30m, 2h or 1h30m (at least 1s)"


def test_control_characters_are_stripped_from_a_reason() -> None:
    """A reason is stored and posted: no terminal escapes, no text turned around, one line."""
    assert parse('mute 30m "disks\x1b[2J\x07 being\nswapped \u202eokay\u202c"').args["reason"] == (
        "disks[2J being swapped okay")
    assert parse("abandon p-0001 it\x00 broke\r\n").args["reason"] == "it broke"
    with pytest.raises(UsageError, match="missing <reason>"):
        parse('mute 30m "\x07\x1b"')
