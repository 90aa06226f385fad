"""The outbound port: replies go back to the platform a question came from. One adapter per platform.

The worker hands a ``core.types.Reply`` (content, not layout) to ``outbound_for(platform)``; each
platform package renders it (Block Kit, Telegram HTML) and posts it with one long-lived client per
process, retrying what is transient and honouring Retry-After. Vendor errors become ``DeliveryError``
here; no chat SDK type crosses this port, and workers import no chat SDK.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Protocol

from core import texts
from core.conversations import platform_thread
from core.errors import ConfigError, SupportbotError
from core.settings import Settings
from core.types import ConversationRef, Delivered, Reply

log = logging.getLogger(__name__)

PLATFORMS = ("slack", "telegram")


class DeliveryError(SupportbotError):
    """The platform did not take the reply (network, rate limit, revoked token)."""


class Outbound(Protocol):
    def deliver(self, reply: Reply) -> Delivered:
        """Post (or, over a placeholder, update to) the reply; returns the platform's message ids."""
        ...

    def discard(self, *, channel: str, ref: str) -> None:
        """Remove a message the bot posted (a placeholder that lost a race with the answer)."""
        ...

    def send(self, *, channel: str, thread: str, text: str, reply_to: str | None = None) -> None:
        """A plain notice in a thread (the sweeper's "still working on it")."""
        ...


class NoticeMixin:
    """``send`` for notices, in terms of ``deliver``: one code path posts everything."""

    def deliver(self, reply: Reply) -> Delivered:  # pragma: no cover - provided by the adapter
        raise NotImplementedError

    def send(self, *, channel: str, thread: str, text: str, reply_to: str | None = None) -> None:
        platform = getattr(self, "platform", "")
        ref = ConversationRef(platform=platform, channel=channel, thread=platform_thread(thread), reply_to=reply_to)
        self.deliver(Reply(text=text, conversation=ref, kind="notice"))


_SOURCES_PREFIX = texts.SOURCES.split("{", 1)[0]
_FIX_TIME_PREFIX = texts.FIX_TIME.split("{", 1)[0]


def answer_body(text: str) -> str:
    """A stored answer without its sources and fix-time paragraphs: those are rendered from fields."""
    kept = [p for p in text.split("\n\n") if not p.startswith((_SOURCES_PREFIX, _FIX_TIME_PREFIX))]
    return "\n\n".join(kept).strip() or text.strip()


_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")


def split_text(text: str, limit: int, measure=len) -> list[str]:  # type: ignore[no-untyped-def]
    """Cut ``text`` into pieces of at most ``limit`` (as ``measure`` counts), at sentence ends where
    possible, then at spaces, and only inside a word when a single word is longer than the limit."""
    if measure(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    for sentence in _units(text, _SENTENCE_END):
        for unit in [sentence] if measure(sentence) <= limit else _hard_split(sentence, limit, measure):
            candidate = current + unit
            if current and measure(candidate.rstrip()) > limit:
                pieces.append(current.rstrip())
                current = unit.lstrip()
            else:
                current = candidate
    if current.strip():
        pieces.append(current.rstrip())
    return [p for p in pieces if p.strip()]


def _units(text: str, separator: re.Pattern[str]) -> list[str]:
    """``text`` in pieces that end with their separator, so joining them gives ``text`` back."""
    units, start = [], 0
    for match in separator.finditer(text):
        units.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        units.append(text[start:])
    return units


def _hard_split(text: str, limit: int, measure) -> list[str]:  # type: ignore[no-untyped-def]
    out: list[str] = []
    current = ""
    for word in _units(text, re.compile(r"\s+")):
        while measure(word) > limit:  # one word longer than a message: cut it by characters
            low, high = 1, len(word)  # the longest prefix that fits, by bisection
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if measure(word[:middle]) <= limit else (low, middle - 1)
            if current:
                out.append(current)
                current = ""
            out.append(word[:low])
            word = word[low:]
        if current and measure(current + word) > limit:
            out.append(current)
            current = word
        else:
            current += word
    if current:
        out.append(current)
    return out


def load_reply(session, reply_id: int) -> Reply | None:  # type: ignore[no-untyped-def]
    """A stored assistant reply as the port's ``Reply``: body, cited tickets with titles, fix time,
    the platform place to post it and the "working on it" placeholder it replaces, if any."""
    from core.schema import Message, MessageRole, Ticket

    reply = session.get(Message, reply_id)
    if reply is None or reply.role != MessageRole.assistant:
        return None
    conversation = reply.conversation
    question = session.get(Message, reply.reply_to_id) if reply.reply_to_id else None
    question_meta = (question.meta or {}) if question is not None else {}
    sources = []
    for ticket_id in reply.sources or []:
        ticket = session.get(Ticket, ticket_id)
        sources.append((str(ticket_id), ticket.title if ticket is not None else ""))
    return Reply(
        text=answer_body(reply.text),
        conversation=ConversationRef(
            platform=conversation.platform,
            channel=conversation.channel,
            thread=platform_thread(conversation.thread),
            reply_to=question_meta.get("ref"),
        ),
        message_id=reply.id,
        sources=tuple(sources),
        estimated_hours=reply.estimated_hours,
        placeholder=question_meta.get("placeholder"),
    )


_clients: dict[tuple[str, str, str], Outbound] = {}
_clients_lock = threading.Lock()


def outbound_for(platform: str, settings: Settings) -> Outbound | None:
    """The process's one sender for a platform (built on first use, then reused for every reply);
    None where the channel reads replies itself (console) or the platform has no token here."""
    if platform == "slack" and settings.slack_bot_token:
        token, url = settings.slack_bot_token.get_secret_value(), settings.slack_api_url
    elif platform == "telegram" and settings.telegram_bot_token:
        token, url = settings.telegram_bot_token.get_secret_value(), settings.telegram_api_url
    else:
        return None
    key = (platform, token, url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if platform == "slack":
                from bot.slack.outbound import SlackOutbound

                client = SlackOutbound(token=token, base_url=url, retries=settings.delivery_retries)
            else:
                from bot.telegram.outbound import TelegramOutbound

                client = TelegramOutbound(token=token, base_url=url, retries=settings.delivery_retries)
            _clients[key] = client
        return client


def require_delivery(*, settings: Settings, db=None) -> None:  # type: ignore[no-untyped-def]
    """Fail loudly at a worker's start when it could not deliver the replies of a platform in use.

    In use: listed in ``chat_platforms``, or with conversations in the database (an adapter ran)."""
    wanted = {p for p in settings.chat_platforms}
    if db is not None:
        from sqlalchemy import select

        from core.schema import Conversation

        with db.session() as session:
            wanted |= set(session.scalars(select(Conversation.platform).distinct()))
    unknown = {p for p in settings.chat_platforms if p not in PLATFORMS}
    if unknown:
        raise ConfigError(f"unknown chat platform(s) in chat_platforms: {', '.join(sorted(unknown))}")
    tokens = {"slack": settings.slack_bot_token, "telegram": settings.telegram_bot_token}
    missing = sorted(p for p in wanted if p in PLATFORMS and not tokens[p])
    if missing:
        raise ConfigError(
            "this worker could not deliver replies to "
            + ", ".join(missing)
            + ": set "
            + ", ".join(f"SUPPORTBOT_{p.upper()}_BOT_TOKEN" for p in missing)
            + " for the workers too, not only for the adapter"
        )


_thread_locks: dict[int, threading.Lock] = {}


def _conversation_lock(conversation_id: int) -> threading.Lock:
    with _clients_lock:
        return _thread_locks.setdefault(conversation_id, threading.Lock())


def _earlier_reply_pending(session, reply) -> bool:  # type: ignore[no-untyped-def]
    """Whether an earlier question of the same conversation still waits for its answer to be posted."""
    from datetime import timedelta

    from sqlalchemy import select

    from core.schema import Message, MessageRole, MessageStatus, utcnow

    recent = utcnow() - timedelta(minutes=10)  # an older straggler is the sweeper's business, not ours
    unanswered = session.scalar(
        select(Message.id).where(
            Message.conversation_id == reply.conversation_id,
            Message.role == MessageRole.user,
            Message.id < reply.reply_to_id,
            Message.status.in_([MessageStatus.received, MessageStatus.queued, MessageStatus.answering]),
            Message.created_at >= recent,
        ).limit(1)
    )
    if unanswered is not None:
        return True
    unposted = session.scalar(
        select(Message.id).where(
            Message.conversation_id == reply.conversation_id,
            Message.role == MessageRole.assistant,
            Message.reply_to_id < reply.reply_to_id,
            Message.status == MessageStatus.answered,
            Message.model_version != "supportbot-rules",  # the intake's own replies are posted by the adapter
            Message.created_at >= recent,
        ).limit(1)
    )
    return unposted is not None


def deliver_stored(*, db, settings: Settings, reply_id: int) -> bool:  # type: ignore[no-untyped-def]
    """Post a stored reply to its platform (the worker's side of the port). Returns whether it was posted.

    Replies of one conversation go out in question order: a reply waits (up to
    ``delivery_order_wait_s``) while an earlier question of its thread is still being answered. The
    posted message ids are kept on the reply (Telegram replies to them continue the conversation)."""
    import time

    from core.conversations import delivered_without_placeholder
    from core.schema import Message, MessageStatus

    with db.session() as session:
        row = session.get(Message, reply_id)
        if row is None or row.status == MessageStatus.sent:
            return False
        outbound = outbound_for(row.conversation.platform, settings)
        if outbound is None:
            return False  # the console reads replies from SQL
        conversation_id = row.conversation_id
    deadline = time.monotonic() + settings.delivery_order_wait_s
    while time.monotonic() < deadline:
        with db.session() as session:
            row = session.get(Message, reply_id)
            if row is None or not _earlier_reply_pending(session, row):
                break
        time.sleep(0.1)
    # One post at a time per conversation in this process, and the sent check under the same lock.
    with _conversation_lock(conversation_id):
        with db.session() as session:
            reply = load_reply(session, reply_id)
            row = session.get(Message, reply_id)
            if reply is None or row is None or row.status == MessageStatus.sent:
                return False
        try:
            delivered = outbound.deliver(reply)
        except DeliveryError as err:
            log.error("reply %s not delivered: %s", reply_id, err)
            with db.session() as session:
                row = session.get(Message, reply_id)
                if row is not None:
                    row.meta = {**(row.meta or {}), "delivery_error": str(err)}
            return False
        with db.session() as session:
            row = session.get(Message, reply_id)
            if row is not None:
                row.status = MessageStatus.sent
                row.meta = {**(row.meta or {}), "sent_refs": list(delivered.refs)}
        # The adapter may have posted its "working on it" after this reply was read: remove it.
        with db.session() as session:
            question_id = session.get(Message, reply_id).reply_to_id  # type: ignore[union-attr]
            stale = question_id is not None and delivered_without_placeholder(session=session, message_id=question_id)
            placeholder = (session.get(Message, question_id).meta or {}).get("placeholder") if stale else None
        if placeholder:
            outbound.discard(channel=reply.conversation.channel, ref=placeholder)
    return True
