"""Buttons, modals and the App Home tab: Slack's interactive payloads in, the core's answers out.

Every payload is signed like the rest (bolt checks it), acknowledged first (Slack waits 3 s), and acted on
once across replicas (the store's first_delivery, keyed by the payload's trigger_id). A click that opens a
modal uses its trigger_id before anything else (it expires 3 s after the click; a trigger opens one modal,
which also makes a redelivered click harmless), and fills the modal in afterwards with views.update.
Everything a click stands for is checked again on the server (bot.commands.actions, bot.ops.lifecycle): a
button only says what its message said when it was drawn.
"""
from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.commands import actions
from bot.domain.mrkdwn import Mrkdwn
from bot.ops import lifecycle
from bot.ops.access import Role
from bot.ops.context import BotContext
from bot.output import blocks, interactive
from bot.output.interactive import Action, Form, read_metadata, read_value
from bot.store.base import StoreError

log = logging.getLogger(__name__)


def register(app: AsyncApp, ctx: BotContext) -> None:
    async def first(body: dict[str, Any]) -> bool:
        """Whether this payload is acted on here: not seen before by any replica (a store that cannot say lets
        it through; what it does then reports the store's trouble itself)."""
        key = body.get("trigger_id")
        try:
            return not key or await ctx.store.first_delivery(f"interaction:{key}")
        except StoreError:
            return True

    async def tell(channel: str, user: str, reason: str | Mrkdwn) -> None:
        await ctx.notifier.private_message(channel, user, blocks.error_reply(reason))

    async def open_view(client: AsyncWebClient, body: dict[str, Any], view: dict[str, Any]) -> dict[str, Any] | None:
        """views.open with the click's trigger_id, or None (and the person is told why) when Slack refused it."""
        try:
            opened = await client.views_open(trigger_id=body.get("trigger_id", ""), view=view)
        except SlackApiError as e:
            error = e.response.get("error") if e.response is not None else "unknown_error"
            log.warning("views.open refused", extra={"ctx_error": error})
            where = _where(body)
            if where[0] and error != "exchanged_trigger_id":   # exchanged: another replica opened it already
                await tell(*where, "the form did not open: Slack allows 3 s after a click and this one came too "
                                   f"late ({error}); click again")
            return None
        found: dict[str, Any] = opened["view"]
        return found

    async def update_view(client: AsyncWebClient, opened: dict[str, Any], view: dict[str, Any]) -> None:
        try:
            await client.views_update(view_id=opened["id"], hash=opened.get("hash"), view=view)
        except SlackApiError as e:   # the person closed it meanwhile: nothing to show it in
            log.info("views.update not applied", extra={"ctx_error": e.response.get("error") if e.response else ""})

    # ------------------------------------------------------------ plan messages

    async def on_plan_button(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        ctx.track_current_task()
        channel, user = _where(body)
        action = _action(body)
        if not await first(body) or not channel:
            return
        value = read_value(action.get("value"))
        ts = str((body.get("container") or {}).get("message_ts", ""))
        try:
            # the plan the button names, if it is that message's (a click may come before the message is recorded)
            record = await ctx.store.plan(value.get("plan", ""))
            if record is None or record.channel != channel or record.message_ts not in (None, ts):
                await tell(channel, user, "this button belongs to no plan the bot knows: nothing changed")
                return
            await lifecycle.on_click(ctx, record, user, action.get("action_id") == Action.APPROVE, value.get("fp", ""))
        except StoreError as e:
            log.error("click not handled: state store unavailable", extra={"ctx_error": str(e)})
            await tell(channel, user, f"your click was not acted on: the bot's state store is unavailable: {e}")

    app.action(str(Action.APPROVE))(on_plan_button)
    app.action(str(Action.REJECT))(on_plan_button)

    # ------------------------------------------------------------ proposals from alerts and the menu

    @app.action(str(Action.PROPOSE_REPLACE))
    async def on_propose_replace(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        ctx.track_current_task()
        channel, user = _where(body)
        value = read_value(_action(body).get("value"))
        name = value.get("cluster", "")
        opened = await open_view(client, body, interactive.replace_form(name, channel, value.get("member", "")))
        if opened is None or not await first(body):
            return
        refused = await actions.refusal(ctx, ctx.config.cluster(name), user, Role.OPERATOR, "/etcd replace")
        if refused:
            await update_view(client, opened, interactive.notice("Replace a member", f":no_entry: {refused}"))

    @app.action(str(Action.PROPOSE_RESTORE))
    async def on_propose_restore(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        ctx.track_current_task()
        channel, user = _where(body)
        name = read_value(_action(body).get("value")).get("cluster", "")
        opened = await open_view(client, body, interactive.restore_form_loading(name, channel))
        if opened is None or not await first(body):
            return
        cluster = ctx.config.cluster(name)
        refused = await actions.refusal(ctx, cluster, user, Role.OPERATOR, "/etcd restore")
        if refused or cluster is None:
            await update_view(client, opened, interactive.notice("Restore", f":no_entry: {refused}"))
            return
        try:
            choices = await actions.snapshot_choices(ctx, cluster)
        except StoreError as e:
            await update_view(client, opened, interactive.notice("Restore", f":warning: the bot's state store is "
                                                                            f"unavailable: {e}"))
            return
        await update_view(client, opened, interactive.restore_form(name, channel, choices) if choices else
                          interactive.notice("Restore", f"No verified snapshot of *{name}* is recorded: nothing to "
                                                        "restore from. Restore by hand from your own backup."))

    @app.view(str(Form.REPLACE))
    async def on_replace_form(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        ctx.track_current_task()
        meta, user = read_metadata(view), body.get("user", {}).get("id", "")
        cluster, channel, fields = ctx.config.cluster(meta.get("cluster", "")), meta.get("channel", ""), _fields(view)
        if cluster is None:
            await ack(response_action="errors", errors={interactive.FAILED: "that cluster is no longer configured"})
            return
        try:
            errors = await actions.replace_form_errors(ctx, cluster, fields)
        except StoreError as e:
            errors = {interactive.FAILED: f"the bot's state store is unavailable: {e}"}
        if errors:
            await ack(response_action="errors", errors=errors)
            return
        await ack()
        if await first(body):
            answer = await actions.run(ctx, actions.replace_text(cluster.name, fields), user, channel)
            await actions.deliver(ctx, answer.outcome, channel, user)

    @app.view(str(Form.RESTORE))
    async def on_restore_form(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        ctx.track_current_task()
        meta, user = read_metadata(view), body.get("user", {}).get("id", "")
        snapshot = _fields(view).get(interactive.SNAPSHOT, "")
        if not snapshot:
            await ack(response_action="errors", errors={interactive.SNAPSHOT: "choose a snapshot"})
            return
        await ack()
        if await first(body):
            channel = meta.get("channel", "")
            answer = await actions.run(ctx, actions.restore_text(meta.get("cluster", ""), snapshot), user, channel)
            await actions.deliver(ctx, answer.outcome, channel, user)

    # ------------------------------------------------------------ mute, the menu, links

    @app.action(str(Action.MUTE))
    async def on_mute(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        ctx.track_current_task()
        channel, user = _where(body)
        if channel and await first(body):
            name = read_value(_action(body).get("value")).get("cluster", "")
            answer = await actions.mute_from_alert(ctx, name, user, channel)
            await actions.deliver(ctx, answer.outcome, channel, user)

    @app.action(str(Action.RUN))
    async def on_menu(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        ctx.track_current_task()
        channel, user = _where(body)
        if channel and await first(body):
            answer = await actions.run(ctx, read_value(_action(body).get("value")).get("command", ""), user, channel)
            await actions.deliver(ctx, answer.outcome, channel, user)

    @app.action(str(Action.RUNBOOK))
    async def on_link(ack: AsyncAck) -> None:
        await ack()   # Slack opens the link itself; the click still asks for an answer

    # ------------------------------------------------------------ the App Home tab

    @app.event("app_home_opened")
    async def on_home(event: dict[str, Any], body: dict[str, Any], client: AsyncWebClient) -> None:
        ctx.track_current_task()
        user = event.get("user")
        if event.get("tab") != "home" or not isinstance(user, str) or not user:
            return
        try:
            if body.get("event_id") and not await ctx.store.first_delivery(str(body["event_id"])):
                return
            found = await actions.home(ctx, user)
            view = interactive.home_view(found.clusters, found.checked)
        except StoreError as e:
            view = interactive.home_view((), f"the bot's state store is unavailable: {e}")
        try:
            await client.views_publish(user_id=user, view=view)
        except SlackApiError as e:
            log.warning("views.publish failed", extra={"ctx_error": e.response.get("error") if e.response else ""})


def _action(body: dict[str, Any]) -> dict[str, Any]:
    found = (body.get("actions") or [{}])[0]
    return found if isinstance(found, dict) else {}


def _where(body: dict[str, Any]) -> tuple[str, str]:
    """The channel the click came from (of the message, or a modal's own metadata) and who clicked."""
    channel = (body.get("container") or {}).get("channel_id") or (body.get("channel") or {}).get("id")
    if not channel and isinstance(body.get("view"), dict):
        channel = read_metadata(body["view"]).get("channel")
    return str(channel or ""), str((body.get("user") or {}).get("id", ""))


def _fields(view: dict[str, Any]) -> dict[str, str]:
    """A submitted modal's inputs, by block_id: the text typed, or the value of the option chosen."""
    found: dict[str, str] = {}
    for block_id, by_action in (view.get("state") or {}).get("values", {}).items():
        for entry in by_action.values():
            chosen = entry.get("selected_option") or {}
            text = entry.get("value") if entry.get("type") != "static_select" else chosen.get("value")
            if isinstance(text, str) and text.strip():
                found[block_id] = text.strip()
    return found
