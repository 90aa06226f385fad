"""Conversation service: plain keyword-only functions over a SQLAlchemy session."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.schema import Conversation, Message, MessageRole, MessageStatus, Role, User, as_utc


def get_or_create_user(*, session: Session, platform: str, external_id: str, role: Role = Role.employee) -> User:
    user = session.scalar(select(User).where(User.platform == platform, User.external_id == external_id))
    if user is None:
        user = User(platform=platform, external_id=external_id, role=role)
        try:
            with session.begin_nested():
                session.add(user)
        except IntegrityError:  # created concurrently by another process
            user = session.scalars(
                select(User).where(User.platform == platform, User.external_id == external_id)
            ).one()
    return user


OWNER_SEPARATOR = "#u"  # a thread named by someone other than its owner gets this suffix and their user id


def platform_thread(thread: str) -> str:
    """The platform's thread of a conversation key (a non-owner's conversation adds a suffix to it)."""
    return thread.split(OWNER_SEPARATOR, 1)[0]


def get_or_create_conversation(
    *, session: Session, platform: str, channel: str, thread: str, user_id: int | None
) -> Conversation:
    """The conversation of ``user_id`` at this place. A conversation belongs to the user who started it:
    anyone else naming the same thread (a colleague posting in a Slack thread, a console ``--thread``)
    gets a conversation of their own beside it, so nobody's history ever reaches another's prompt."""
    query = select(Conversation).where(
        Conversation.platform == platform, Conversation.channel == channel, Conversation.thread == thread
    )
    conversation = session.scalar(query)
    if conversation is not None and user_id is not None and conversation.user_id not in (None, user_id):
        return get_or_create_conversation(
            session=session,
            platform=platform,
            channel=channel,
            thread=f"{platform_thread(thread)}{OWNER_SEPARATOR}{user_id}",
            user_id=user_id,
        )
    if conversation is None:
        conversation = Conversation(platform=platform, channel=channel, thread=thread, user_id=user_id)
        try:
            with session.begin_nested():
                session.add(conversation)
        except IntegrityError:
            conversation = session.scalars(query).one()
            if user_id is not None and conversation.user_id not in (None, user_id):
                return get_or_create_conversation(
                    session=session, platform=platform, channel=channel, thread=thread, user_id=user_id
                )
    return conversation


def conversation_exists(*, session: Session, platform: str, channel: str, thread: str) -> bool:
    """Whether the bot takes part in this platform thread (someone asked it something there)."""
    return (
        session.scalar(
            select(Conversation.id).where(
                Conversation.platform == platform, Conversation.channel == channel, Conversation.thread == thread
            )
        )
        is not None
    )


def latest_conversation(*, session: Session, platform: str, channel: str, user_id: int) -> Conversation | None:
    return session.scalar(
        select(Conversation)
        .where(Conversation.platform == platform, Conversation.channel == channel, Conversation.user_id == user_id)
        .order_by(Conversation.id.desc())
        .limit(1)
    )


def last_activity(*, session: Session, conversation: Conversation) -> datetime:
    """When anything last happened in a conversation (its newest message, else its creation)."""
    newest = session.scalar(
        select(Message.created_at)
        .where(Message.conversation_id == conversation.id)
        .order_by(Message.id.desc())
        .limit(1)
    )
    return as_utc(newest or conversation.created_at)


def messages_with_ref(
    *, session: Session, platform: str, channel: str, ref: str, key: str = "ref", role: MessageRole | None = None,
    recent: int = 2000,
) -> list[Message]:
    """Messages of a platform channel whose ``meta[key]`` is (or lists) the platform's message id ``ref``.

    A scan over the channel's most recent messages, newest first: refs are JSON metadata, and what a
    person deletes or replies to is almost always recent."""
    query = (
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.platform == platform, Conversation.channel == channel)
        .order_by(Message.id.desc())
        .limit(recent)
    )
    if role is not None:
        query = query.where(Message.role == role)
    found = []
    for message in session.scalars(query):
        value = (message.meta or {}).get(key)
        if value == ref or (isinstance(value, list) and ref in value):
            found.append(message)
    return found


def forget_message(*, session: Session, platform: str, channel: str, ref: str) -> int:
    """A person deleted their message on the platform: drop its stored text. Returns how many were found."""
    found = messages_with_ref(session=session, platform=platform, channel=channel, ref=ref, role=MessageRole.user)
    for message in found:
        message.text = ""
        message.meta = {**(message.meta or {}), "deleted": True}
    return len(found)


def find_by_idempotency_key(*, session: Session, key: str) -> Message | None:
    return session.scalar(select(Message).where(Message.idempotency_key == key))


def answer_for(*, session: Session, message_id: int) -> Message | None:
    """The assistant reply to a user message, if one was stored."""
    return session.scalar(select(Message).where(Message.reply_to_id == message_id))


def history(*, session: Session, conversation_id: int, before_id: int, turns: int) -> list[Message]:
    """The last ``turns`` user/assistant/technician messages before ``before_id``, oldest first."""
    if turns <= 0:
        return []
    rows = session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.id < before_id,
            Message.role.in_([MessageRole.user, MessageRole.assistant, MessageRole.technician]),
            Message.status.notin_([MessageStatus.held]),
        )
        .order_by(Message.id.desc())
        .limit(turns)
    ).all()
    return list(reversed(rows))


def store_reply(
    *,
    session: Session,
    question: Message,
    text: str,
    model_version: str,
    sources: list[str] | None = None,
    confidence: float | None = None,
    estimated_hours: float | None = None,
    status: MessageStatus = MessageStatus.answered,
    error: str | None = None,
    fallback: bool = False,
    flagged: bool = False,
    notes: list[str] | None = None,
) -> tuple[Message, bool]:
    """Store the one reply to ``question``. Returns (reply, created); a reply stored earlier wins."""
    existing = answer_for(session=session, message_id=question.id)
    if existing is not None:
        return existing, False
    now = datetime.now(timezone.utc)
    created = as_utc(question.created_at)
    reply = Message(
        conversation_id=question.conversation_id,
        role=MessageRole.assistant,
        text=text,
        status=status,
        reply_to_id=question.id,
        model_version=model_version,
        sources=sources or [],
        confidence=confidence,
        estimated_hours=estimated_hours,
        answered_at=now,
        latency_ms=(now - created).total_seconds() * 1000.0,
        error=error,
        fallback=fallback,
        flagged=flagged,
        meta={"composition": notes} if notes else {},
    )
    try:
        with session.begin_nested():
            session.add(reply)
    except IntegrityError:  # the unique reply_to_id: another worker stored the answer first
        existing = answer_for(session=session, message_id=question.id)
        assert existing is not None
        return existing, False
    question.status = MessageStatus.failed if status == MessageStatus.failed else MessageStatus.answered
    question.answered_at = now
    question.error = error
    return reply, True


def attach_placeholder(*, session: Session, message_id: int, ref: str) -> None:
    """Record the "working on it" message an adapter posted for a question, for the answer to replace.

    The worker may have been faster. So after committing this, the adapter asks
    ``delivered_without_placeholder`` in a new transaction, and the worker asks the reverse after
    committing its delivery: one of the two always sees the other's write and removes the placeholder."""
    question = session.get(Message, message_id)
    if question is not None:
        question.meta = {**(question.meta or {}), "placeholder": ref}


def delivered_without_placeholder(*, session: Session, message_id: int) -> bool:
    reply = answer_for(session=session, message_id=message_id)
    if reply is None or reply.status != MessageStatus.sent:
        return False
    question = session.get(Message, message_id)
    placeholder = (question.meta or {}).get("placeholder") if question is not None else None
    return placeholder not in ((reply.meta or {}).get("sent_refs") or [])
