"""docs/architecture.md stays true, and every command and kind of plan is registered whole.

The page names every module under bot/ and draws the import contracts of pyproject.toml (which
`make lint` checks with import-linter); the registries are what the parser, the help, the role
check, the engine and the notifier read."""
from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import bot
from bot.commands.table import COMMANDS
from bot.domain.plan import PlanKind
from bot.domain.record import PLAN_TYPES
from bot.ops.kinds import KINDS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def layers() -> list[str]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c["layers"] for c in contracts if c["type"] == "layers")


def diagram(entries: list[str]) -> str:
    """The mermaid block the page must hold: one node per layer, an arrow to the layer below."""
    lines = ["```mermaid", "flowchart TD"]
    lines += [f'    L{i}["{entry}"]' for i, entry in enumerate(entries)]
    lines += [f"    L{i} --> L{i + 1}" for i in range(len(entries) - 1)]
    return "\n".join(lines + ["```"])


def test_the_diagram_is_the_import_contract() -> None:
    text = DOC.read_text()
    found = re.search(r"<!-- layers:begin[^>]*-->\n(.*?)\n<!-- layers:end -->", text, re.S)
    assert found, "docs/architecture.md has no generated layers block"
    assert found.group(1) == diagram(layers()), "regenerate the block:\n" + diagram(layers())


def test_every_layer_of_the_contract_is_a_package_that_exists() -> None:
    names = {m.name for m in pkgutil.walk_packages([str(ROOT / "bot")], "bot.")} | {"bot", "handlers"}
    for entry in layers():
        for name in re.split(r"[|:]", entry):
            assert name.strip() in names, f"layer {name.strip()!r} names no module"


def test_every_module_under_bot_is_on_the_page() -> None:
    text = DOC.read_text()
    modules = [m.name for m in pkgutil.walk_packages([str(Path(bot.__file__).parent)], "bot.")]
    assert "bot.ops.restore.run" in modules  # the walk finds nested packages
    missing = [m for m in modules if not re.search(rf"`{re.escape(m)}`", text)]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_every_command_is_declared_whole() -> None:
    assert {"status", "replace", "restore", "defrag", "help"} <= set(COMMANDS)
    for name, declared in COMMANDS.items():
        assert declared.spec.name == name and declared.spec.summary, name
        assert declared.work is not None or name == "help", f"/etcd {name} has no handler"
        if declared.role is None and name != "help":
            assert declared.names_plan, f"/etcd {name} checks no role and names no plan"


def test_every_kind_of_plan_is_registered_whole() -> None:
    assert set(KINDS) == set(PlanKind), f"not registered: {set(PlanKind) - set(KINDS)}"
    for kind, registered in KINDS.items():
        assert registered.kind is kind
        assert registered.plan_type is PLAN_TYPES[kind], f"{kind}: the operation runs another plan type"
        assert callable(registered.operation) and callable(registered.render), kind
