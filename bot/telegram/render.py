"""Replies as Telegram HTML: escaped for the parse mode, split at sentence ends within 4,096 UTF-16
units, with the 👍 / 👎 / "Get a technician" keyboard under the last part."""

from __future__ import annotations

import html

from bot.outbound import split_text
from core import texts
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
