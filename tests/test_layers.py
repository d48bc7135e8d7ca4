"""The layers hold: the core imports no Slack and no HTTP server, and the pure
parts not even gRPC. Each check runs in a fresh interpreter, so
nothing imported by other tests hides a violation."""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import bot

ROOT = Path(__file__).resolve().parent.parent
SLACK = {"slack_sdk", "slack_bolt", "aiohttp"}
PURE = ["bot.ops.replace.plan", "bot.etcd.health", "bot.etcd.bbolt", "bot.commands.grammar", "bot.ops.restore.plan",
        "bot.ops.restore.quorum", "bot.ops.defrag.plan", "bot.etcd.member_metrics", "bot.watch.conditions",
        "bot.watch.tracker", *(f"bot.domain.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "bot" / "domain")]))]


def core_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(Path(bot.__file__).parent)], "bot.")
             if m.name.split(".")[1] in ("domain", "ops", "etcd", "store", "output", "watch", "backup", "runtime",
                                         "commands", "config")]
    return sorted(names)


def loaded_after_import(modules: list[str], whole: bool = False) -> set[str]:
    """The top-level packages (or, `whole`, every module) loaded by importing `modules`."""
    name = "n" if whole else "n.split('.')[0]"
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{{name} for n in sys.modules}})))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    return set(json.loads(out.stdout))


def test_the_core_loads_no_slack_and_no_http_server() -> None:
    modules = core_modules()
    assert "bot.ops.engine" in modules and "bot.store.sqlite" in modules  # the listing finds the modules
    loaded = loaded_after_import(modules, whole=True)   # one interpreter for both questions
    assert not {m.split(".")[0] for m in loaded} & SLACK
    assert not [m for m in loaded if m.startswith("bot.slack")]  # not even ours


def test_the_pure_parts_load_without_grpc() -> None:
    assert not loaded_after_import(PURE) & (SLACK | {"grpc", "aetcd"})
