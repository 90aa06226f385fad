"""Replies as Telegram HTML: escaped for the parse mode, split at sentence ends within 4,096 UTF-16
units, with the 👍 / 👎 / "Get a technician" keyboard under the last part."""

from __future__ import annotations

import html
import re

from bot.outbound import split_text
from core import texts
from core.desk import DeskCard
from core.types import Reply

MESSAGE_LIMIT = 4096  # Telegram counts UTF-16 code units of the text after entity parsing
PARSE_MODE = "HTML"


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def escaped_len(text: str) -> int:
    # The escaped length bounds what Telegram counts; splitting on it keeps every part sendable.
    return utf16_len(html.escape(text, quote=False))


def answer_parts(reply: Reply) -> list[str]:
    """The message texts to send, in order, already escaped for HTML."""
    body = reply.text
    footer = []
    if reply.sources:
        tickets = "; ".join(f"{tid} ({title})" if title else tid for tid, title in reply.sources)
        footer.append(texts.CITED.format(tickets=tickets))
    if reply.estimated_hours is not None:
        footer.append(texts.FIX_TIME.format(hours=reply.estimated_hours))
    pieces = split_text(body, MESSAGE_LIMIT, escaped_len)
    parts = [html.escape(p, quote=False) for p in pieces]
    if footer:
        extra = "<i>" + html.escape("\n".join(footer), quote=False) + "</i>"
        if utf16_len(parts[-1]) + 2 + utf16_len(extra) <= MESSAGE_LIMIT:
            parts[-1] += "\n\n" + extra
        else:
            parts.extend(html.escape(p, quote=False) for p in split_text("\n".join(footer), MESSAGE_LIMIT, escaped_len))
    return parts


def callback(action: str, reply_id: int) -> str:
    return f"{action}:{reply_id}"


def parse_callback(data: str) -> tuple[str, int] | None:
    action, _, value = (data or "").partition(":")
    if action in ("good", "bad", "esc") and value.isdigit():
        return action, int(value)
    return None


def keyboard(reply_id: int):  # type: ignore[no-untyped-def]
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    return InlineKeyboardMarkup([[
        InlineKeyboardButton("👍", callback_data=callback("good", reply_id)),
        InlineKeyboardButton("👎", callback_data=callback("bad", reply_id)),
        InlineKeyboardButton(texts.BUTTON_ESCALATE, callback_data=callback("esc", reply_id)),
    ]])


def topic_of(thread: str) -> int | None:
    """Forum topics are conversations named "topic<id>"; replies go to the same topic."""
    return int(thread[5:]) if thread.startswith("topic") and thread[5:].isdigit() else None


# --- the desk (issue 12): the escalation card with Claim / Resolve ---------------------------------

DESK_ACTIONS = ("claim", "resolve")
# Every desk message the bot posts names its escalation; a technician's reply to any of them is
# matched back by this mark (Telegram has no threads in a plain group).
ESCALATION_MARK = re.compile(r"[Ee]scalation #(\d+)")
RESOLVE_MARK = re.compile(r"Resolution for escalation #(\d+):")


def message_link(chat_id: str, message_id: str | None) -> str | None:
    """A t.me link to a message in a supergroup; private chats and basic groups have none."""
    if not message_id or not chat_id.startswith("-100"):
        return None
    return f"https://t.me/c/{chat_id[4:]}/{message_id}"


def desk_text(card: DeskCard) -> str:
    """The card as Telegram HTML (within one message: the summary is cut first)."""
    head = [f"<b>{html.escape(texts.DESK_CARD_TITLE.format(id=card.escalation_id, status=card.status), quote=False)}</b>"]
    if card.severity:
        head.append(html.escape(texts.DESK_CARD_SEVERITY.format(severity=card.severity,
                                                                reason=card.severity_reason or "-"), quote=False))
    else:
        head.append(html.escape(texts.DESK_CARD_SEVERITY_PENDING, quote=False))
    tail = []
    if card.reason:
        tail.append(html.escape(texts.DESK_CARD_WHY.format(reason=card.reason), quote=False))
    if card.technician:
        tail.append(html.escape(texts.DESK_CARD_ASSIGNEE.format(who=card.technician), quote=False))
    if card.ticket_id:
        tail.append(html.escape(texts.DESK_CARD_TICKET.format(ticket=card.ticket_id), quote=False))
    link = message_link(card.employee_channel, card.employee_ref)
    if link:
        tail.append(texts.DESK_CARD_LINK.format(link=f'<a href="{html.escape(link)}">open</a>'))
    tail.append("<i>" + html.escape(texts.DESK_CARD_HOW.replace("in this thread", "to this message"), quote=False) + "</i>")
    budget = MESSAGE_LIMIT - utf16_len("\n\n".join(head + tail)) - 8
    summary = card.summary or "-"
    while escaped_len(summary) > budget and summary:
        summary = summary[: max(0, len(summary) - max(1, escaped_len(summary) - budget))].rstrip() + "…"
        if len(summary) <= 1:
            break
    return "\n\n".join([*head, html.escape(summary, quote=False), *tail])


def desk_keyboard(card: DeskCard):  # type: ignore[no-untyped-def]
    """Claim / Resolve under the card; none once it is resolved."""
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    if card.status == "resolved":
        return None
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(texts.BUTTON_CLAIM, callback_data=callback("claim", card.escalation_id)),
        InlineKeyboardButton(texts.BUTTON_RESOLVE, callback_data=callback("resolve", card.escalation_id)),
    ]])


def parse_desk_callback(data: str) -> tuple[str, int] | None:
    action, _, value = (data or "").partition(":")
    if action in DESK_ACTIONS and value.isdigit():
        return action, int(value)
    return None
