"""Slack delivery for workers: one WebClient per process, slack_sdk's retry handlers (Retry-After)."""

from __future__ import annotations

import logging

from bot.outbound import DeliveryError, NoticeMixin
from bot.slack import render
from core.types import Delivered, Reply

log = logging.getLogger(__name__)


class SlackOutbound(NoticeMixin):
    platform = "slack"

    def __init__(self, *, token: str, base_url: str, retries: int = 3) -> None:
        from slack_sdk import WebClient
        from slack_sdk.http_retry.builtin_handlers import (
            ConnectionErrorRetryHandler,
            RateLimitErrorRetryHandler,
            ServerErrorRetryHandler,
        )

        # Rate limits wait as long as Slack's Retry-After says; connection and 5xx errors back off.
        self.client = WebClient(
            token=token,
            base_url=base_url,
            timeout=15,
            retry_handlers=[
                ConnectionErrorRetryHandler(max_retry_count=retries),
                RateLimitErrorRetryHandler(max_retry_count=retries),
                ServerErrorRetryHandler(max_retry_count=retries),
            ],
        )

    def deliver(self, reply: Reply) -> Delivered:
        from slack_sdk.errors import SlackApiError, SlackClientError

        where = reply.conversation
        text = render.fallback_text(reply)
        blocks = render.answer_blocks(reply)
        try:
            if reply.placeholder:
                try:
                    self.client.chat_update(channel=where.channel, ts=reply.placeholder, text=text, blocks=blocks)
                    return Delivered((reply.placeholder,))
                except SlackApiError as err:
                    if err.response.get("error") not in ("message_not_found", "cant_update_message"):
                        raise
                    log.info("placeholder %s gone (%s); posting the answer anew", reply.placeholder, err)
            response = self.client.chat_postMessage(
                channel=where.channel, thread_ts=where.thread or None, text=text, blocks=blocks
            )
            return Delivered((str(response.get("ts", "")),))
        except (SlackApiError, SlackClientError, OSError) as err:
            raise DeliveryError(f"Slack did not take the reply: {err}") from err

    def discard(self, *, channel: str, ref: str) -> None:
        from slack_sdk.errors import SlackApiError, SlackClientError

        try:
            self.client.chat_delete(channel=channel, ts=ref)
        except (SlackApiError, SlackClientError, OSError) as err:
            log.info("could not remove message %s: %s", ref, err)
