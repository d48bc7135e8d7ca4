"""Every kind of plan, whole: importing this module imports each operation, and each registers its kind
with the engine (`bot.ops.engine.register`: plan type, operation, renderer), so the table is complete
wherever plans run or render (the runtime, the CLI, the Slack notifier). A test checks that every
PlanKind is registered."""
from __future__ import annotations

from bot.ops.defrag import run as _defrag  # noqa: F401
from bot.ops.engine import KINDS, Kind, plan_view, render_plan
from bot.ops.replace import run as _replace  # noqa: F401
from bot.ops.restore import run as _restore  # noqa: F401

__all__ = ["KINDS", "Kind", "plan_view", "render_plan"]
