"""Replies back to the platform a question came from. A small port with one adapter per platform.

SDK clients are built here from the settings, with their configurable base URLs, so tests point them
at local fake servers; vendor errors become ``DeliveryError`` at this boundary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from core.errors import SupportbotError
from core.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(SupportbotError):
    """The platform did not take the reply (network, rate limit, revoked token)."""


class Outbound(Protocol):
    def send(self, *, channel: str, thread: str, text: str, reply_to: str | None = None) -> None: ...


class SlackOutbound:
    def __init__(self, *, token: str, base_url: str) -> None:
        from slack_sdk import WebClient

        self.client = WebClient(token=token, base_url=base_url)

    def send(self, *, channel: str, thread: str, text: str, reply_to: str | None = None) -> None:
        from slack_sdk.errors import SlackApiError, SlackClientError

        try:
            self.client.chat_postMessage(channel=channel, thread_ts=thread, text=text)
        except (SlackApiError, SlackClientError, OSError) as err:
            raise DeliveryError(f"Slack did not take the reply: {err}") from err


class TelegramOutbound:
    def __init__(self, *, token: str, base_url: str) -> None:
        self.token = token
        self.base_url = base_url

    def send(self, *, channel: str, thread: str, text: str, reply_to: str | None = None) -> None:
        from telegram import Bot
        from telegram.error import TelegramError

        async def post() -> None:
            async with Bot(self.token, base_url=self.base_url) as bot:
                await bot.send_message(
                    chat_id=int(channel),
                    text=text[:4096],  # Telegram's message limit
                    reply_to_message_id=int(reply_to) if reply_to else None,
                )

        try:
            asyncio.run(post())
        except (TelegramError, OSError) as err:
            raise DeliveryError(f"Telegram did not take the reply: {err}") from err


def outbound_for(platform: str, settings: Settings) -> Outbound | None:
    """The sender for a platform; None where the channel reads replies itself (console)."""
    if platform == "slack" and settings.slack_bot_token:
        return SlackOutbound(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url)
    if platform == "telegram" and settings.telegram_bot_token:
        return TelegramOutbound(
            token=settings.telegram_bot_token.get_secret_value(), base_url=settings.telegram_api_url
        )
    return None
