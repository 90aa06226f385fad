"""Which Slack messages are questions, and their conversion to ``Inbound``.

The rules, so the bot never butts into people's chatter:
- ``app_mention``: answered anywhere;
- direct messages: always answered (also when they mention a colleague);
- a thread reply without a mention: answered only in a thread the bot already takes part in;
- edits are never answered again; a deleted message deletes its stored text; a file without text
  gets a short "please type it" reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from core.types import Inbound

PLATFORM = "slack"
ANSWERED_SUBTYPES = (None, "file_share", "thread_broadcast")


def mention_pattern(bot_user_id: str | None) -> re.Pattern[str]:
    return re.compile(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>\s*" if bot_user_id else r"(?!x)x")


@dataclass(frozen=True)
class Decision:
    """What to do with a message event: ``answer`` it, ``forget`` a deleted one, ``not_text`` reply, or ignore."""

    action: str  # "answer", "forget", "not_text", "ignore"
    needs_thread_check: bool = False  # answer only if the bot already takes part in the thread


def decide(event: dict[str, Any], *, bot_user_id: str | None, via_mention: bool) -> Decision:
    subtype = event.get("subtype")
    if subtype == "message_deleted":
        return Decision("forget")
    if event.get("bot_id") or event.get("user") in (None, bot_user_id) or subtype not in ANSWERED_SUBTYPES:
        return Decision("ignore")  # edits (message_changed), joins, bot posts (our own replies too)
    text = str(event.get("text") or "")
    mentioned = bool(bot_user_id) and f"<@{bot_user_id}" in text
    direct = event.get("channel_type") == "im"
    if not via_mention and mentioned and not direct:
        return Decision("ignore")  # Slack sends the same message as app_mention: that one answers it
    stripped = mention_pattern(bot_user_id).sub("", text).strip()
    action = "not_text" if not stripped and event.get("files") else "answer"
    if via_mention or direct:
        return Decision(action)
    if event.get("thread_ts") and event.get("thread_ts") != event.get("ts"):
        return Decision(action, needs_thread_check=True)
    return Decision("ignore")  # a channel message without a mention: not for us


def thread_of(event: dict[str, Any]) -> str:
    return str(event.get("thread_ts") or event.get("ts") or "")


def to_inbound(event: dict[str, Any], *, bot_user_id: str | None) -> Inbound:
    ts = str(event.get("ts", ""))
    channel = str(event.get("channel", ""))
    return Inbound(
        platform=PLATFORM,
        channel=channel,
        thread=thread_of(event),
        user_external_id=str(event.get("user", "")),
        text=mention_pattern(bot_user_id).sub("", str(event.get("text") or "")),
        # The message itself is the idempotency key: its app_mention and message events, and Slack's
        # retries of either, all carry the same channel and ts.
        event_id=f"{channel}:{ts}",
        message_ref=ts,
    )


def deleted_ref(event: dict[str, Any]) -> str | None:
    return str(event.get("deleted_ts") or (event.get("previous_message") or {}).get("ts") or "") or None
