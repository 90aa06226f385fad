"""Telegram delivery for workers: one long-lived bot client per process on its own event loop thread,
PTB's AIORateLimiter for Telegram's limits (it waits out RetryAfter), backoff on network errors."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from bot.outbound import DeliveryError, NoticeMixin
from bot.telegram import render
from core.desk import DeskCard
from core.types import Delivered, Reply

log = logging.getLogger(__name__)


class TelegramOutbound(NoticeMixin):
    platform = "telegram"

    def __init__(self, *, token: str, base_url: str, retries: int = 3) -> None:
        from telegram.ext import AIORateLimiter, ExtBot

        self.retries = retries
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="telegram-outbound", daemon=True)
        self.thread.start()
        self.bot = ExtBot(token, base_url=base_url, rate_limiter=AIORateLimiter(max_retries=retries))
        self._run(self.bot.initialize())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=300)

    def _send(self, **kwargs: Any) -> Any:
        from telegram.error import NetworkError, RetryAfter, TelegramError, TimedOut

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return self._run(self.bot.send_message(**kwargs))
            except RetryAfter as err:  # past the rate limiter's own retries
                if attempt == self.retries:
                    raise DeliveryError(f"Telegram rate limit: {err}") from err
                time.sleep(float(err.retry_after if not hasattr(err.retry_after, "total_seconds") else err.retry_after.total_seconds()))
            except (TimedOut, NetworkError) as err:
                if attempt == self.retries:
                    raise DeliveryError(f"Telegram did not take the reply: {err}") from err
                time.sleep(delay)
                delay *= 2
            except (TelegramError, OSError) as err:
                raise DeliveryError(f"Telegram did not take the reply: {err}") from err
        raise DeliveryError("Telegram did not take the reply")

    def deliver(self, reply: Reply) -> Delivered:
        from telegram import ReplyParameters

        where = reply.conversation
        parts = render.answer_parts(reply)
        refs = []
        for number, part in enumerate(parts):
            last = number == len(parts) - 1
            reply_to = where.reply_to if number == 0 else (refs[-1] if refs else None)
            message = self._send(
                chat_id=int(where.channel),
                text=part,
                parse_mode=render.PARSE_MODE,
                message_thread_id=render.topic_of(where.thread),
                reply_parameters=ReplyParameters(int(reply_to), allow_sending_without_reply=True) if reply_to else None,
                reply_markup=render.keyboard(reply.message_id) if last and reply.kind == "answer" and reply.message_id else None,
            )
            refs.append(str(message.message_id))
        return Delivered(tuple(refs))

    def discard(self, *, channel: str, ref: str) -> None:
        try:
            self._run(self.bot.delete_message(chat_id=int(channel), message_id=int(ref)))
        except Exception as err:  # best effort: a stale "working on it" is harmless
            log.info("could not remove message %s: %s", ref, err)

    # --- the desk (core.desk.DeskDelivery) ---------------------------------------------------------

    def post_card(self, card: DeskCard, *, channel: str) -> tuple[str, str]:
        """The card in the desk chat; its message id is the desk "thread" technicians reply to."""
        message = self._send(chat_id=int(channel), text=render.desk_text(card), parse_mode=render.PARSE_MODE,
                             reply_markup=render.desk_keyboard(card))
        ref = str(message.message_id)
        return ref, ref

    def update_card(self, card: DeskCard, *, channel: str, ref: str) -> None:
        from telegram.error import BadRequest, TelegramError

        try:
            self._run(self.bot.edit_message_text(chat_id=int(channel), message_id=int(ref), text=render.desk_text(card),
                                                 parse_mode=render.PARSE_MODE, reply_markup=render.desk_keyboard(card)))
        except BadRequest as err:
            if "not modified" not in str(err).lower():  # the same text again is no failure
                raise DeliveryError(f"Telegram did not take the desk update: {err}") from err
        except (TelegramError, OSError) as err:
            raise DeliveryError(f"Telegram did not take the desk update: {err}") from err
