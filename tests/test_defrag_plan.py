"""The defragmentation rule language and planner (pure)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.domain.cluster import DEFAULT_QUOTA, Alarm, Member, MemberHealth, MemberMetrics
from bot.domain.errors import Refusal
from bot.ops.defrag.plan import plan_defrag
from bot.ops.defrag.rule import DEFAULT_RULE, MAX_DEPTH, RuleError, figures, parse_rule
from helpers import cluster_health, member_status

MiB = 1024 * 1024


@pytest.mark.parametrize(("rule", "db", "in_use", "quota", "expected"), [
    (DEFAULT_RULE, 900, 850, 1000, True),             # 90 % of the quota
    (DEFAULT_RULE, 100, 50, 1000, False),
    (DEFAULT_RULE, 300 * MiB, 10 * MiB, 2 * 1024 * MiB, True),  # 290 MiB free
    ("dbSizeFree > 1MiB && !(dbQuotaUsage >= 0.5)", 3 * MiB, MiB, 100 * MiB, True),
    ("dbSize - dbSizeInUse == dbSizeFree", 10, 4, 100, True),
    ("dbSize * 2 / dbQuota > 1 || dbSize < 1KB", 10, 4, 100, True),   # 1 KB = 1000 bytes
    ("1 + 2 * 3 == 7", 0, 0, 1, True),                 # precedence: * before +
    ("-dbSize < 0", 5, 0, 10, True),
])
def test_rules_select_as_written(rule: str, db: int, in_use: int, quota: int, expected: bool) -> None:
    assert parse_rule(rule).matches(figures(db, in_use, quota)) is expected


@pytest.mark.parametrize(("rule", "message"), [
    ("", "rule: empty; e.g. " + DEFAULT_RULE),
    ("dbSize >", "rule: ends early (after 'dbSize >')"),
    ("dbSize > 1XB", "rule: unknown unit 'XB' at column 11 (use B, KB, MB, GB, KiB, MiB or GiB)"),
    ("dbsize > 1", "rule: unknown variable 'dbsize' at column 1 (known: dbSize, dbSizeInUse, dbSizeFree, dbQuota, "
                   "dbQuotaUsage)"),
    ("dbSize > 1 )", "rule: unexpected ')' at column 12"),
    ("dbSize # 2", "rule: unexpected '#' at column 8"),
    ("dbSize 2", "rule: unexpected '2' at column 8"),
])
def test_a_rule_that_does_not_parse_gets_one_line_saying_where(rule: str, message: str) -> None:
    with pytest.raises(RuleError) as e:
        parse_rule(rule)
    assert str(e.value) == message and "\n" not in message


@pytest.mark.parametrize("rule", [
    "(" * 3000 + "dbSize > 1" + ")" * 3000, "!" * 3000 + "dbSize", "-" * 3000 + "dbSize > 1",
    " + ".join(["dbSize"] * 3000) + " > 1", " || ".join(["dbSize > 1"] * 3000),
])
def test_a_rule_nested_too_deep_is_refused_in_one_line(rule: str) -> None:
    """Parsing and evaluating recurse: 3,000 levels gave a RecursionError (a traceback, not a reason)."""
    with pytest.raises(RuleError) as e:
        parse_rule(rule)
    message = str(e.value)
    assert message.startswith(f"rule: nested deeper than {MAX_DEPTH} levels at column ") and "\n" not in message


def test_a_rule_as_deep_as_the_limit_still_parses_and_evaluates() -> None:
    nested = "(" * (MAX_DEPTH - 1) + "dbSize > 1" + ")" * (MAX_DEPTH - 1)
    assert parse_rule(nested).matches(figures(10, 5, 100))
    assert parse_rule(" + ".join(["dbSize"] * (MAX_DEPTH // 2)) + " > 1").matches(figures(10, 5, 100))


@given(st.text(alphabet="dbSizeFrQuotaUsg0123456789.<>=!&|()+-*/ MiBK", max_size=40))
def test_any_text_parses_or_is_refused_in_one_line(text: str) -> None:
    try:
        rule = parse_rule(text)
    except RuleError as e:
        assert str(e).startswith("rule: ") and "\n" not in str(e)
        return
    rule.matches(figures(10, 5, 100))  # a parsed rule always evaluates (division by zero is 0)


@given(st.integers(0, 2**34), st.integers(0, 2**34), st.integers(1, 2**34))
def test_the_default_rule_is_etcd_defrags(db: int, in_use: int, quota: int) -> None:
    expected = db / quota > 0.8 or max(db - in_use, 0) > 200 * MiB
    assert parse_rule(DEFAULT_RULE).matches(figures(db, in_use, quota)) is expected


def _member(i: int, db: int, learner: bool = False) -> MemberHealth:
    return MemberHealth(Member(i, f"m{i}", (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",), learner),
                        member_status(member_id=i, db_size=db, db_size_in_use=db // 10, leader=2,
                                      is_learner=learner))


def test_followers_first_then_the_leader_after_the_move_then_learners() -> None:
    health = cluster_health(_member(1, 90 * MiB), _member(2, 95 * MiB), _member(3, 99 * MiB),
                            _member(4, 91 * MiB, learner=True), alarms=(Alarm(1, "NOSPACE"),))
    quotas: dict[int, MemberMetrics | str] = {i: MemberMetrics(100 * MiB, None, None, 0, 0, 0, 0)
                                              for i in (1, 2, 3, 4)}
    plan = plan_defrag(health, quotas, parse_rule("dbQuotaUsage > 0.8"))
    keys = [s.key for s in plan.steps]
    assert keys == ["recheck", "snapshot", "compact", f"defrag-{1:016x}", f"defrag-{3:016x}", "move-leader",
                    f"defrag-{2:016x}", f"defrag-{4:016x}", "disarm", "verify"]
    assert plan.nospace and plan.leader == f"{2:016x}"
    assert [plan.member(f"{i:016x}").order for i in (1, 2, 3, 4)] == [1, 3, 2, 4]
    # A member whose /metrics cannot be read is judged on etcd's default quota (91 MiB of 2 GiB: left alone).
    quotas[4] = "/metrics: connection refused (member down?)"
    learner = plan_defrag(health, quotas, parse_rule("dbQuotaUsage > 0.8")).member(f"{4:016x}")
    assert learner.quota == DEFAULT_QUOTA and not learner.quota_known and not learner.selected


def test_a_sick_member_another_alarm_or_nothing_to_do_is_refused() -> None:
    down = MemberHealth(Member(3, "m3", (), ("http://10.0.0.3:2379",)), error="connection refused")
    with pytest.raises(Refusal, match="not every member is healthy: m3 \\(connection refused\\)"):
        plan_defrag(cluster_health(_member(1, MiB), _member(2, MiB), down), {}, parse_rule(DEFAULT_RULE))
    with pytest.raises(Refusal, match="alarm CORRUPT is active"):
        plan_defrag(cluster_health(_member(1, MiB), _member(2, MiB), alarms=(Alarm(1, "CORRUPT"),)), {},
                    parse_rule(DEFAULT_RULE))
    with pytest.raises(Refusal, match="no member passes the rule"):
        plan_defrag(cluster_health(_member(1, MiB), _member(2, MiB)), {}, parse_rule(DEFAULT_RULE))


def test_a_plan_survives_the_store() -> None:
    plan = plan_defrag(cluster_health(_member(1, 300 * MiB), _member(2, 300 * MiB)), {}, parse_rule(DEFAULT_RULE),
                       compact=False)
    from bot.domain.defrag import DefragPlan
    assert DefragPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("learner", [False, True])
def test_a_single_voter_is_defragmented_in_place_without_a_move(learner: bool) -> None:
    """One voter (kubeadm's default is one member; a learner cannot lead): no leadership to move."""
    lone = MemberHealth(Member(2, "m2", ("http://10.0.0.2:2380",), ("http://10.0.0.2:2379",)),
                        member_status(member_id=2, db_size=300 * MiB, db_size_in_use=MiB, leader=2))
    others = [_member(4, 300 * MiB, learner=True)] if learner else []
    plan = plan_defrag(cluster_health(lone, *others), {}, parse_rule(DEFAULT_RULE))
    keys = [s.key for s in plan.steps]
    assert "move-leader" not in keys and keys[3] == f"defrag-{2:016x}"
    assert plan.steps[3].title == ("Defragment m2 (leader, the only voter: no leadership to move; writes wait until "
                                   "it is done)")
