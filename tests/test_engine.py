"""The engine without Slack: a replacement proposed, approved and run through
the core alone, reporting to the plain Notifier (the core does not
talk to Slack). Real etcd; the command launcher starts the new member."""
from __future__ import annotations

import asyncio

from bot.config import load_config
from bot.domain.plan import PlanState
from bot.domain.replace import ReplaceRequest
from bot.ops import lifecycle
from bot.ops.context import BotContext
from bot.ops.notify import PlainDirectory, PlainNotifier
from bot.ops.replace.plan import propose as propose_replacement
from bot.runtime import Runtime
from bot.testing.workspace import CHANNEL, LEAD, ONCALL, cluster_table, write_config
from helpers import APPROVAL, urls, wait_done


async def test_a_replacement_runs_through_the_core_with_the_plain_notifier(make_cluster, tmp_path):
    c = make_cluster(3)
    config = load_config(write_config(tmp_path, [cluster_table("prod", c)], approval=APPROVAL))
    notifier = PlainNotifier()
    ctx = await BotContext.open(config, notifier, PlainDirectory())
    runtime = await Runtime(ctx, watch=False, upkeep=False).start()  # the leadership loop: this replica leads
    try:
        c.kill("member1")
        peer, client = urls()
        outcome = await propose_replacement(ctx, config.clusters[0], ReplaceRequest("member1", "member4", peer, client),
                                          ONCALL, CHANNEL, "usage")
        assert outcome.ephemeral is None, outcome
        record = await ctx.store.open_plan("prod")
        assert record is not None and record.state is PlanState.PROPOSED and record.message_ts == "plain.1"
        await lifecycle.approve(ctx, record, LEAD)
        await wait_done(ctx.store, record.id)
        await asyncio.gather(*ctx.tasks)
        assert any(f"plan {record.id}: :tada: Plan {record.id} is done" in line for line in notifier.lines)
        assert any(line.startswith(f"plan {record.id} done [") for line in notifier.lines)
    finally:
        await runtime.stop()
        await ctx.close()
