"""Escalations: a conversation the bot could not solve, handed to technicians."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.schema import Conversation, Escalation, EscalationStatus, Message, MessageRole


def open_escalation(*, session: Session, platform: str, channel: str, thread: str) -> Escalation | None:
    """Open (or return the already open) escalation for a conversation, with a summary of its questions."""
    conversation = session.scalar(
        select(Conversation).where(
            Conversation.platform == platform, Conversation.channel == channel, Conversation.thread == thread
        )
    )
    if conversation is None:
        return None
    existing = session.scalar(
        select(Escalation).where(
            Escalation.conversation_id == conversation.id, Escalation.status != EscalationStatus.resolved
        )
    )
    if existing is not None:
        return existing
    questions = session.scalars(
        select(Message)
        .where(Message.conversation_id == conversation.id, Message.role == MessageRole.user)
        .order_by(Message.id)
    ).all()
    if not questions:
        return None
    summary = "\n".join(f"- {m.text[:300]}" for m in questions[-5:] if m.text)
    escalation = Escalation(conversation_id=conversation.id, message_id=questions[-1].id, summary=summary)
    session.add(escalation)
    session.flush()
    return escalation
