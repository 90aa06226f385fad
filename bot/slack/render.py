"""Replies as Slack Block Kit, within Slack's limits (section text 3,000 chars, 50 blocks, message text)."""

from __future__ import annotations

import json
from typing import Any

from bot.outbound import split_text
from core import texts
from core.desk import DeskCard
from core.types import Reply

SECTION_CHARS = 3000  # Slack's limit on a section's text
MAX_SECTIONS = 45  # 50 blocks at most; the context and the buttons take the rest
FALLBACK_CHARS = 3000  # the notification text; Slack truncates message text at 40,000 anyway
CONTEXT_CHARS = 2000
ACTIONS_BLOCK = "feedback"
RATING_BLOCK = "rating-status"
ESCALATION_BLOCK = "escalation-status"
REASON_VIEW = "bad_reason"


def escape(text: str) -> str:
    """Slack's mrkdwn control characters; a question's "<@U…>" must not become a mention in the answer."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fallback_text(reply: Reply) -> str:
    text = escape(reply.text)
    return text if len(text) <= FALLBACK_CHARS else text[: FALLBACK_CHARS - 1] + "…"


def answer_blocks(
    reply: Reply, *, rating_note: str | None = None, escalation_note: str | None = None
) -> list[dict[str, Any]]:
    """The answer's text, its cited tickets and fix time as context, then 👍 / 👎 / escalate buttons."""
    pieces = split_text(escape(reply.text), SECTION_CHARS)
    if len(pieces) > MAX_SECTIONS:
        pieces = pieces[:MAX_SECTIONS]
        pieces[-1] = pieces[-1][: SECTION_CHARS - 1] + "…"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": piece}} for piece in pieces
    ]
    context = []
    if reply.sources:
        tickets = " · ".join(f"*{escape(tid)}* {escape(title)}".strip() for tid, title in reply.sources)
        context.append(_clip(texts.CITED.format(tickets=tickets)))
    if reply.estimated_hours is not None:
        context.append(texts.FIX_TIME.format(hours=reply.estimated_hours))
    if context:
        blocks.append({"type": "context", "block_id": "sources",
                       "elements": [{"type": "mrkdwn", "text": c} for c in context]})
    if reply.kind != "answer" or reply.message_id is None:
        return blocks
    value = str(reply.message_id)
    blocks.append({
        "type": "actions",
        "block_id": ACTIONS_BLOCK,
        "elements": [
            _button("rate_good", texts.BUTTON_GOOD, value),
            _button("rate_bad", texts.BUTTON_BAD, value),
            _button("escalate", texts.BUTTON_ESCALATE, value),
        ],
    })
    for block_id, note in ((RATING_BLOCK, rating_note), (ESCALATION_BLOCK, escalation_note)):
        if note:
            blocks.append({"type": "context", "block_id": block_id,
                           "elements": [{"type": "mrkdwn", "text": _clip(escape(note))}]})
    return blocks


def reason_modal(*, reply_id: int, channel: str, ts: str) -> dict[str, Any]:
    """The 👎 modal: why did the answer not help (optional)."""
    return _modal(REASON_VIEW, {"reply_id": reply_id, "channel": channel, "ts": ts}, texts.BAD_REASON_TITLE,
                  "Send", "Skip",
                  [_text_input("reason", texts.BAD_REASON_LABEL[:2000], multiline=True, max_length=2000)])  # fmt: skip


def _modal(callback_id: str, metadata: dict[str, Any], title: str, submit: str, close: str,
           blocks: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "modal",
        "callback_id": callback_id,
        "private_metadata": json.dumps(metadata),
        "title": {"type": "plain_text", "text": title[:24]},  # Slack's limit for a modal title
        "submit": {"type": "plain_text", "text": submit},
        "close": {"type": "plain_text", "text": close},
        "blocks": blocks,
    }


def _text_input(block_id: str, label: str, *, multiline: bool = False, optional: bool = True,
                max_length: int = 2900) -> dict[str, Any]:  # fmt: skip
    return {"type": "input", "block_id": block_id, "optional": optional,
            "label": {"type": "plain_text", "text": label},
            "element": {"type": "plain_text_input", "action_id": block_id, "multiline": multiline,
                        "max_length": max_length}}


def _button(action_id: str, label: str, value: str) -> dict[str, Any]:
    return {"type": "button", "action_id": action_id, "value": value, "text": {"type": "plain_text", "text": label}}


def _clip(text: str) -> str:
    return text if len(text) <= CONTEXT_CHARS else text[: CONTEXT_CHARS - 1] + "…"


# --- the desk (issue 12): the escalation card with Claim / Resolve, and the resolve modal -----------

DESK_ACTIONS_BLOCK = "desk"
RESOLVE_VIEW = "desk_resolve"


def desk_text(card: DeskCard, *, link: str | None = None) -> str:
    """The card as plain text: the notification text, and what a client without blocks shows."""
    lines = [texts.DESK_CARD_TITLE.format(id=card.escalation_id, status=card.status)]
    if card.severity:
        lines.append(texts.DESK_CARD_SEVERITY.format(severity=card.severity, reason=card.severity_reason or "-"))
    else:
        lines.append(texts.DESK_CARD_SEVERITY_PENDING)
    if card.summary:
        lines.append(card.summary)
    if card.reason:
        lines.append(texts.DESK_CARD_WHY.format(reason=card.reason))
    if card.technician:
        lines.append(texts.DESK_CARD_ASSIGNEE.format(who=card.technician))
    if card.ticket_id:
        lines.append(texts.DESK_CARD_TICKET.format(ticket=card.ticket_id))
    if link:
        lines.append(texts.DESK_CARD_LINK.format(link=link))
    text = escape("\n".join(lines))
    return text if len(text) <= FALLBACK_CHARS else text[: FALLBACK_CHARS - 1] + "…"


def desk_blocks(card: DeskCard, *, link: str | None = None) -> list[dict[str, Any]]:
    """Title, severity with its reason, the summary, why it was escalated, the link back to the
    employee's thread, then Claim / Resolve (hidden once resolved)."""
    title = texts.DESK_CARD_TITLE.format(id=card.escalation_id, status=card.status)
    severity = (texts.DESK_CARD_SEVERITY.format(severity=card.severity, reason=card.severity_reason or "-")
                if card.severity else texts.DESK_CARD_SEVERITY_PENDING)
    blocks: list[dict[str, Any]] = [
        {"type": "section", "block_id": "title", "text": {"type": "mrkdwn", "text": f"*{escape(title)}*\n{escape(severity)}"}},
    ]
    for number, piece in enumerate(split_text(escape(card.summary or "-"), SECTION_CHARS)[:10]):
        blocks.append({"type": "section", "block_id": f"summary-{number}", "text": {"type": "mrkdwn", "text": piece}})
    context = []
    if card.reason:
        context.append(_clip(escape(texts.DESK_CARD_WHY.format(reason=card.reason))))
    if card.technician:
        # A real mention: the assignee's Slack id, not text from a person.
        context.append(texts.DESK_CARD_ASSIGNEE.format(who=f"<@{card.technician}>"))
    if card.ticket_id:
        context.append(escape(texts.DESK_CARD_TICKET.format(ticket=card.ticket_id)))
    if link:
        context.append(texts.DESK_CARD_LINK.format(link=f"<{link}|open>"))
    context.append(escape(texts.DESK_CARD_HOW))
    blocks.append({"type": "context", "block_id": "desk-context",
                   "elements": [{"type": "mrkdwn", "text": c} for c in context]})
    if card.status != "resolved":
        value = str(card.escalation_id)
        blocks.append({"type": "actions", "block_id": DESK_ACTIONS_BLOCK, "elements": [
            _button("claim", texts.BUTTON_CLAIM, value),
            _button("resolve", texts.BUTTON_RESOLVE, value),
        ]})
    return blocks


def resolve_modal(*, escalation_id: int, channel: str, ts: str) -> dict[str, Any]:
    """Resolve: the fix (required), the hours it took and the machine (optional)."""
    return _modal(RESOLVE_VIEW, {"escalation_id": escalation_id, "channel": channel, "ts": ts},
                  texts.DESK_RESOLVE_TITLE, "Resolve", "Cancel", [
                      _text_input("resolution", texts.DESK_RESOLVE_LABEL, multiline=True, optional=False),
                      _text_input("hours", texts.DESK_RESOLVE_HOURS),
                      _text_input("machine", texts.DESK_RESOLVE_MACHINE),
                  ])  # fmt: skip


def modal_values(view: dict[str, Any]) -> dict[str, str]:
    """A submitted modal's input values by block id (empty inputs are "")."""
    values = (view.get("state") or {}).get("values") or {}
    return {block: str(((values.get(block) or {}).get(block) or {}).get("value") or "") for block in values}
