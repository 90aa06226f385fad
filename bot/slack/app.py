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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bot.intake import Intake
from bot.outbound import load_reply
from bot.slack import render
from bot.slack.inbound import PLATFORM, decide, deleted_ref, mention_pattern, thread_of, to_inbound
from core import desk, texts
from core.conversations import (
    attach_placeholder,
    conversation_exists,
    delivered_without_placeholder,
    find_by_idempotency_key,
    forget_message,
    get_or_create_user,
    latest_conversation,
    platform_thread,
)
from core.errors import BrokerUnavailable, ConfigError, SupportbotError
from core.feedback import escalate_answer, escalate_conversation, rate_answer
from core.roles import chat_help
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


def _stored_or_with_desk(*, session, key: str, channel: str, thread: str) -> bool:  # type: ignore[no-untyped-def]
    if find_by_idempotency_key(session=session, key=key) is not None:
        return True
    return desk.escalated_in_thread(session=session, platform=PLATFORM, channel=channel, thread=thread) is not None


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
    # Admin commands and buttons (retrain, promote, roll back, App Home) first: Bolt runs the first
    # matching /supportbot listener, and the one below keeps every other word.
    from bot.slack import admin

    admin.register(app, settings=settings, db=db)

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

    taking: set[str] = set()  # events being stored right now (this process handles them all)
    # Intake (anonymize, store, enqueue) gets threads of its own: on asyncio's default pool, 16 questions
    # at once took every thread, and the quick SQL reads before each "Working on it" queued behind them.
    intake_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="intake")

    async def _instead(client, channel: str, thread: str, early, text: str | None) -> None:  # type: ignore[no-untyped-def]
        """Say ``text`` (or nothing) where the early placeholder would have stood."""
        placeholder = await early if early is not None else None
        if placeholder is None:
            if text:
                await post(client, channel, thread, text)
            return
        try:
            if text:
                await client.chat_update(channel=channel, ts=placeholder, text=text)
            else:
                await client.chat_delete(channel=channel, ts=placeholder)
        except Exception as err:  # a stale "working on it" is harmless; the question is stored either way
            log.warning("could not replace the placeholder in %s: %s", channel, err)

    async def take(event: dict[str, Any], client, bot_user_id: str | None, *, via_mention: bool) -> None:  # type: ignore[no-untyped-def]
        if await desk_message(event, client, bot_user_id, via_mention=via_mention):
            return  # the desk's: relayed or noted, never answered as a question
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
        # The first visible response, within a second, goes out while the text is anonymized and stored:
        # questions that arrive together queue for the one anonymizer, and waiting for it put the
        # placeholder at p95 3.4 s with 16 at once (python -m bench.channels). Not for a platform retry
        # of a stored question, nor in a thread that is with the technicians (no "working on it" there).
        key = f"{PLATFORM}:{inbound.event_id}"
        early = None
        if key not in taking and not await sql(_stored_or_with_desk, key=key, channel=channel,
                                                thread=platform_thread(thread)):  # fmt: skip
            early = asyncio.create_task(post(client, channel, thread, texts.WORKING_ON_IT))
        taking.add(key)  # a retry that arrives while this one is stored shows nothing of its own
        try:
            receipt = await asyncio.get_running_loop().run_in_executor(intake_pool, intake.receive, inbound)
        except BrokerUnavailable:
            await _instead(client, channel, thread, early, texts.DELAYED)
            return
        finally:
            taking.discard(key)
        if receipt.duplicate:
            await _instead(client, channel, thread, early, None)
            return
        if receipt.immediate_reply:
            await _instead(client, channel, thread, early, receipt.immediate_reply)
            return
        if await sql(desk.is_open, conversation_id=receipt.conversation_id):
            await _instead(client, channel, thread, early, None)
            return  # with the technicians: the worker relays it to the desk; no "working on it"
        # The worker replaces the placeholder with the answer.
        placeholder = await early if early is not None else None
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

        escalation_id = await sql(lambda session: open_it(session))
        await refresh(client, channel=channel, ts=ts, reply_id=reply_id, rating_note=None)
        if escalation_id is not None:
            await to_desk(escalation_id)

    # --- the desk (issue 12): desk-thread replies, Claim, Resolve and its modal ------------------------
    # The card itself is posted by a worker (workers/desk_tasks.py) once the escalation is queued there;
    # this process relays what technicians write and answers their buttons.

    async def to_desk(escalation_id: int) -> None:
        """Queue the escalation's summary; the worker posts the desk card first, then updates it."""
        from workers.desk_tasks import enqueue_summary

        try:
            await asyncio.to_thread(enqueue_summary, escalation_id)
        except Exception as err:  # stored either way; the CLI and web desk list it
            log.error("escalation %s not queued for the desk: %s", escalation_id, err)

    async def ephemeral(client, channel: str, user: str, text: str, thread: str | None = None) -> None:  # type: ignore[no-untyped-def]
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=render.escape(text), thread_ts=thread)
        except Exception as err:
            log.warning("could not tell %s: %s", user, err)

    async def to_employee(client, posts) -> None:  # type: ignore[no-untyped-def]
        for item in posts:
            await post(client, item.channel, platform_thread(item.thread or ""), render.escape(item.text))

    async def show_card(client, escalation_id: int) -> None:  # type: ignore[no-untyped-def]
        """Redraw the desk card (claimed, resolved) where it was posted."""
        found = await sql(desk.posted_card, escalation_id=escalation_id)
        if found is None:
            return
        channel, ref, card = found
        link = None
        try:
            link = (await client.chat_getPermalink(channel=card.employee_channel, message_ts=card.employee_thread)).get("permalink")
        except Exception as err:
            log.info("no permalink for escalation %s: %s", escalation_id, err)
        try:
            await client.chat_update(channel=channel, ts=ref, text=render.desk_text(card, link=link),
                                     blocks=render.desk_blocks(card, link=link))
        except Exception as err:
            log.warning("desk card of escalation %s not updated: %s", escalation_id, err)

    def permit(session, user: str, action: str, escalation_id: int) -> None:  # type: ignore[no-untyped-def]
        """Technicians only (core/roles.py): raises PermissionDenied saying why; audited either way. Its
        own read-only step: the audit row is written in its own transaction (SQLite has one writer)."""
        from core.roles import ACTIONS, authorize

        name = f"escalations.{action}" if f"escalations.{action}" in ACTIONS else "escalations.view"
        authorize(session=session, actor=f"{PLATFORM}:{user}", action=name, settings=settings,
                  detail=f"{action} escalation #{escalation_id}")

    def classify(session, channel: str, thread: str, user: str):  # type: ignore[no-untyped-def]
        """("desk", id) for a desk thread; ("watching", id) for a technician in someone's escalated thread."""
        at = desk.at_desk(session=session, platform=PLATFORM, channel=channel, thread=thread)
        if at is not None:
            return "desk", at.id
        escalation = desk.escalated_in_thread(session=session, platform=PLATFORM, channel=channel, thread=thread)
        if escalation is None or not user:
            return None
        sender = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
        owner = desk.escalation_conversation(escalation).user_id
        if sender.id != owner and desk.is_technician(session=session, settings=settings, user_id=sender.id):
            return "watching", escalation.id
        return None

    async def desk_message(event: dict[str, Any], client, bot_user_id: str | None, *, via_mention: bool) -> bool:  # type: ignore[no-untyped-def]
        """A message in a desk thread is relayed (or kept as a note); a technician writing in an employee's
        escalated thread is left alone. True when the message was the desk's."""
        thread, ts = str(event.get("thread_ts") or ""), str(event.get("ts") or "")
        channel, user = str(event.get("channel", "")), str(event.get("user") or "")
        if not thread or thread == ts or event.get("subtype") == "message_deleted":
            return False
        found = await sql(lambda session: classify(session, channel, thread, user))
        if found is None:
            return False
        kind, escalation_id = found
        if kind == "watching":
            log.info("technician %s wrote in escalated thread %s: not a question", user, thread)
            return True
        mine = not event.get("bot_id") and user and user != bot_user_id and event.get("subtype") in (None, "thread_broadcast")
        if via_mention or not mine:
            return True  # Slack sends a mention as both events: the message event relays it once
        text = mention_pattern(bot_user_id).sub("", str(event.get("text") or "")).strip()
        if not text:
            return True

        def relay(session):  # type: ignore[no-untyped-def]
            sender = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
            return desk.relay(session=session, settings=settings, escalation_id=escalation_id, sender_id=sender.id,
                              text=text, anonymize=intake.anonymize, key=f"{PLATFORM}:desk:{channel}:{ts}")

        try:
            relayed = await sql(relay)
        except SupportbotError as err:
            await ephemeral(client, channel, user, texts.DESK_NOT_RELAYED.format(id=escalation_id, error=err), thread)
            return True
        if relayed is not None and relayed.to == "employee":
            await to_employee(client, [relayed])
        return True

    @app.action("claim")
    async def on_claim(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        escalation_id, channel, ts, user = where(body)

        def claim(session):  # type: ignore[no-untyped-def]
            technician = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
            _escalation, posts = desk.claim(session=session, settings=settings, escalation_id=escalation_id,
                                            technician_id=technician.id)
            return posts

        try:
            await sql(lambda session: permit(session, user, "claim", escalation_id))
            posts = await sql(claim)
        except SupportbotError as err:
            await ephemeral(client, channel, user, str(err))
            return
        await to_employee(client, posts)
        await show_card(client, escalation_id)
        if posts:  # a first claim, not the same technician pressing twice
            await post(client, channel, ts, render.escape(texts.DESK_CLAIMED_DESK.format(id=escalation_id, who=f"{PLATFORM}:{user}")))

    @app.action("resolve")
    async def on_resolve(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await ack()
        escalation_id, channel, ts, user = where(body)
        try:
            await sql(lambda session: permit(session, user, "resolve", escalation_id))
        except SupportbotError as err:
            await ephemeral(client, channel, user, str(err))
            return
        await client.views_open(trigger_id=body["trigger_id"],
                                view=render.resolve_modal(escalation_id=escalation_id, channel=channel, ts=ts))

    @app.view(render.RESOLVE_VIEW)
    async def on_resolution(ack, body, view, client) -> None:  # type: ignore[no-untyped-def]
        meta = json.loads(view.get("private_metadata") or "{}")
        values = render.modal_values(view)
        errors = {}
        if not values.get("resolution", "").strip():
            errors["resolution"] = texts.DESK_EMPTY_RESOLUTION
        try:
            hours = desk.clean_hours(values.get("hours", "").strip() or None)
        except SupportbotError as err:
            errors["hours"] = str(err)
        if errors:  # said in the form, which stays open: nothing typed is lost
            await ack(response_action="errors", errors=errors)
            return
        await ack()
        user, escalation_id = body["user"]["id"], int(meta["escalation_id"])
        try:
            await sql(lambda session: permit(session, user, "resolve", escalation_id))
        except SupportbotError as err:
            await ephemeral(client, meta.get("channel", ""), user, str(err))
            return
        from workers.desk_tasks import enqueue_resolve

        # On a worker: the fix becomes a ticket in the index the answers search (this process has none).
        try:
            await asyncio.to_thread(enqueue_resolve, escalation_id=escalation_id, technician=f"{PLATFORM}:{user}",
                                    text=values["resolution"], hours=hours,
                                    machine=values.get("machine", "").strip() or None)
        except Exception as err:
            await ephemeral(client, meta.get("channel", ""), user, texts.DESK_NOT_RELAYED.format(id=escalation_id, error=err))
            return
        await post(client, meta.get("channel", ""), meta.get("ts", ""), texts.DESK_RESOLVING.format(id=escalation_id))

    # --- /supportbot [help|escalate] ---------------------------------------------------------------

    @app.command(COMMAND)
    async def on_command(ack, command) -> None:  # type: ignore[no-untyped-def]
        word = (command.get("text") or "").strip().lower()
        if word != "escalate":
            await ack(text=await sql(chat_help, platform=PLATFORM, external_id=command.get("user_id", ""),
                                     settings=settings))  # fmt: skip
            return

        def escalate_latest(session) -> str:  # type: ignore[no-untyped-def]
            user = get_or_create_user(session=session, platform=PLATFORM, external_id=command["user_id"])
            conversation = latest_conversation(
                session=session, platform=PLATFORM, channel=command["channel_id"], user_id=user.id
            )
            escalation = escalate_conversation(session=session, conversation_id=conversation.id) if conversation else None
            escalated.append(escalation.id if escalation else None)
            return texts.ESCALATED.format(id=escalation.id) if escalation else texts.NOTHING_TO_ESCALATE

        escalated: list[int | None] = []
        await ack(text=await sql(lambda session: escalate_latest(session)))
        if escalated and escalated[0] is not None:
            await to_desk(escalated[0])

    @app.error
    async def on_error(error, body) -> None:  # type: ignore[no-untyped-def]
        if isinstance(error, SupportbotError):
            log.warning("Slack request not handled: %s", error)
        else:
            log.exception("Slack request failed", exc_info=error)

    return app
