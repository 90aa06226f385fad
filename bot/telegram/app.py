"""The Telegram app (python-telegram-bot): commands, questions, the rating keyboard, the 👎 reason.

Conversations:
- a forum topic is a conversation ("topic<id>");
- a reply to one of the bot's answers continues that answer's conversation;
- in groups every other question starts its own conversation (thread = the question's message id),
  and the bot answers only when mentioned, replied to, or given a command;
- a private chat continues its latest conversation until it has been quiet for
  ``telegram_quiet_period_s`` or the person sends /new.
The message itself (chat and message id) is the idempotency key, so an edit, which arrives as a new
update of the same message, is never answered a second time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any

from bot.intake import Intake
from bot.telegram import render
from core import desk, texts
from core.conversations import (
    get_or_create_conversation,
    get_or_create_user,
    last_activity,
    latest_conversation,
    messages_with_ref,
    platform_thread,
)
from core.errors import BrokerUnavailable, ConfigError, SupportbotError
from core.feedback import escalate_answer, escalate_conversation, rate_answer
from core.roles import chat_help
from core.schema import Conversation, MessageRole
from core.settings import Settings
from core.types import Inbound

log = logging.getLogger(__name__)

PLATFORM = "telegram"
REASON_MARK = re.compile(r"answer #(\d+)\?")
TYPING_EVERY_S = 4.0  # Telegram shows "typing…" for five seconds per chat action
TYPING_FOR_S = 180.0


def strip_handle(text: str, username: str | None) -> str:
    """The bot's own @handle is not part of the question (and is no person to mask)."""
    if not username:
        return text
    return re.sub(rf"(?<!\w)@{re.escape(username)}\b", "", text, flags=re.IGNORECASE).strip()


def has_media(message) -> bool:  # type: ignore[no-untyped-def]
    return any(getattr(message, kind, None) for kind in (
        "photo", "sticker", "voice", "video", "video_note", "audio", "document", "animation"))


def build_application(*, settings: Settings, intake: Intake):  # type: ignore[no-untyped-def]
    from telegram import ForceReply, ReplyParameters, Update
    from telegram.constants import ChatAction
    from telegram.ext import (
        AIORateLimiter,
        Application,
        CallbackQueryHandler,
        CommandHandler,
        MessageHandler,
        filters,
    )

    if not settings.telegram_bot_token:
        raise ConfigError("SUPPORTBOT_TELEGRAM_BOT_TOKEN is required for Telegram")
    application = (
        Application.builder()
        .token(settings.telegram_bot_token.get_secret_value())
        .base_url(settings.telegram_api_url)
        .rate_limiter(AIORateLimiter(max_retries=settings.delivery_retries))
        .concurrent_updates(64)  # one slow question must not hold up the others
        .build()
    )
    db = intake.db
    # Admin commands in private chats and the report's Promote button (bot/telegram/admin.py), added
    # first so their callbacks are matched before the rating keyboard's.
    from bot.telegram import admin

    admin.register(application, settings=settings, db=db)
    only_new = filters.UpdateType.MESSAGE  # edited messages are never answered again

    def sql(fn):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            with db.session() as session:
                return fn(session)

        return asyncio.to_thread(run)

    def answer_conversation(session, chat_id: int, bot_message_id: int) -> Conversation | None:  # type: ignore[no-untyped-def]
        # A technician's message the bot relayed continues its conversation too (issue 12): a reply to
        # it is the employee's answer to the technician, not a new question.
        for role in (MessageRole.assistant, MessageRole.technician):
            found = messages_with_ref(session=session, platform=PLATFORM, channel=str(chat_id),
                                      ref=str(bot_message_id), key="sent_refs", role=role)
            if found:
                return found[0].conversation
        return None

    def replied_bot_message(message, bot_id: int) -> int | None:  # type: ignore[no-untyped-def]
        original = message.reply_to_message
        if original is not None and original.from_user is not None and original.from_user.id == bot_id:
            return int(original.message_id)
        return None

    def choose_thread(session, message, bot_id: int) -> str:  # type: ignore[no-untyped-def]
        if message.is_topic_message and message.message_thread_id:
            return f"topic{message.message_thread_id}"
        answered = replied_bot_message(message, bot_id)
        if answered is not None:
            conversation = answer_conversation(session, message.chat_id, answered)
            if conversation is not None:
                return platform_thread(conversation.thread)
        if message.chat.type != "private":
            return str(message.message_id)
        user = get_or_create_user(session=session, platform=PLATFORM, external_id=str(message.from_user.id))
        latest = latest_conversation(session=session, platform=PLATFORM, channel=str(message.chat_id), user_id=user.id)
        if latest is not None:
            quiet = (datetime.now(timezone.utc) - last_activity(session=session, conversation=latest)).total_seconds()
            if quiet < settings.telegram_quiet_period_s:
                return platform_thread(latest.thread)
        return str(message.message_id)

    async def keep_typing(bot, chat_id: int, topic: int | None, message_id: int) -> None:  # type: ignore[no-untyped-def]
        from core.conversations import answer_for

        deadline = time.monotonic() + TYPING_FOR_S
        while time.monotonic() < deadline:
            if await sql(lambda s: answer_for(session=s, message_id=message_id)) is not None:
                return
            try:
                await bot.send_chat_action(chat_id=chat_id, action=ChatAction.TYPING, message_thread_id=topic)
            except Exception as err:  # typing is a courtesy; the answer comes regardless
                log.debug("typing action failed: %s", err)
            await asyncio.sleep(TYPING_EVERY_S)

    async def on_message(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        message = update.message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        bot = context.bot
        raw = message.text or message.caption or ""
        text = strip_handle(raw, bot.username)
        replied = replied_bot_message(message, bot.id)
        if replied is not None and await on_desk_reply(message, context, text):
            return  # a technician's reply on the desk: relayed, noted or a resolution, never a question
        if replied is not None and await on_reason(message, text):
            return
        if message.chat.type != "private":
            mentioned = bool(bot.username) and f"@{bot.username}".lower() in raw.lower()
            if not mentioned and replied is None:
                return  # group chatter not addressed to the bot
        if not text.strip():
            if has_media(message):
                await message.reply_text(texts.NOT_TEXT, do_quote=True)
            return  # service messages (joins, pins) have neither text nor media
        thread = await sql(lambda s: choose_thread(s, message, bot.id))
        if message.chat.type != "private" and await sql(
            lambda s: technician_in_escalation(s, str(message.chat_id), thread, str(message.from_user.id))
        ):
            return  # a technician writing in an employee's escalated conversation: not a question
        inbound = Inbound(
            platform=PLATFORM,
            channel=str(message.chat_id),
            thread=thread,
            user_external_id=str(message.from_user.id),
            text=text,
            event_id=f"{message.chat_id}:{message.message_id}",
            message_ref=str(message.message_id),
        )
        topic = render.topic_of(thread)
        try:
            await bot.send_chat_action(chat_id=message.chat_id, action=ChatAction.TYPING, message_thread_id=topic)
        except Exception as err:
            log.debug("typing action failed: %s", err)
        try:
            receipt = await asyncio.to_thread(intake.receive, inbound)
        except BrokerUnavailable:
            await message.reply_text(texts.DELAYED, do_quote=True)
            return
        if receipt.duplicate:
            return
        if receipt.immediate_reply:
            await message.reply_text(receipt.immediate_reply, do_quote=True)
            return
        if await sql(lambda s: desk.is_open(session=s, conversation_id=receipt.conversation_id)):
            return  # with the technicians: the worker relays it to the desk; no answer is coming
        context.application.create_task(keep_typing(bot, message.chat_id, topic, receipt.message_id))

    async def on_reason(message, text: str) -> bool:  # type: ignore[no-untyped-def]
        """A reply to the bot's "what was wrong?" prompt is the reason of a 👎."""
        match = REASON_MARK.search(message.reply_to_message.text or "")
        if match is None:
            return False
        if text.strip():
            await sql(lambda s: rate_answer(session=s, reply_id=int(match.group(1)), platform=PLATFORM,
                                            user_external_id=str(message.from_user.id), value="bad", reason=text,
                                            anonymize=intake.anonymize))
        await message.reply_text(texts.REASON_THANKS, do_quote=True)
        return True

    async def on_callback(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        query = update.callback_query
        on_desk = render.parse_desk_callback(query.data or "")
        if on_desk is not None:
            await on_desk_button(query, context, *on_desk)
            return
        parsed = render.parse_callback(query.data or "")
        if parsed is None:
            await query.answer()  # every press is answered, or the button spins on the phone
            return
        action, reply_id = parsed
        user = str(query.from_user.id)
        try:
            if action == "esc":
                escalation = await sql(lambda s: escalate_answer(session=s, reply_id=reply_id))
                note = texts.ESCALATED.format(id=escalation.id) if escalation else texts.NOTHING_TO_ESCALATE
                if escalation is not None:
                    await to_desk(escalation.id)
                await query.answer(note[:200])
                if query.message is not None:
                    await context.bot.send_message(chat_id=query.message.chat.id, text=note,
                                                   reply_parameters=ReplyParameters(query.message.message_id, allow_sending_without_reply=True))
                return
            value = "good" if action == "good" else "bad"
            await sql(lambda s: rate_answer(session=s, reply_id=reply_id, platform=PLATFORM, user_external_id=user, value=value))
            await query.answer(texts.RATED.format(emoji="👍" if value == "good" else "👎"))
            if value == "bad" and query.message is not None:
                await context.bot.send_message(
                    chat_id=query.message.chat.id,
                    text=texts.BAD_REASON_PROMPT.format(id=reply_id),
                    reply_parameters=ReplyParameters(query.message.message_id, allow_sending_without_reply=True),
                    reply_markup=ForceReply(selective=True, input_field_placeholder="optional"),
                )
        except SupportbotError as err:
            await query.answer(str(err)[:200])

    async def on_start(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        await update.message.reply_text(texts.CHAT_START, do_quote=True)

    async def on_help(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        user = str(update.message.from_user.id) if update.message.from_user else ""
        text = await sql(lambda s: chat_help(session=s, platform=PLATFORM, external_id=user, settings=settings))
        await update.message.reply_text(text, do_quote=True)

    async def on_new(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        message = update.message
        if message.chat.type != "private":
            await message.reply_text(texts.GROUP_NEW, do_quote=True)
            return

        def start(session) -> None:  # type: ignore[no-untyped-def]
            user = get_or_create_user(session=session, platform=PLATFORM, external_id=str(message.from_user.id))
            get_or_create_conversation(session=session, platform=PLATFORM, channel=str(message.chat_id),
                                       thread=str(message.message_id), user_id=user.id)

        await sql(start)
        await message.reply_text(texts.NEW_CONVERSATION, do_quote=True)

    async def on_escalate(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        message = update.message
        replied = replied_bot_message(message, context.bot.id)

        def escalate(session) -> str:  # type: ignore[no-untyped-def]
            conversation = answer_conversation(session, message.chat_id, replied) if replied else None
            if conversation is None:
                user = get_or_create_user(session=session, platform=PLATFORM, external_id=str(message.from_user.id))
                conversation = latest_conversation(session=session, platform=PLATFORM, channel=str(message.chat_id),
                                                   user_id=user.id)
            escalation = escalate_conversation(session=session, conversation_id=conversation.id) if conversation else None
            escalated.append(escalation.id if escalation else None)
            return texts.ESCALATED.format(id=escalation.id) if escalation else texts.NOTHING_TO_ESCALATE

        escalated: list[int | None] = []
        await message.reply_text(await sql(escalate), do_quote=True)
        if escalated and escalated[0] is not None:
            await to_desk(escalated[0])

    # --- the desk (issue 12): replies to desk messages, Claim, Resolve, /resolve ---------------------
    # The card is posted by a worker (workers/desk_tasks.py); every desk message names its escalation
    # ("escalation #N"), and a technician's reply to one of them is matched back by that mark.

    async def to_desk(escalation_id: int) -> None:
        """Queue the escalation's summary; the worker posts the desk card first, then updates it."""
        from workers.desk_tasks import enqueue_summary

        try:
            await asyncio.to_thread(enqueue_summary, escalation_id)
        except Exception as err:  # stored either way; the CLI and web desk list it
            log.error("escalation %s not queued for the desk: %s", escalation_id, err)

    def on_the_desk(chat_id: int) -> bool:
        return bool(settings.telegram_desk_chat) and str(chat_id) == str(settings.telegram_desk_chat)

    def permit(session, user: str, action: str, escalation_id: int) -> None:  # type: ignore[no-untyped-def]
        """Technicians only (core/roles.py): raises PermissionDenied saying why; audited either way."""
        from core.roles import ACTIONS, authorize

        name = f"escalations.{action}" if f"escalations.{action}" in ACTIONS else "escalations.view"
        authorize(session=session, actor=f"{PLATFORM}:{user}", action=name, settings=settings,
                  detail=f"{action} escalation #{escalation_id}")

    def technician_in_escalation(session, chat: str, thread: str, user: str) -> bool:  # type: ignore[no-untyped-def]
        escalation = desk.escalated_in_thread(session=session, platform=PLATFORM, channel=chat, thread=thread)
        if escalation is None:
            return False
        sender = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
        return sender.id != desk.escalation_conversation(escalation).user_id and desk.is_technician(
            session=session, settings=settings, user_id=sender.id)

    def remember_sent(session, message_id: int, ref: str) -> None:  # type: ignore[no-untyped-def]
        from core.schema import Message

        row = session.get(Message, message_id)
        if row is not None:
            row.meta = {**(row.meta or {}), "sent_refs": [*(row.meta or {}).get("sent_refs", []), ref]}

    async def to_employee(bot, posts) -> None:  # type: ignore[no-untyped-def]
        for item in posts:
            thread = platform_thread(item.thread or "")
            sent = await bot.send_message(
                chat_id=int(item.channel), text=item.text, message_thread_id=render.topic_of(thread),
                reply_parameters=ReplyParameters(int(thread), allow_sending_without_reply=True) if thread.isdigit() else None,
            )
            if item.message_id is not None:  # a reply to the relayed message continues the conversation
                await sql(lambda s, row=item.message_id, ref=str(sent.message_id): remember_sent(s, row, ref))

    async def show_card(bot, escalation_id: int) -> None:  # type: ignore[no-untyped-def]
        found = await sql(lambda session: desk.posted_card(session=session, escalation_id=escalation_id))
        if found is None:
            return
        channel, ref, card = found
        try:
            await bot.edit_message_text(chat_id=int(channel), message_id=int(ref), text=render.desk_text(card),
                                        parse_mode=render.PARSE_MODE, reply_markup=render.desk_keyboard(card))
        except Exception as err:  # "message is not modified" and the like: the card stays as it was
            log.info("desk card of escalation %s not updated: %s", escalation_id, err)

    async def resolve_with(message, escalation_id: int, fix: str) -> None:  # type: ignore[no-untyped-def]
        user = str(message.from_user.id)
        if not fix.strip():
            await message.reply_text(texts.DESK_EMPTY_RESOLUTION, do_quote=True)
            return
        try:
            await sql(lambda s: permit(s, user, "resolve", escalation_id))
        except SupportbotError as err:
            await message.reply_text(str(err), do_quote=True)
            return
        from workers.desk_tasks import enqueue_resolve

        # On a worker: the fix becomes a ticket in the index the answers search (this process has none).
        try:
            await asyncio.to_thread(enqueue_resolve, escalation_id=escalation_id, technician=f"{PLATFORM}:{user}",
                                    text=fix.strip())
        except Exception as err:
            await message.reply_text(texts.DESK_NOT_RELAYED.format(id=escalation_id, error=err), do_quote=True)
            return
        await message.reply_text(texts.DESK_RESOLVING.format(id=escalation_id), do_quote=True)

    async def on_desk_reply(message, context, text: str) -> bool:  # type: ignore[no-untyped-def]
        """In the desk chat, a reply to one of the bot's desk messages: a resolution (to the Resolve
        prompt) or a message for the employee (a "note:" stays on the desk). True when handled."""
        if not on_the_desk(message.chat_id):
            return False
        original = message.reply_to_message.text or ""
        prompt = render.RESOLVE_MARK.search(original)
        if prompt is not None:
            await resolve_with(message, int(prompt.group(1)), text)
            return True
        mark = render.ESCALATION_MARK.search(original)
        if mark is None:
            return False
        escalation_id, user = int(mark.group(1)), str(message.from_user.id)
        if not text.strip():
            return True

        def relay(session):  # type: ignore[no-untyped-def]
            sender = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
            return desk.relay(session=session, settings=settings, escalation_id=escalation_id, sender_id=sender.id,
                              text=text, anonymize=intake.anonymize,
                              key=f"{PLATFORM}:desk:{message.chat_id}:{message.message_id}")

        try:
            relayed = await sql(relay)
        except SupportbotError as err:
            await message.reply_text(texts.DESK_NOT_RELAYED.format(id=escalation_id, error=err), do_quote=True)
            return True
        if relayed is not None and relayed.to == "employee":
            await to_employee(context.bot, [relayed])
        return True

    async def on_resolve_command(update: Update, context) -> None:  # type: ignore[no-untyped-def]
        """/resolve <fix>, as a reply to an escalation's message on the desk."""
        message = update.message
        replied = replied_bot_message(message, context.bot.id)
        mark = render.ESCALATION_MARK.search(message.reply_to_message.text or "") if replied is not None else None
        if not on_the_desk(message.chat_id) or mark is None:
            await message.reply_text(texts.DESK_RESOLVE_USAGE, do_quote=True)
            return
        fix = " ".join(context.args or [])
        await resolve_with(message, int(mark.group(1)), fix)

    async def on_desk_button(query, context, action: str, escalation_id: int) -> None:  # type: ignore[no-untyped-def]
        user = str(query.from_user.id)
        try:
            await sql(lambda s: permit(s, user, action, escalation_id))
            if action == "claim":
                def claim(session):  # type: ignore[no-untyped-def]
                    technician = get_or_create_user(session=session, platform=PLATFORM, external_id=user)
                    return desk.claim(session=session, settings=settings, escalation_id=escalation_id,
                                      technician_id=technician.id)[1]

                posts = await sql(claim)
        except SupportbotError as err:
            await query.answer(str(err)[:200], show_alert=True)  # refused: the technician-only reason
            return
        if action == "claim":
            await query.answer(texts.DESK_CLAIMED_DESK.format(id=escalation_id, who=f"{PLATFORM}:{user}")[:200])
            await to_employee(context.bot, posts)
            await show_card(context.bot, escalation_id)
            return
        await query.answer()
        if query.message is not None:  # the guided resolution: the technician replies to this prompt
            await context.bot.send_message(
                chat_id=query.message.chat.id, text=texts.DESK_RESOLVE_PROMPT.format(id=escalation_id),
                reply_parameters=ReplyParameters(query.message.message_id, allow_sending_without_reply=True),
                reply_markup=ForceReply(selective=True, input_field_placeholder="what fixed it"),
            )

    async def on_error(update: Any, context) -> None:  # type: ignore[no-untyped-def]
        log.error("Telegram update not handled: %s", context.error, exc_info=context.error)

    # CommandHandler also takes "/cmd@thisbot" and ignores "/cmd@otherbot".
    for name, handler in (("start", on_start), ("help", on_help), ("new", on_new), ("escalate", on_escalate),
                          ("resolve", on_resolve_command)):
        application.add_handler(CommandHandler(name, handler, filters=only_new))
    application.add_handler(CallbackQueryHandler(on_callback))
    application.add_handler(MessageHandler(only_new & ~filters.COMMAND, on_message))
    application.add_error_handler(on_error)
    return application


def serve(*, settings: Settings, intake: Intake) -> None:
    """`supportbot telegram`: a webhook when SUPPORTBOT_TELEGRAM_WEBHOOK_URL is set, else long polling."""
    from telegram import Update

    application = build_application(settings=settings, intake=intake)
    if settings.telegram_webhook_url:
        if not settings.telegram_webhook_secret:
            raise ConfigError("SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET is required with SUPPORTBOT_TELEGRAM_WEBHOOK_URL")
        from urllib.parse import urlparse

        # Requests without the right X-Telegram-Bot-Api-Secret-Token header get 403 from PTB's server.
        application.run_webhook(
            listen=settings.telegram_webhook_listen,
            port=settings.telegram_webhook_port,
            url_path=urlparse(settings.telegram_webhook_url).path.lstrip("/"),
            webhook_url=settings.telegram_webhook_url,
            secret_token=settings.telegram_webhook_secret.get_secret_value(),
            allowed_updates=Update.ALL_TYPES,
        )
    else:
        application.run_polling(allowed_updates=Update.ALL_TYPES, poll_interval=0.0, timeout=10)
