"""Ratings and escalations as every channel records them (Slack buttons, Telegram keyboard, console).

Plain keyword-only functions over a session. A reason a person types is anonymized with the same
callable the intake uses for messages before it is stored: it is free text like any question.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from core.conversations import get_or_create_user, platform_thread
from core.errors import InputError
from core.schema import Conversation, Escalation, Message, MessageRole, Rating

Anonymize = Callable[[str, str], str]  # (text, scope) -> anonymized text; raises PrivacyError


def _reply(session: Session, reply_id: int) -> Message:
    reply = session.get(Message, reply_id)
    if reply is None or reply.role != MessageRole.assistant:
        raise InputError(f"there is no answer {reply_id} to rate or escalate")
    return reply


def scope_of(conversation: Conversation) -> str:
    """The anonymizer's scope of a conversation: the same one the intake used for its messages."""
    return f"{conversation.platform}:{conversation.channel}:{platform_thread(conversation.thread)}"


def rate_answer(
    *,
    session: Session,
    reply_id: int,
    platform: str,
    user_external_id: str,
    value: int | str | bool,
    reason: str | None = None,
    anonymize: Anonymize | None = None,
) -> Rating:
    """The person ``user_external_id`` rates answer ``reply_id``; their earlier vote on it is replaced."""
    from model.ratings import rate  # plain SQL, no model code: ratings live with the training data

    reply = _reply(session, reply_id)
    user = get_or_create_user(session=session, platform=platform, external_id=user_external_id)
    if reason and reason.strip():
        if anonymize is None:
            raise InputError("a rating reason must be anonymized before it is stored")
        reason = anonymize(reason, scope_of(reply.conversation))
    return rate(session=session, message_id=reply.id, value=value, reason=reason, user_id=user.id)


def escalate_answer(*, session: Session, reply_id: int) -> Escalation | None:
    """Open (or find the open) escalation of the conversation an answer belongs to."""
    return escalate_conversation(session=session, conversation_id=_reply(session, reply_id).conversation_id)


def escalate_conversation(*, session: Session, conversation_id: int) -> Escalation | None:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        return None
    from core.desk import escalate
    from core.errors import DeskError

    try:
        # The desk's escalate: the same escalation the console and CLI open, so the worker stops
        # answering here (core.desk.desk_takes) and technicians see it on their desk.
        escalation, _ = escalate(session=session, conversation_id=conversation_id)
    except DeskError:
        return None  # nothing asked yet
    return escalation
