"""Telegram adapter: converts updates to ``Inbound`` and hands them to the intake. Nothing else.

The update_id is the idempotency key. Replies are sent by the worker (bot/outbound.py) as replies
to the question's message.
"""

from __future__ import annotations

import asyncio
import logging

from bot.intake import Intake
from core import texts
from core.errors import BrokerUnavailable, ConfigError
from core.settings import Settings
from core.types import Inbound

log = logging.getLogger(__name__)


def to_inbound(update) -> Inbound | None:  # type: ignore[no-untyped-def]
    message = update.effective_message
    if message is None or message.from_user is None or message.from_user.is_bot:
        return None
    return Inbound(
        platform="telegram",
        channel=str(message.chat_id),
        # Forum topics are threads; a plain chat is one conversation.
        thread=str(message.message_thread_id or "main"),
        user_external_id=str(message.from_user.id),
        text=message.text or message.caption or "",
        event_id=str(update.update_id),
        message_ref=str(message.message_id),
    )


def build_application(*, settings: Settings, intake: Intake):  # type: ignore[no-untyped-def]
    from telegram.ext import Application, MessageHandler, filters

    if not settings.telegram_bot_token:
        raise ConfigError("SUPPORTBOT_TELEGRAM_BOT_TOKEN is required for Telegram")
    application = (
        Application.builder()
        .token(settings.telegram_bot_token.get_secret_value())
        .base_url(settings.telegram_api_url)
        .build()
    )

    async def on_message(update, context) -> None:  # type: ignore[no-untyped-def]
        inbound = to_inbound(update)
        if inbound is None:
            return
        try:
            # Intake does SQL and anonymization: keep the event loop free while it runs.
            receipt = await asyncio.to_thread(intake.receive, inbound)
        except BrokerUnavailable:
            await update.effective_message.reply_text(texts.DELAYED)
            return
        if receipt.immediate_reply:
            await update.effective_message.reply_text(receipt.immediate_reply)

    application.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, on_message))
    return application
