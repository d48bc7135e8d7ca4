"""Every shipped file agrees with the code, where that is mechanical: the commands the README and the Slack
manifests list are the registry's, the takeover time the README states is the lease's, the step numbers it
shows are the plans', and what the image and the slash command say the bot does names every kind of plan."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_plans import cluster, down, up

from bot.commands.table import COMMANDS
from bot.config import ReplicasConfig
from bot.domain.plan import PlanKind
from bot.domain.replace import ReplaceRequest
from bot.ops.defrag.plan import plan_defrag
from bot.ops.defrag.rule import parse_rule
from bot.ops.replace.plan import plan_replacement
from bot.ops.restore.plan import RESTORE_STEPS
from helpers import must

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MANIFESTS = ("deploy/slack-app-manifest.yaml", "deploy/slack-app-manifest-http.yaml")


def slash_command(manifest: str) -> dict[str, str]:
    (command,) = yaml.safe_load((ROOT / manifest).read_text())["features"]["slash_commands"]
    return command


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_the_manifests_usage_hint_lists_every_command_once(manifest):
    """What Slack shows under `/etcd` as you type: every command of the registry, and nothing else."""
    hint = [part.split()[0] for part in slash_command(manifest)["usage_hint"].split("|")]
    assert sorted(hint) == sorted(COMMANDS), f"the usage hint of {manifest} is not the registry's commands"


def _readme_commands() -> dict[str, str]:
    """The README's table of commands: each command's name and the role its row names."""
    section = README.split("## In the channel", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `/etcd ([\w-]+)[^`]*` \| ([^|]+) \|", section, re.M)
    assert len(rows) == len({name for name, _ in rows}), "a command is listed twice"
    return {name: role.strip() for name, role in rows}


def test_the_readme_lists_every_command_with_the_role_it_declares():
    expected = {name: c.role.value if c.role else ("anyone" if name == "help" else "proposer or approver")
                for name, c in COMMANDS.items()}
    assert _readme_commands() == expected


@pytest.mark.parametrize("shipped", ["deploy/Dockerfile", *MANIFESTS])
def test_what_the_image_and_the_slash_command_say_names_every_kind_of_plan(shipped):
    said = (slash_command(shipped)["description"] if shipped.endswith(".yaml") else
            must(re.search(r'org\.opencontainers\.image\.description="([^"]+)"', (ROOT / shipped).read_text()))[1])
    assert all(kind.value in said for kind in PlanKind), f"{shipped}: {said!r}"


def test_the_takeover_time_the_readme_states_is_the_leases():
    """A dead leader is replaced within ttl + ttl/3 (the renewal runs every ttl/3); every figure given for it
    is that of the default lease."""
    ttl = ReplicasConfig().lease_seconds
    takeover = f"{ttl + ttl / 3:.1f} s"
    figures = re.findall(r"(?:within 4/3 of[^.(]*\(|lapsed, up to )(\d+(?:\.\d+)?) s", README)
    assert len(figures) >= 3 and {f"{f} s" for f in figures} == {takeover}, figures
    deployment = (ROOT / "deploy/kubernetes/deployment.yaml").read_text()
    assert "kubernetes-ha" in deployment.split("apiVersion", 1)[0], "the single replica's comment names the HA variant"


def _numbered_list(after: str) -> list[int]:
    """The numbers of the first numbered list after the marker `after` in the README (its items may wrap)."""
    lines = README.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("0. "))
    items = []
    for line in lines[start:]:
        if not line.strip():
            break
        if m := re.match(r"(\d+)\. ", line):
            items.append(int(m.group(1)))
    return items


def test_the_step_numbers_the_readme_shows_are_the_plans():
    replace = plan_replacement(cluster(down(1), up(2), up(3)), ReplaceRequest("member1", "member4",
                                                                                 "http://10.0.0.4:2380"))
    assert _numbered_list("The bot then runs these steps") == list(range(len(replace.steps)))
    assert _numbered_list("**The steps**, each with its precondition") == list(range(len(RESTORE_STEPS)))
    defrag = plan_defrag(cluster(up(1), up(2), up(3)), {}, parse_rule("dbSize > 0"))
    assert _numbered_list("The steps of a 3-member cluster whose\nmembers all pass the rule") == \
        list(range(len(defrag.steps)))
