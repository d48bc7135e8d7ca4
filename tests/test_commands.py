"""Parsing `/etcd` text: pure, no servers."""
from __future__ import annotations

import pytest

from bot.commands.grammar import UsageError, unescape_slack
from bot.commands.table import parse


def test_empty_text_is_the_menu():
    assert parse("").name == "menu"
    assert parse("   ").name == "menu"


def test_status_with_cluster_positional_or_option():
    assert parse("status").cluster is None
    assert parse("status prod").cluster == "prod"
    assert parse("status --cluster prod").cluster == "prod"
    assert parse("status --cluster=prod").cluster == "prod"
    assert parse("STATUS prod").name == "status"


@pytest.mark.parametrize("text, reason", [
    ("frobnicate", "unknown subcommand 'frobnicate'"),
    ("status prod extra", "unexpected argument 'extra'"),
    ("status --cluster", "--cluster needs a value"),
    ("status --colour red", "unknown option '--colour' for status"),
    ("status prod --cluster prod", "cluster given twice"),
    ("status --cluster a --cluster b", "--cluster given twice"),
    ('status "prod', "cannot read the command"),
])
def test_bad_input_gives_one_line_and_the_usage(text, reason):
    with pytest.raises(UsageError) as e:
        parse(text)
    assert reason in e.value.reason
    assert "\n" not in e.value.reason
    assert "/etcd" in e.value.usage


def test_an_unknown_subcommand_names_the_nearest_and_its_usage_only():
    """A typo costs one line and the usage of the command meant, not the usage of all of them."""
    with pytest.raises(UsageError) as e:
        parse("stats")
    assert e.value.reason == "unknown subcommand 'stats': did you mean `status`?"
    assert e.value.usage == "/etcd status [cluster]"
    with pytest.raises(UsageError) as e:
        parse("snapshts prod")
    assert "did you mean `snapshots`?" in e.value.reason and e.value.usage == "/etcd snapshots [cluster]"


def test_an_unknown_subcommand_near_nothing_gets_the_names_on_one_line():
    with pytest.raises(UsageError) as e:
        parse("frobnicate")
    assert "did you mean" not in e.value.reason and "/etcd help" in e.value.reason
    assert "\n" not in e.value.usage and "| members |" in e.value.usage and "| status |" in e.value.usage


def test_help_for_a_subcommand():
    cmd = parse("status --help")
    assert cmd.name == "help" and cmd.args["topic"] == "status"


def test_slack_escaping_is_undone():
    assert unescape_slack("<http://10.0.0.4:2380>") == "http://10.0.0.4:2380"
    assert unescape_slack("<http://10.0.0.4:2380|10.0.0.4:2380>") == "http://10.0.0.4:2380"
    assert unescape_slack("a &amp; b &lt;c&gt;") == "a & b <c>"
    assert parse("status \u201cprod\u201d").cluster == "prod"


def test_abandon_takes_a_plan_id_and_a_free_text_reason():
    cmd = parse("abandon ab12cd member1 came back, see INC-42")
    assert cmd.args == {"plan_id": "ab12cd", "reason": "member1 came back, see INC-42"}
    with pytest.raises(UsageError, match="missing <reason>") as e:
        parse("abandon ab12cd")
    assert e.value.usage == "/etcd abandon <plan-id> <reason...>"


def test_a_bad_duration_is_named_as_typed_and_a_control_character_never_reaches_the_reply():
    with pytest.raises(UsageError) as e:
        parse("mute 3x because")
    assert e.value.reason.startswith("3x is not a duration")
    with pytest.raises(UsageError) as e:
        parse("mute prod \x0c0 because")
    assert e.value.reason.startswith("'\\x0c0' is not a duration") and e.value.reason.isprintable()
