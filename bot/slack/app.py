"""The Slack app (Bolt, asyncio): events, button presses, the 👎 modal and the slash command.

Bolt acknowledges events at once and runs these listeners afterwards; SQL and anonymization run in
threads so one slow message never holds the event loop. Replies are posted by the worker through
bot/slack/outbound.py; this process posts only what it can say by itself (placeholder, notices,
button feedback).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from bot.intake import Intake
from bot.outbound import load_reply
from bot.slack import render
from bot.slack.inbound import PLATFORM, decide, deleted_ref, thread_of, to_inbound
from core import texts
from core.conversations import (
    attach_placeholder,
    conversation_exists,
    delivered_without_placeholder,
    forget_message,
    get_or_create_user,
    latest_conversation,
)
from core.errors import BrokerUnavailable, ConfigError, SupportbotError
from core.feedback import escalate_answer, escalate_conversation, rate_answer
from core.schema import Escalation, EscalationStatus, Message
from core.settings import Settings

log = logging.getLogger(__name__)

COMMAND = "/supportbot"


def web_client(settings: Settings):  # type: ignore[no-untyped-def]
    """The adapter's async Web API client, retrying rate limits (Retry-After) and connection errors."""
    from slack_sdk.http_retry.builtin_async_handlers import (
        AsyncConnectionErrorRetryHandler,
        AsyncRateLimitErrorRetryHandler,
    )
    from slack_sdk.web.async_client import AsyncWebClient

    if not settings.slack_bot_token:
        raise ConfigError("SUPPORTBOT_SLACK_BOT_TOKEN is required for Slack")
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        timeout=15,
        retry_handlers=[AsyncConnectionErrorRetryHandler(max_retry_count=2), AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
    )


async def member_names(client) -> list[str]:  # type: ignore[no-untyped-def]
    """Every member's real and display name, all pages: the anonymizer's deny-list."""
    names: list[str] = []
    cursor = None
    while True:
        page = await client.users_list(limit=200, cursor=cursor)
        for member in page.get("members", []):
            profile = member.get("profile", {})
            for key in ("real_name", "display_name"):
                if profile.get(key):
                    names.append(profile[key])
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            return names


async def refresh_members_forever(client, intake: Intake, every_s: float) -> None:  # type: ignore[no-untyped-def]
    """Keep the deny-list current: people join the workspace after the adapter started."""
    while True:
        try:
            names = await member_names(client)
            await asyncio.to_thread(intake.known_names, names)
            log.info("member deny-list refreshed: %d names", len(names))
        except Exception as err:  # a failed refresh keeps the previous list; try again next round
            log.warning("member deny-list refresh failed: %s", err)
        await asyncio.sleep(every_s)


def build_app(*, settings: Settings, intake: Intake, socket_mode: bool = False, client=None):  # type: ignore[no-untyped-def]
    from slack_bolt.async_app import AsyncApp

    if not settings.slack_bot_token:
        raise ConfigError("SUPPORTBOT_SLACK_BOT_TOKEN is required for Slack")
    if not socket_mode and not settings.slack_signing_secret:
        raise ConfigError("SUPPORTBOT_SLACK_SIGNING_SECRET is required for the HTTP Events API (or set SUPPORTBOT_SLACK_APP_TOKEN for Socket Mode)")
    app = AsyncApp(
        client=client or web_client(settings),
        signing_secret=settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else "",
        # Socket Mode frames come over our own authenticated socket; there is no request to sign.
        request_verification_enabled=not socket_mode,
    )
    db = intake.db

    def sql(fn, /, **kwargs: Any):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            with db.session() as session:
                return fn(session=session, **kwargs)

        return asyncio.to_thread(run)

    async def post(client, channel: str, thread: str, text: str) -> str | None:  # type: ignore[no-untyped-def]
        try:
            response = await client.chat_postMessage(channel=channel, thread_ts=thread, text=text)
            return str(response.get("ts"))
        except Exception as err:  # the question is stored either way; the sweeper and worker follow up
            log.warning("could not post to %s: %s", channel, err)
            return None

    async def take(event: dict[str, Any], client, bot_user_id: str | None, *, via_mention: bool) -> None:  # type: ignore[no-untyped-def]
        decision = decide(event, bot_user_id=bot_user_id, via_mention=via_mention)
        channel = str(event.get("channel", ""))
        if decision.action == "ignore":
            return
        if decision.action == "forget":
            ref = deleted_ref(event)
            if ref:
                count = await sql(forget_message, platform=PLATFORM, channel=channel, ref=ref)
                log.info("message %s deleted in Slack: %d stored texts removed", ref, count)
            return
        thread = thread_of(event)
        if decision.needs_thread_check and not await sql(
            conversation_exists, platform=PLATFORM, channel=channel, thread=thread
        ):
            return  # people talking in a thread the bot is not part of
        if decision.action == "not_text":
            await post(client, channel, thread, texts.NOT_TEXT)
            return
        inbound = to_inbound(event, bot_user_id=bot_user_id)
        try:
            receipt = await asyncio.to_thread(intake.receive, inbound)
        except BrokerUnavailable:
            await post(client, channel, thread, texts.DELAYED)
            return
        if receipt.duplicate:
            return
        if receipt.immediate_reply:
            await post(client, channel, thread, receipt.immediate_reply)
            return
        # The first visible response, within a second: the worker replaces it with the answer.
        placeholder = await post(client, channel, thread, texts.WORKING_ON_IT)
        if placeholder is None:
            return
        await sql(attach_placeholder, message_id=receipt.message_id, ref=placeholder)
        if await sql(delivered_without_placeholder, message_id=receipt.message_id):
            await client.chat_delete(channel=channel, ts=placeholder)

    @app.event("app_mention")
    async def on_mention(event, client, context) -> None:  # type: ignore[no-untyped-def]
        await take(event, client, context.bot_user_id, via_mention=True)

    @app.event("message")
    async def on_message(event, client, context) -> None:  # type: ignore[no-untyped-def]
        await take(event, client, context.bot_user_id, via_mention=False)

    # --- buttons under an answer -----------------------------------------------------------------

    def _note_of_escalation(session, reply_id: int) -> str | None:  # type: ignore[no-untyped-def]
        reply = session.get(Message, reply_id)
        if reply is None:
            return None
        open_one = session.query(Escalation).filter(
            Escalation.conversation_id == reply.conversation_id, Escalation.status != EscalationStatus.resolved
        ).first()
        return texts.ESCALATED.format(id=open_one.id) if open_one else None

    async def refresh(client, *, channel: str, ts: str, reply_id: int, rating_note: str | None) -> None:  # type: ignore[no-untyped-def]
        def build():  # type: ignore[no-untyped-def]
            with db.session() as session:
                reply = load_reply(session, reply_id)
                return reply, _note_of_escalation(session, reply_id)

        reply, escalation_note = await asyncio.to_thread(build)
        if reply is None:
            return
        blocks = render.answer_blocks(reply, rating_note=rating_note, escalation_note=escalation_note)
        await client.chat_update(channel=channel, ts=ts, text=render.fallback_text(reply), blocks=blocks)

    def where(body: dict[str, Any]) -> tuple[int, str, str, str]:
        action = body["actions"][0]
        container = body.get("container") or {}
        channel = container.get("channel_id") or (body.get("channel") or {}).get("id", "")
        ts = container.get("message_ts") or (body.get("message") or {}).get("ts", "")
        return int(action["value"]), channel, ts, body["user"]["id"]

    async def rate(body, client, value: str, reason: str | None = None) -> None:  # type: ignore[no-untyped-def]
        reply_id, channel, ts, user = where(body)
        await sql(rate_answer, reply_id=reply_id, platform=PLATFORM, user_external_id=user, value=value,
                  reason=reason, anonymize=intake.anonymize)
        emoji = "👍" if value == "good" else "👎"
        await refresh(client, channel=channel, ts=ts, reply_id=reply_id, rating_note=texts.RATED.format(emoji=emoji))

    @app.action("rate_good")
    async def on_good(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        await rate(body, client, "good")

    @app.action("rate_bad")
    async def on_bad(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        reply_id, channel, ts, _ = where(body)
        # The modal first: its trigger_id expires after three seconds.
        await client.views_open(trigger_id=body["trigger_id"],
                                view=render.reason_modal(reply_id=reply_id, channel=channel, ts=ts))
        await rate(body, client, "bad")  # the vote counts even if the modal is skipped

    @app.view(render.REASON_VIEW)
    async def on_reason(ack, body, view, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        meta = json.loads(view.get("private_metadata") or "{}")
        values = (view.get("state") or {}).get("values") or {}
        reason = ((values.get("reason") or {}).get("reason") or {}).get("value")
        await sql(rate_answer, reply_id=int(meta["reply_id"]), platform=PLATFORM, user_external_id=body["user"]["id"],
                  value="bad", reason=reason, anonymize=intake.anonymize)
        note = texts.RATED_WITH_REASON if reason and reason.strip() else texts.RATED
        await refresh(client, channel=meta["channel"], ts=meta["ts"], reply_id=int(meta["reply_id"]),
                      rating_note=note.format(emoji="👎"))

    @app.action("escalate")
    async def on_escalate(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        reply_id, channel, ts, _ = where(body)

        def open_it(session) -> int | None:  # type: ignore[no-untyped-def]
            escalation = escalate_answer(session=session, reply_id=reply_id)
            return escalation.id if escalation else None

        await sql(lambda session: open_it(session))
        await refresh(client, channel=channel, ts=ts, reply_id=reply_id, rating_note=None)

    # --- /supportbot [help|escalate] ---------------------------------------------------------------

    @app.command(COMMAND)
    async def on_command(ack, command) -> None:  # type: ignore[no-untyped-def]
        word = (command.get("text") or "").strip().lower()
        if word != "escalate":
            await ack(text=texts.CHAT_HELP)
            return

        def escalate_latest(session) -> str:  # type: ignore[no-untyped-def]
            user = get_or_create_user(session=session, platform=PLATFORM, external_id=command["user_id"])
            conversation = latest_conversation(
                session=session, platform=PLATFORM, channel=command["channel_id"], user_id=user.id
            )
            escalation = escalate_conversation(session=session, conversation_id=conversation.id) if conversation else None
            return texts.ESCALATED.format(id=escalation.id) if escalation else texts.NOTHING_TO_ESCALATE

        await ack(text=await sql(lambda session: escalate_latest(session)))

    @app.error
    async def on_error(error, body) -> None:  # type: ignore[no-untyped-def]
        if isinstance(error, SupportbotError):
            log.warning("Slack request not handled: %s", error)
        else:
            log.exception("Slack request failed", exc_info=error)

    return app
