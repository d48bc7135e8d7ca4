"""Block Kit that people act on: the buttons of plan and alert messages, the `/etcd menu`, the modals
that collect a replacement or choose a snapshot, and the App Home tab. Pure builders: the Slack edge
(handlers/interactions.py) sends them and reads the clicks back by the IDs declared here.

A button's value carries what the click is about (a plan and its fingerprint, a cluster, a member), as
compact JSON; the server reads it with `read_value` and re-checks everything against the store, since a
value is only what the message said when it was posted. Plain-text fields (dialogs, modal titles) cannot
mention anyone: they name people by display name, which the caller resolves.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bot.domain.mrkdwn import escape

PLAIN_MAX = 75          # a button's text
CONFIRM_TEXT_MAX = 300  # a confirm dialog's text
VALUE_MAX = 2000        # a button's value
OPTION_MAX = 75         # an option's text (and its value: 150)
OPTIONS_MAX = 100       # options in one static_select


class Action(StrEnum):
    """The action_id of each kind of button: one listener each."""

    APPROVE = "plan_approve"
    REJECT = "plan_reject"
    PROPOSE_REPLACE = "propose_replace"
    PROPOSE_RESTORE = "propose_restore"
    MUTE = "alert_mute"
    RUNBOOK = "alert_runbook"
    RUN = "menu_run"


class Form(StrEnum):
    """The callback_id of each modal."""

    REPLACE = "replace_form"
    RESTORE = "restore_form"


# the input blocks of the replacement form, by block_id (its errors name these)
FAILED, NEW_NAME, NEW_PEER_URL, CLIENT_URL = "failed", "new_name", "new_peer_url", "client_url"
SNAPSHOT = "snapshot"
INPUT = "value"   # every input's action_id: the block_id says which field it is


def plain(text: str, limit: int = 3000) -> dict[str, Any]:
    """A plain-text object of raw words: escaped like every value posted, cut to Slack's limit."""
    text = escape(text)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return {"type": "plain_text", "text": text, "emoji": True}


def value_of(**fields: str) -> str:
    """A button's value: the fields as compact JSON."""
    text = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    if len(text) > VALUE_MAX:
        raise ValueError("a button's value holds at most 2000 characters")
    return text


def read_value(value: str | None) -> dict[str, str]:
    """A button's value as `value_of` wrote it; {} for anything else (a forged or older value)."""
    try:
        found = json.loads(value or "")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(k): v for k, v in found.items() if isinstance(v, str)}


def fingerprint_tag(fingerprint: str) -> str:
    """A short digest of a plan's fingerprint for its buttons: a click on a message of an older plan of
    the same ID, or a forged value, is told apart from the plan the store holds."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def button(text: str, action: Action, value: str | None = None, *, style: str | None = None,
           confirm: dict[str, Any] | None = None, url: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"type": "button", "action_id": str(action), "text": plain(text, PLAIN_MAX)}
    if value is not None:
        b["value"] = value
    if url is not None:
        b["url"] = url
    if style is not None:
        b["style"] = style
    if confirm is not None:
        b["confirm"] = confirm
    return b


def confirm(title: str, text: str, yes: str, no: str, *, danger: bool = False) -> dict[str, Any]:
    """The dialog Slack shows before the click is sent: what will change, in plain words."""
    dialog: dict[str, Any] = {"title": plain(title, 100), "text": plain(text, CONFIRM_TEXT_MAX),
                              "confirm": plain(yes, 30), "deny": plain(no, 30)}
    if danger:
        dialog["style"] = "danger"
    return dialog


def actions(block_id: str, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "actions", "block_id": block_id, "elements": list(elements)}


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlanChoice:
    """What the Approve and Reject buttons of a proposed plan say and carry."""

    plan_id: str
    fingerprint: str
    cluster: str
    change: str            # what will change, in plain words (the dialog's text)
    danger: bool           # restore and replace: the dialog is red
    approvals_needed: int


def plan_buttons(choice: PlanChoice) -> dict[str, Any]:
    value = value_of(plan=choice.plan_id, fp=fingerprint_tag(choice.fingerprint))
    runs = ("it runs at once" if choice.approvals_needed == 1
            else f"it runs when {choice.approvals_needed} approvers agree; each counts once")
    approve = confirm(f"Approve plan {choice.plan_id} on {choice.cluster}?", f"{choice.change} Your approval: {runs}.",
                      "Approve", "Not yet", danger=choice.danger)
    reject = confirm(f"Reject plan {choice.plan_id}?", f"Nothing changes on {choice.cluster}; the plan closes.",
                     "Reject", "Keep it")
    return actions(f"plan:{choice.plan_id}", [
        button("Approve", Action.APPROVE, value, style="danger" if choice.danger else "primary", confirm=approve),
        button("Reject", Action.REJECT, value, confirm=reject)])


# ---------------------------------------------------------------- alerts


def alert_buttons(cluster: str, subject: str, offers: Sequence[str], runbook_url: str | None) -> dict[str, Any]:
    """An alert's next steps: a replacement or a restore when that is the way out, a mute, the runbook."""
    elements = []
    if "replace" in offers:
        elements.append(button("Propose replacement…", Action.PROPOSE_REPLACE, value_of(cluster=cluster,
                                                                                        member=subject)))
    if "restore" in offers:
        elements.append(button("Propose restore…", Action.PROPOSE_RESTORE, value_of(cluster=cluster)))
    elements.append(button("Mute 1 h", Action.MUTE, value_of(cluster=cluster, duration="1h"),
                           confirm=confirm(f"Mute {cluster} for 1 hour?",
                                           f"New alerts of {cluster} are held back for an hour; open ones stay.",
                                           "Mute", "Cancel")))
    if runbook_url:
        elements.append(button("Runbook", Action.RUNBOOK, url=runbook_url))
    return actions(f"alert:{cluster}:{subject}"[:255], elements)


# ---------------------------------------------------------------- modals


def _metadata(**fields: str) -> str:
    return json.dumps(fields, separators=(",", ":"))


def read_metadata(view: dict[str, Any]) -> dict[str, str]:
    return read_value(view.get("private_metadata"))


def _input(block_id: str, label: str, *, initial: str | None = None, placeholder: str | None = None,
           hint: str | None = None, optional: bool = False) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": INPUT}
    if initial:
        element["initial_value"] = initial
    if placeholder:
        element["placeholder"] = plain(placeholder, 150)
    block: dict[str, Any] = {"type": "input", "block_id": block_id, "label": plain(label, 2000), "element": element,
                             "optional": optional}
    if hint:
        block["hint"] = plain(hint, 2000)
    return block


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}


def _modal(form: Form | None, title: str, blocks: list[dict[str, Any]], metadata: str, *,
           submit: str | None = None, close: str = "Cancel") -> dict[str, Any]:
    view: dict[str, Any] = {"type": "modal", "title": plain(title, 24), "close": plain(close, 24),
                            "private_metadata": metadata, "blocks": blocks}
    if form is not None:
        view["callback_id"] = str(form)
    if submit is not None:
        view["submit"] = plain(submit, 24)
    return view


def replace_form(cluster: str, channel: str, failed: str, name_hint: str = "member4") -> dict[str, Any]:
    """The replacement's form, prefilled with the cluster and the failed member: the new member's name,
    peer URL and client URL are asked for; the bot checks them before the modal closes."""
    return _modal(Form.REPLACE, "Replace a member", [
        _section(f"Propose replacing a failed member of *{escape(cluster)}*. The plan is posted in the channel "
                 "for an approver; nothing changes before that."),
        _input(FAILED, "Failed member (name or ID)", initial=failed),
        _input(NEW_NAME, "New member's name", placeholder=f"e.g. {name_hint}",
               hint="Unique in the cluster: 1 to 63 letters, digits, '-', '_' or '.'"),
        _input(NEW_PEER_URL, "New member's peer URL", placeholder="https://10.0.0.4:2380"),
        _input(CLIENT_URL, "New member's client URL", placeholder="https://10.0.0.4:2379", optional=True,
               hint="Leave empty to let the launcher set it"),
    ], _metadata(cluster=cluster, channel=channel), submit="Propose")


@dataclass(frozen=True)
class SnapshotChoice:
    """A verified snapshot a restore may use, as the restore form lists it."""

    file_name: str
    label: str          # "rev 1234 · 2.1 MB · 3 h ago"


def restore_form_loading(cluster: str, channel: str) -> dict[str, Any]:
    """Opened at once (a click's trigger expires in 3 s); the snapshots replace it once listed."""
    return _modal(None, "Restore", [_section(f":hourglass_flowing_sand: Listing the verified snapshots of "
                                             f"*{escape(cluster)}*…")],
                  _metadata(cluster=cluster, channel=channel), close="Close")


def restore_form(cluster: str, channel: str, snapshots: Sequence[SnapshotChoice]) -> dict[str, Any]:
    """The restore's form: the verified snapshots, newest first, the newest chosen."""
    options = [{"text": plain(s.file_name, OPTION_MAX), "description": plain(s.label, OPTION_MAX),
                "value": s.file_name} for s in snapshots[:OPTIONS_MAX]]
    select: dict[str, Any] = {"type": "static_select", "action_id": INPUT, "options": options,
                              "initial_option": options[0]}
    return _modal(Form.RESTORE, "Restore", [
        _section(f"Propose restoring *every member* of *{escape(cluster)}* from a verified snapshot: every write "
                 "since it is lost. The plan is posted in the channel; it runs only after its approvers agree, "
                 "and only while quorum is lost."),
        {"type": "input", "block_id": SNAPSHOT, "label": plain("Snapshot"), "element": select, "optional": False},
    ], _metadata(cluster=cluster, channel=channel), submit="Propose")


def notice(title: str, text: str, metadata: str = "") -> dict[str, Any]:
    """A modal that only tells (a refusal, nothing to choose from): one section and Close."""
    return _modal(None, title, [_section(text)], metadata, close="Close")


# ---------------------------------------------------------------- the menu and the App Home


@dataclass(frozen=True)
class MenuItem:
    label: str
    command: str          # the text after /etcd it runs (a proposal opens its form instead)
    action: Action = Action.RUN
    member: str = ""      # the member a proposed replacement starts from


def menu_blocks(cluster: str, state: str, items: Sequence[MenuItem]) -> list[dict[str, Any]]:
    """`/etcd menu`: the cluster's state in one line, then the common actions as buttons; a click runs as its
    /etcd command would (the role it needs is checked then), a proposal opens its form."""
    buttons = [button(i.label, i.action, value_of(cluster=cluster, command=i.command, member=i.member))
               for i in items]
    return [_section(f"*{escape(cluster)}*: {escape(state)}" if state else f"*{escape(cluster)}*"),
            *[actions(f"menu:{cluster}:{n}"[:255], buttons[n:n + 5]) for n in range(0, len(buttons), 5)],
            {"type": "context", "elements": [{"type": "mrkdwn",
                                              "text": "`/etcd help` lists every command and its arguments"}]}]


@dataclass(frozen=True)
class HomeCluster:
    """One cluster on a person's App Home tab: what to know at a glance."""

    name: str
    health: str                 # "HEALTHY: 3 of 3 voting members healthy, ..." or why it could not be read
    healthy: bool
    alerts: tuple[str, ...]     # one line each
    plans: tuple[str, ...]      # the open plans, one mrkdwn line each
    snapshot: str               # the newest verified snapshot, or that there is none
    drill: str                  # the newest drill, or that there is none


def home_view(clusters: Sequence[HomeCluster], checked: str) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "header", "text": plain("etcd clusters", 150)}]
    if not clusters:
        blocks.append(_section("You may read no cluster: ask for the reader role in the bot's configuration."))
    for c in clusters:
        icon = ":large_green_circle:" if c.healthy else ":red_circle:"
        lines = [f"{icon} *{escape(c.name)}* — {escape(c.health)}",
                 ":rotating_light: " + ("; ".join(escape(a) for a in c.alerts) if c.alerts else "no open alerts"),
                 ":clipboard: " + ("; ".join(c.plans) if c.plans else "no open plans"),
                 f":camera_with_flash: {c.snapshot}", f":test_tube: {c.drill}"]
        blocks += [{"type": "divider"}, _section("\n".join(lines))]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": escape(checked)}]})
    return {"type": "home", "blocks": blocks[:100]}
