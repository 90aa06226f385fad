"""Slack delivery for workers: one WebClient per process, slack_sdk's retry handlers (Retry-After)."""

from __future__ import annotations

import logging

from bot.outbound import DeliveryError, NoticeMixin
from bot.slack import render
from core.desk import DeskCard
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

    # --- the desk (core.desk.DeskDelivery) ---------------------------------------------------------

    def permalink(self, *, channel: str, ts: str) -> str | None:
        """A link to the employee's thread for the desk card (None where Slack gives none)."""
        from slack_sdk.errors import SlackApiError, SlackClientError

        try:
            return self.client.chat_getPermalink(channel=channel, message_ts=ts).get("permalink")
        except (SlackApiError, SlackClientError, OSError) as err:
            log.info("no permalink for %s/%s: %s", channel, ts, err)
            return None

    def _card_link(self, card: DeskCard) -> str | None:
        return self.permalink(channel=card.employee_channel, ts=card.employee_thread) if card.employee_thread else None

    def post_card(self, card: DeskCard, *, channel: str) -> tuple[str, str]:
        """The card as a new desk message: its ts is the desk thread technicians reply in."""
        from slack_sdk.errors import SlackApiError, SlackClientError

        link = self._card_link(card)
        try:
            response = self.client.chat_postMessage(channel=channel, text=render.desk_text(card, link=link),
                                                    blocks=render.desk_blocks(card, link=link))
        except (SlackApiError, SlackClientError, OSError) as err:
            raise DeliveryError(f"Slack did not take the desk post: {err}") from err
        ts = str(response.get("ts", ""))
        return ts, ts

    def update_card(self, card: DeskCard, *, channel: str, ref: str) -> None:
        from slack_sdk.errors import SlackApiError, SlackClientError

        link = self._card_link(card)
        try:
            self.client.chat_update(channel=channel, ts=ref, text=render.desk_text(card, link=link),
                                    blocks=render.desk_blocks(card, link=link))
        except (SlackApiError, SlackClientError, OSError) as err:
            raise DeliveryError(f"Slack did not take the desk update: {err}") from err
