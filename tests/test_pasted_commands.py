"""Commands the bot prints for a person to paste: whatever a member's name holds (etcd accepts any,
`x $(id>pwned)` too, or a newline), a POSIX shell reads each value back as exactly one word, and runs
nothing but the commands shown. Each text is run by `sh` with the commands it names replaced by
functions that report their words, in an empty directory that must stay empty."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_plans import IDS, down, up
from test_restore_plan import ROWS, evidence
from test_watch_conditions import by_kind, facts, member

from bot.commands.table import parse
from bot.domain.cluster import Member, MemberHealth
from bot.domain.plan import PlanState
from bot.domain.replace import ReplaceRequest
from bot.domain.restore import Membership
from bot.ops.launcher import manual_instructions
from bot.ops.replace.plan import plan_replacement
from bot.ops.restore.plan import choose_snapshot, plan_restore
from bot.output.blocks import PlanView, replace_plan_reply, restore_plan_reply
from helpers import cluster_health

ODD = ("x $(id>pwned)", "y `id>pwned2`; touch pwned3 #", "z\nid>pwned4 #", "w'\"$HOME\\")
END = "--end-of-command--"
STUBS = ("mv", "etcdutl", "systemctl", "etcd")


def run_sh(text: str, directory: Path, then: str = "") -> list[list[str]]:
    """The commands a POSIX shell runs for `text` (each one's words), then `then` (e.g. printing variables)."""
    assert subprocess.run(["sh", "-n", "-c", text], capture_output=True).returncode == 0, text
    stubs = "".join(f'{name}() {{ printf "%s\\0" {name} "$@" {END}; }}\n' for name in STUBS)
    out = subprocess.run(["sh", "-e", "-c", stubs + text + "\n" + then], cwd=directory, capture_output=True,
                         check=True).stdout.decode()
    assert list(directory.iterdir()) == [], "the pasted text ran something it did not show"
    commands: list[list[str]] = []
    words: list[str] = []
    for word in out.split("\0")[:-1]:
        if word == END:
            commands.append(words)
            words = []
        else:
            words.append(word)
    return commands


def odd_restore(launcher: str = "manual"):
    members = Membership(tuple((f"{i:016x}", name, (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",))
                               for i, name in enumerate(ODD, start=1)), "live", 1000.0)
    snapshot, newer = choose_snapshot(ROWS, None)
    return plan_restore("prod", snapshot, newer, members, quorum=evidence(1, voting=4), force=False,
                        current_revision=None, data_dir="/var/lib/etcd/{name}", etcd_version="3.5.1", launcher=launcher,
                        launcher_has_actions=True)


@pytest.fixture
def scratch(tmp_path) -> Path:
    d = tmp_path / "operator"
    d.mkdir()
    return d


def test_the_manual_restore_stages_quote_every_member(scratch):
    p = odd_restore()
    snapshot = "/srv/snapshots/my prod $(x).db"
    commands = run_sh(p.manual_commands("restore", snapshot), scratch)
    assert len(commands) == 2 * len(ODD)
    for m, (mv, restore) in zip(p.members, zip(commands[::2], commands[1::2], strict=True), strict=True):
        assert mv == ["mv", f"/var/lib/etcd/{m.name}", f"/var/lib/etcd/{m.name}.before-{p.id}"]
        assert restore == p.restore_args(m, snapshot)  # word for word: --name, --initial-cluster, --data-dir
    for action in ("stop", "start"):
        assert run_sh(p.manual_commands(action, snapshot), scratch) == [["systemctl", action, "etcd"]] * len(ODD)


def test_the_restore_plan_message_shows_commands_that_read_back_word_for_word(scratch):
    p = odd_restore()
    view = PlanView(state=PlanState.PROPOSED, proposer="U0ONCALL01", approvers="", expires_at=2e9,
                    reaction="white_check_mark", reject_reaction="x")
    details = restore_plan_reply(p, view).details   # the commands are in the plan's thread
    assert details is not None
    shown = "\n".join(b["text"]["text"] for b in details.blocks if b.get("text"))
    block = re.search(r"```(.*?)```", shown, re.S)
    assert block is not None
    pasted = block.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")  # as Slack shows it
    assert run_sh(pasted, scratch) == [p.restore_args(m, p.snapshot.path) for m in p.members]


def test_the_replacement_environment_keeps_a_survivor_s_odd_name_in_one_value(scratch):
    """The new name is checked, but ETCD_INITIAL_CLUSTER carries every survivor's name as etcd reports it."""
    odd = MemberHealth(Member(IDS[3], ODD[0], ("http://10.0.0.3:2380",), ("http://10.0.0.3:2379",)),
                       up(3).status)
    plan = plan_replacement(cluster_health(down(1), up(2), odd), ReplaceRequest("member1", "member4",
                                                                                 "http://10.0.0.4:2380"))
    assert ODD[0] in plan.environment["ETCD_INITIAL_CLUSTER"]
    show = "; ".join(f'printf "%s\\0" "${name}"' for name in plan.environment) + f'; printf "%s\\0" {END}'
    exported = run_sh(manual_instructions(plan), scratch, then=show)
    assert exported == [["etcd", "[flags]"], list(plan.environment.values())]
    view = PlanView(state=PlanState.PROPOSED, proposer="U0ONCALL01", approvers="", expires_at=2e9,
                    reaction="white_check_mark", reject_reaction="x")
    details = replace_plan_reply(plan, view).details   # the environment is in the plan's thread
    assert details is not None
    shown = "\n".join(b["text"]["text"] for b in details.blocks if b.get("text"))
    env_block = next(b for b in re.findall(r"```(.*?)```", shown, re.S) if "ETCD_NAME=" in b)
    pasted = env_block.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert run_sh(pasted, scratch, then=show) == [list(plan.environment.values())]


@pytest.mark.parametrize("name", ODD)
def test_a_suggested_slash_command_names_the_member_as_one_word(name):
    """The watch's `/etcd replace …` suggestion, pasted back into Slack, names the down member exactly."""
    (finding,) = by_kind(facts(member(1, up=False, name=name), member(2), member(3)))["member_down"]
    cmd = parse(finding.suggestions[0].removeprefix("/etcd "))
    assert cmd.name == "replace" and cmd.args["failed_name_or_hex_id"] == name and cmd.cluster == "prod"
