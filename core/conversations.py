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


def get_or_create_conversation(
    *, session: Session, platform: str, channel: str, thread: str, user_id: int | None
) -> Conversation:
    query = select(Conversation).where(
        Conversation.platform == platform, Conversation.channel == channel, Conversation.thread == thread
    )
    conversation = session.scalar(query)
    if conversation is None:
        conversation = Conversation(platform=platform, channel=channel, thread=thread, user_id=user_id)
        try:
            with session.begin_nested():
                session.add(conversation)
        except IntegrityError:
            conversation = session.scalars(query).one()
    return conversation


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
