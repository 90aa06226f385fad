"""Slack adapter: converts Slack events to ``Inbound`` and hands them to the intake. Nothing else.

Events arrive over HTTP (bolt verifies the signature); Slack's retries carry the same event_id,
which is the idempotency key, so a retry never produces a second answer. Replies are posted by the
worker (bot/outbound.py) in the question's thread.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from bot.intake import Intake
from core import texts
from core.errors import BrokerUnavailable, ConfigError
from core.settings import Settings
from core.types import Inbound

log = logging.getLogger(__name__)

MENTION = re.compile(r"<@[A-Z0-9]+>\s*")


def to_inbound(event: dict[str, Any], event_id: str | None) -> Inbound | None:
    """A Slack message event as our domain type; None for events that are not a person's message."""
    if event.get("bot_id") or event.get("subtype") not in (None, "file_share", "thread_broadcast"):
        return None  # edits, joins, bot posts (our own replies included)
    ts = str(event.get("ts", ""))
    return Inbound(
        platform="slack",
        channel=str(event.get("channel", "")),
        thread=str(event.get("thread_ts") or ts),
        user_external_id=str(event.get("user", "")),
        text=MENTION.sub("", str(event.get("text", ""))),
        event_id=event_id,
        message_ref=ts,
    )


def member_names(client) -> list[str]:  # type: ignore[no-untyped-def]
    """The workspace's member names, fed to the anonymizer as a deny-list."""
    names: list[str] = []
    for page in client.users_list(limit=200):
        for member in page.get("members", []):
            profile = member.get("profile", {})
            for key in ("real_name", "display_name"):
                if profile.get(key):
                    names.append(profile[key])
    return names


def build_app(*, settings: Settings, intake: Intake, client=None):  # type: ignore[no-untyped-def]
    from slack_bolt import App
    from slack_sdk import WebClient

    if not settings.slack_bot_token or not settings.slack_signing_secret:
        raise ConfigError("SUPPORTBOT_SLACK_BOT_TOKEN and SUPPORTBOT_SLACK_SIGNING_SECRET are required for Slack")
    client = client or WebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url)
    app = App(
        token=settings.slack_bot_token.get_secret_value(),
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        client=client,
    )

    def handle(body: dict[str, Any], event: dict[str, Any], say) -> None:  # type: ignore[no-untyped-def]
        inbound = to_inbound(event, body.get("event_id"))
        if inbound is None:
            return
        try:
            receipt = intake.receive(inbound)
        except BrokerUnavailable:
            say(text=texts.DELAYED, thread_ts=inbound.thread)
            return
        if receipt.immediate_reply:
            say(text=receipt.immediate_reply, thread_ts=inbound.thread)

    @app.event("app_mention")
    def on_mention(body, event, say) -> None:  # type: ignore[no-untyped-def]
        handle(body, event, say)

    @app.event("message")
    def on_message(body, event, say) -> None:  # type: ignore[no-untyped-def]
        # Channel messages reach us only when they mention the bot (handled above); DMs and thread
        # replies in a conversation the bot is part of come here.
        # A message that mentions the bot is already handled as app_mention.
        in_scope = event.get("channel_type") == "im" or event.get("thread_ts")
        if in_scope and "<@" not in str(event.get("text", "")):
            handle(body, event, say)

    return app
