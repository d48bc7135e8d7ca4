#!/usr/bin/env python3
"""mypy strict everywhere, with a list of exceptions that only shrinks.

pyproject.toml checks every module strictly except those listed in the override that turns
`disallow_untyped_defs` off. This runs mypy once more with that override removed and fails when a
listed module now passes strict (take it off the list) or when the list is longer than LIMIT (a new
module is written strict from the start). Lower LIMIT as the list shrinks.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

LIMIT = 54
ROOT = Path(__file__).resolve().parent.parent


def module_of(path: str) -> str:
    """mypy's module name for a checked file (tests/ and bench/ are top-level modules: no __init__.py)."""
    name = path.removesuffix(".py")
    for top in ("tests/", "bench/"):
        if name.startswith(top):
            name = name[len(top):]
    return name.replace("/", ".").removesuffix(".__init__")


def main() -> int:
    text = (ROOT / "pyproject.toml").read_text()
    overrides = tomllib.loads(text)["tool"]["mypy"]["overrides"]
    listed = next(o["module"] for o in overrides if o.get("disallow_untyped_defs") is False)
    block = re.search(r"\[\[tool\.mypy\.overrides\]\]\nmodule = \[[^\]]*\]\ndisallow_untyped_defs = false\n"
                      r"(?:[a-z_]+ = false\n)*", text)
    if block is None:
        print("typing-ratchet: the exceptions override is not where this script expects it", file=sys.stderr)
        return 1
    problems = []
    if len(listed) > LIMIT:
        problems.append(f"the list of non-strict modules grew to {len(listed)} (at most {LIMIT}): "
                        "type new modules strictly instead")
    if listed != sorted(listed):
        problems.append("keep the list of non-strict modules sorted")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=ROOT, prefix=".strict-") as strict:
        strict.write(text.replace(block.group(0), ""))
        strict.flush()
        out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", strict.name,
                              "--cache-dir", str(ROOT / ".mypy_cache" / "strict")],
                             cwd=ROOT, capture_output=True, text=True).stdout
    failing = {module_of(line.split(":", 1)[0]) for line in out.splitlines() if ": error:" in line}
    passing = sorted(set(listed) - failing)
    if passing:
        problems.append(f"these pass strict now; take them off the list in pyproject.toml: {', '.join(passing)}")
    if len(listed) < LIMIT and not problems:
        problems.append(f"the list has {len(listed)} modules: lower LIMIT in scripts/typing-ratchet.py to that")
    for p in problems:
        print(f"typing-ratchet: {p}", file=sys.stderr)
    if not problems:
        print(f"typing-ratchet: {len(listed)} modules not strict yet, none of them passes strict")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
