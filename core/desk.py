"""The escalation desk: escalate, claim, relay, note, resolve, reopen. Platform-independent.

Every channel (Slack, Telegram, the console, the CLI) calls these keyword-only functions over a
SQLAlchemy session; they return what the channel must post (``Post``) and never talk to a platform.
The text stored here is always anonymized (the caller passes the same ``anonymize`` its intake uses);
what is posted is what was stored, so the desk and the employee see the same text the database holds.

Lifecycle: open -> claimed -> resolved (-> reopen -> claimed or open). While an escalation is open or
claimed the bot answers nothing in its conversation (``is_open``); the worker relays instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import texts
from core.errors import DeskError
from core.schema import (
    Conversation,
    Escalation,
    EscalationStatus,
    Message,
    MessageRole,
    MessageStatus,
    Role,
    Ticket,
    User,
    as_utc,
    utcnow,
)

if TYPE_CHECKING:
    from core.settings import Settings
    from retrieval.search import TicketIndex

# (text, scope) -> anonymized text, raising PrivacyError: the intake's anonymizer.
Anonymize = Callable[[str, str], str]

NOTE_PREFIX = "note:"
ACTIVE = (EscalationStatus.open, EscalationStatus.claimed)
MAX_HOURS = 1000.0


@dataclass(frozen=True)
class Post:
    """A message a channel must post. ``to`` is "employee" (their conversation) or "desk" (the
    escalation's desk thread: ``channel``/``thread`` are None until a channel has posted it there)."""

    to: str
    escalation_id: int
    platform: str
    channel: str | None
    thread: str | None
    text: str
    message_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Resolution:
    escalation: Escalation
    ticket_id: str
    posts: list[Post] = field(default_factory=list)


# --- looking up -----------------------------------------------------------------------------------


def get(*, session: Session, escalation_id: int) -> Escalation:
    escalation = session.get(Escalation, escalation_id)
    if escalation is None:
        raise DeskError(texts.DESK_NO_SUCH.format(id=escalation_id))
    return escalation


def active_escalation(*, session: Session, conversation_id: int) -> Escalation | None:
    """The open or claimed escalation of a conversation (at most one is kept active)."""
    return session.scalar(
        select(Escalation)
        .where(Escalation.conversation_id == conversation_id, Escalation.status.in_(ACTIVE))
        .order_by(Escalation.id.desc())
        .limit(1)
    )


def is_open(*, session: Session, conversation_id: int) -> bool:
    """True while the bot must not answer in the conversation: it is with the technicians, or it sits in
    a platform thread where someone else's conversation is (a colleague writing in an employee's
    escalated Slack thread has a conversation of their own beside it)."""
    if active_escalation(session=session, conversation_id=conversation_id) is not None:
        return True
    return escalated_beside(session=session, conversation_id=conversation_id) is not None


def escalated_beside(*, session: Session, conversation_id: int) -> Escalation | None:
    """The active escalation of another person's conversation in the same platform thread, if any."""
    from core.conversations import platform_thread

    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        return None
    nearby = escalated_in_thread(session=session, platform=conversation.platform, channel=conversation.channel,
                                 thread=platform_thread(conversation.thread))
    return nearby if nearby is not None and nearby.conversation_id != conversation_id else None


def conversation_at(*, session: Session, platform: str, channel: str, thread: str) -> Conversation | None:
    return session.scalar(
        select(Conversation).where(
            Conversation.platform == platform, Conversation.channel == channel, Conversation.thread == thread
        )
    )


def user_by_key(*, session: Session, key: str) -> User:
    """A user from a platform-qualified id ("slack:U1"), created when first seen."""
    from core.conversations import get_or_create_user

    platform, sep, external_id = key.partition(":")
    if not sep or not platform or not external_id:
        raise DeskError(f"a user is named PLATFORM:ID (e.g. slack:U1), got {key!r}")
    return get_or_create_user(session=session, platform=platform, external_id=external_id)


def user_key(user: User) -> str:
    return f"{user.platform}:{user.external_id}"


def is_technician(*, session: Session, settings: Settings, user_id: int | None) -> bool:
    """Technician or admin by core/roles.py (settings ``technicians``/``admins``, users.role; a `cli:`
    operator is an admin): admins run the desk too."""
    from core.roles import role_of

    if user_id is None:
        return False
    user = session.get(User, user_id)
    if user is None:
        return False
    role = role_of(session=session, platform=user.platform, external_id=user.external_id, settings=settings)
    return role in (Role.technician, Role.admin)


def _require_technician(*, session: Session, settings: Settings, user_id: int, action: str) -> User:
    user = session.get(User, user_id)
    if user is None or not is_technician(session=session, settings=settings, user_id=user_id):
        who = user_key(user) if user is not None else f"user {user_id}"
        raise DeskError(texts.DESK_NOT_TECHNICIAN.format(who=who, action=action))
    return user


def _employee_post(escalation: Escalation, text: str, message_id: int | None = None) -> Post:
    conversation = escalation_conversation(escalation)
    return Post("employee", escalation.id, conversation.platform, conversation.channel, conversation.thread,
                text, message_id)


def _desk_post(escalation: Escalation, text: str, message_id: int | None = None) -> Post:
    conversation = escalation_conversation(escalation)
    return Post("desk", escalation.id, conversation.platform, escalation.tech_channel, escalation.tech_thread,
                text, message_id)


def escalation_conversation(escalation: Escalation) -> Conversation:
    from sqlalchemy.orm import object_session

    session = object_session(escalation)
    assert session is not None
    conversation = session.get(Conversation, escalation.conversation_id)
    assert conversation is not None
    return conversation


def _scope(escalation: Escalation) -> str:
    conversation = escalation_conversation(escalation)
    return f"{conversation.platform}:{conversation.channel}:{conversation.thread}"


def _touch(escalation: Escalation) -> None:
    escalation.updated_at = utcnow()


# --- the lifecycle --------------------------------------------------------------------------------


def fallback_summary(questions: list[Message]) -> str:
    """Until the worker writes the model's summary: the employee's last questions, as they were stored."""
    return "\n".join(f"- {m.text[:300]}" for m in questions[-5:] if m.text)


def escalate(
    *,
    session: Session,
    conversation_id: int,
    requested_by_id: int | None = None,
    reason: str | None = None,
    anonymize: Anonymize | None = None,
) -> tuple[Escalation, bool]:
    """Open an escalation for a conversation, or return its active one. Returns (escalation, created).

    ``reason`` (why the employee escalated) is anonymized with ``anonymize`` before it is stored; a
    reason without an anonymizer is refused rather than stored raw."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise DeskError(texts.DESK_NOTHING_TO_ESCALATE)
    clean_reason = None
    if reason and reason.strip():
        if anonymize is None:
            raise DeskError("an escalation reason is stored only anonymized: pass the anonymizer")
        clean_reason = anonymize(reason.strip(), f"{conversation.platform}:{conversation.channel}:{conversation.thread}")
    existing = active_escalation(session=session, conversation_id=conversation_id)
    if existing is not None:
        if clean_reason and not existing.reason:
            existing.reason = clean_reason
            _touch(existing)
        return existing, False
    questions = list(
        session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.role == MessageRole.user,
                   Message.status != MessageStatus.held)
            .order_by(Message.id)
        )
    )
    if not questions:
        raise DeskError(texts.DESK_NOTHING_TO_ESCALATE)
    # The escalated question: the last one the bot was asked (the desk relays later messages).
    asked = [m for m in questions if not (m.meta or {}).get("relayed_to_desk")] or questions
    escalation = Escalation(
        conversation_id=conversation_id,
        message_id=asked[-1].id,
        summary=fallback_summary(questions),
        requested_by_id=requested_by_id if requested_by_id is not None else conversation.user_id,
        reason=clean_reason,
        status=EscalationStatus.open,
    )
    session.add(escalation)
    session.flush()
    return escalation, True


def claim(*, session: Session, settings: Settings, escalation_id: int, technician_id: int) -> tuple[Escalation, list[Post]]:
    """A technician takes an escalation. Refuses anyone who is not a technician, and a resolved one."""
    escalation = get(session=session, escalation_id=escalation_id)
    _require_technician(session=session, settings=settings, user_id=technician_id, action="claim")
    if escalation.status == EscalationStatus.resolved:
        raise DeskError(texts.DESK_ALREADY_RESOLVED.format(id=escalation.id))
    if escalation.status == EscalationStatus.claimed and escalation.technician_id == technician_id:
        return escalation, []  # pressed twice: one claim, one notice
    if escalation.status == EscalationStatus.claimed and escalation.technician_id not in (None, technician_id):
        holder = session.get(User, escalation.technician_id)
        raise DeskError(texts.DESK_CLAIMED_BY_OTHER.format(
            id=escalation.id, who=user_key(holder) if holder else escalation.technician_id))
    escalation.status = EscalationStatus.claimed
    escalation.technician_id = technician_id
    escalation.claimed_at = utcnow()
    _touch(escalation)
    session.flush()
    return escalation, [_employee_post(escalation, texts.DESK_CLAIMED.format(id=escalation.id))]


def relay(
    *,
    session: Session,
    settings: Settings,
    escalation_id: int,
    sender_id: int,
    text: str,
    anonymize: Anonymize,
    key: str | None = None,
) -> Post | None:
    """A message in an escalation, from either side. Returns what the channel must post, or None.

    ``key`` is the platform message's idempotency key: a redelivered desk reply is relayed once.

    - a technician's ``note: ...`` stays on the desk (``note``): nothing reaches the employee;
    - a technician's reply is stored as a technician message in the employee's conversation and posted
      there;
    - the employee's message is stored in their conversation (never answered by the bot) and posted to
      the desk thread.
    Anyone else (neither a technician nor the employee) is refused."""
    escalation = get(session=session, escalation_id=escalation_id)
    body = (text or "").strip()
    if not body:
        raise DeskError(texts.EMPTY_MESSAGE)
    conversation = escalation_conversation(escalation)
    if key is not None and session.scalar(select(Message.id).where(Message.idempotency_key == key)) is not None:
        return None  # relayed already (a platform's retry of the same message)
    if is_technician(session=session, settings=settings, user_id=sender_id):
        if body.lower().startswith(NOTE_PREFIX):
            note(session=session, settings=settings, escalation_id=escalation_id, technician_id=sender_id,
                 text=body, anonymize=anonymize)
            return None
        if escalation.status == EscalationStatus.resolved:
            raise DeskError(texts.DESK_ALREADY_RESOLVED.format(id=escalation.id))
        stored = Message(
            conversation_id=conversation.id,
            user_id=sender_id,
            role=MessageRole.technician,
            text=anonymize(body, _scope(escalation)),
            status=MessageStatus.sent,
            idempotency_key=key,
            meta={"escalation_id": escalation.id},
        )
        session.add(stored)
        if escalation.status == EscalationStatus.open:  # a reply is a claim: someone is on it
            escalation.status = EscalationStatus.claimed
            escalation.technician_id = sender_id
            escalation.claimed_at = utcnow()
        _touch(escalation)
        session.flush()
        return _employee_post(escalation, texts.DESK_FROM_TECHNICIAN.format(text=stored.text), stored.id)
    if sender_id != conversation.user_id and sender_id != escalation.requested_by_id:
        raise DeskError(texts.DESK_NOT_TECHNICIAN.format(who=f"user {sender_id}", action="reply in"))
    stored = Message(
        conversation_id=conversation.id,
        user_id=sender_id,
        role=MessageRole.user,
        text=anonymize(body, _scope(escalation)),
        status=MessageStatus.answered,
        meta={"relayed_to_desk": True, "escalation_id": escalation.id},
    )
    session.add(stored)
    session.flush()
    return relay_stored(session=session, message_id=stored.id)


def relay_stored(*, session: Session, message_id: int) -> Post | None:
    """An employee message already stored by the intake, in a conversation with an active escalation:
    it gets no bot answer; it is marked answered (relayed) and goes to the desk. None when the
    conversation has no active escalation (the bot answers it as usual)."""
    message = session.get(Message, message_id)
    if message is None or message.role != MessageRole.user:
        return None
    escalation = active_escalation(session=session, conversation_id=message.conversation_id)
    if escalation is None:
        return None
    message.status = MessageStatus.answered
    message.meta = {**(message.meta or {}), "relayed_to_desk": True, "escalation_id": escalation.id}
    _touch(escalation)
    session.flush()
    return _desk_post(escalation, texts.DESK_FROM_EMPLOYEE.format(id=escalation.id, text=message.text), message.id)


def desk_takes(*, session: Session, settings: Settings, message: Message) -> bool:
    """Whether the bot must leave this user message alone (the answer path asks before any model work):

    - its conversation has an open or claimed escalation: the message is relayed to the desk;
    - a technician wrote it in someone else's conversation that was escalated: it is their reply, not
      a question (their own DMs and mentions are answered as usual);
    - anyone else wrote it in a platform thread where another person's conversation is escalated (a
      colleague in an employee's Slack thread gets a conversation of their own there): the bot stays out
      of the thread, and the text reaches the desk, marked as from another employee."""
    relayed = relay_stored(session=session, message_id=message.id)
    if relayed is not None:
        _emit_after_commit(session, relayed)  # the worker's sink posts it to the desk thread
        return True
    conversation = session.get(Conversation, message.conversation_id)
    technician = message.user_id is not None and is_technician(session=session, settings=settings,
                                                                user_id=message.user_id)
    if conversation is not None and not technician:
        nearby = escalated_beside(session=session, conversation_id=conversation.id)
        if nearby is not None:
            message.status = MessageStatus.answered
            message.meta = {**(message.meta or {}), "relayed_to_desk": True, "escalation_id": nearby.id,
                            "other_employee": True}
            _touch(nearby)
            session.flush()
            _emit_after_commit(session, _desk_post(
                nearby, texts.DESK_FROM_OTHER_EMPLOYEE.format(id=nearby.id, text=message.text), message.id))
            return True
    if not technician:
        return False
    beside = escalated_beside(session=session, conversation_id=message.conversation_id)
    if beside is not None:  # their own conversation beside the escalated one, in the employee's thread
        escalated: int | None = beside.id
    else:
        escalated = session.scalar(
            select(Escalation.id).where(Escalation.conversation_id == message.conversation_id).limit(1)
        )
        if escalated is None or conversation is None or conversation.user_id == message.user_id:
            return False
    message.status = MessageStatus.answered
    message.meta = {**(message.meta or {}), "technician_in_escalation": True, "escalation_id": escalated}
    session.flush()
    return True


def note(
    *, session: Session, settings: Settings, escalation_id: int, technician_id: int, text: str, anonymize: Anonymize
) -> Message:
    """A private desk note: stored as a system message of the conversation (never shown to the
    employee, never in the bot's prompt history, never exported as a turn)."""
    escalation = get(session=session, escalation_id=escalation_id)
    _require_technician(session=session, settings=settings, user_id=technician_id, action="write notes on")
    body = text.strip()
    if body.lower().startswith(NOTE_PREFIX):
        body = body[len(NOTE_PREFIX):].strip()
    if not body:
        raise DeskError(texts.EMPTY_MESSAGE)
    stored = Message(
        conversation_id=escalation.conversation_id,
        user_id=technician_id,
        role=MessageRole.system,
        text=anonymize(body, _scope(escalation)),
        status=MessageStatus.sent,
        meta={"desk_note": True, "escalation_id": escalation.id},
    )
    session.add(stored)
    _touch(escalation)
    session.flush()
    return stored


def notes(*, session: Session, escalation_id: int) -> list[Message]:
    return [
        m for m in session.scalars(
            select(Message).where(Message.role == MessageRole.system).order_by(Message.id)
        )
        if (m.meta or {}).get("desk_note") and (m.meta or {}).get("escalation_id") == escalation_id
    ]


def ticket_id_for(escalation_id: int) -> str:
    """One ticket per escalation: resolving again after a reopen updates it instead of adding another."""
    return f"ESC-{escalation_id}"


def _clean_hours(hours: float | str | None) -> float | None:
    if hours is None or hours == "":
        return None
    try:
        value = float(hours)
    except (TypeError, ValueError) as err:
        raise DeskError(texts.DESK_BAD_HOURS.format(hours=hours)) from err
    if not 0 <= value <= MAX_HOURS or value != value:
        raise DeskError(texts.DESK_BAD_HOURS.format(hours=hours))
    return value


def clean_hours(hours: float | str | None) -> float | None:
    """Hours as a resolution form gives them ("" is none); a bad value raises DeskError saying why."""
    return _clean_hours(hours)


def resolve(
    *,
    session: Session,
    settings: Settings,
    index: TicketIndex,
    escalation_id: int,
    technician_id: int,
    text: str,
    hours: float | str | None = None,
    machine: str | None = None,
) -> Resolution:
    """Close an escalation with the technician's fix; the fix becomes ticket ``ESC-<id>``
    (source "technician") through ``TicketIndex.upsert``, which anonymizes and screens it, so the very
    next search can find it; the next export uses it as the answer to the escalated question.

    A fix that reads like instructions to an assistant is refused before anything is stored (the
    escalation stays open and the technician is told why). Idempotent: resolving again after a reopen
    updates the same ticket."""
    from core.trust import instruction_signals

    escalation = get(session=session, escalation_id=escalation_id)
    _require_technician(session=session, settings=settings, user_id=technician_id, action="resolve")
    if escalation.status == EscalationStatus.resolved:
        raise DeskError(texts.DESK_ALREADY_RESOLVED.format(id=escalation.id))
    fix = (text or "").strip()
    if not fix:
        raise DeskError(texts.DESK_EMPTY_RESOLUTION)
    value = _clean_hours(hours)
    reasons = instruction_signals(fix, machine or "")
    if reasons:
        raise DeskError(texts.DESK_RESOLUTION_REFUSED.format(id=escalation.id, reasons=", ".join(reasons)))
    question = session.get(Message, escalation.message_id) if escalation.message_id else None
    title = (question.text if question is not None else "") or escalation.summary or f"Escalation {escalation.id}"
    ticket_id = ticket_id_for(escalation.id)
    ticket = {
        "id": ticket_id,
        "title": title[:500],
        "machine": (machine or "").strip(),
        "condition": (escalation.summary or "")[:2000],
        "work_performed": fix,
        "hours": value,
    }
    # The index writes the ticket in its own transaction. SQLite has one writer: what this session
    # already wrote is committed first so the two do not wait on each other.
    session.commit()
    index.upsert(tickets=[ticket], source="technician")
    stored = session.get(Ticket, ticket_id)
    if stored is None:  # screened out after all (the index's screen is the authority)
        raise DeskError(texts.DESK_RESOLUTION_REFUSED.format(id=escalation.id, reasons="quarantined"))
    session.refresh(stored)
    escalation = get(session=session, escalation_id=escalation_id)
    escalation.status = EscalationStatus.resolved
    escalation.resolution = stored.work_performed  # the anonymized text, as the ticket holds it
    escalation.resolution_hours = value
    escalation.resolution_machine = stored.machine or None
    escalation.ticket_id = ticket_id
    escalation.resolved_at = utcnow()
    if escalation.technician_id is None:
        escalation.technician_id = technician_id
        escalation.claimed_at = escalation.claimed_at or escalation.resolved_at
    _touch(escalation)
    session.flush()
    posts = [
        _employee_post(escalation, texts.DESK_RESOLVED.format(id=escalation.id, text=escalation.resolution)),
    ]
    return Resolution(escalation=escalation, ticket_id=ticket_id, posts=posts)


def reopen(
    *, session: Session, settings: Settings, escalation_id: int, by_id: int, reason: str | None = None,
    anonymize: Anonymize | None = None,
) -> tuple[Escalation, list[Post]]:
    """A resolved escalation goes back to its technician (or to the desk when nobody had claimed it).
    A technician or the employee who asked may reopen. The ticket stays until it is resolved again."""
    escalation = get(session=session, escalation_id=escalation_id)
    conversation = escalation_conversation(escalation)
    if not is_technician(session=session, settings=settings, user_id=by_id) and by_id not in (
        conversation.user_id, escalation.requested_by_id
    ):
        user = session.get(User, by_id)
        raise DeskError(texts.DESK_NOT_TECHNICIAN.format(
            who=user_key(user) if user else f"user {by_id}", action="reopen"))
    if escalation.status != EscalationStatus.resolved:
        raise DeskError(texts.DESK_NOT_RESOLVED.format(id=escalation.id))
    other = active_escalation(session=session, conversation_id=escalation.conversation_id)
    if other is not None:
        raise DeskError(texts.DESK_ALREADY_ESCALATED.format(id=other.id, status=other.status.value))
    escalation.status = EscalationStatus.claimed if escalation.technician_id else EscalationStatus.open
    escalation.reopened_at = utcnow()
    escalation.resolved_at = None
    escalation.last_ping_at = None
    if reason and reason.strip():
        if anonymize is None:
            raise DeskError("a reopen reason is stored only anonymized: pass the anonymizer")
        escalation.reason = anonymize(reason.strip(), _scope(escalation))
    _touch(escalation)
    session.flush()
    return escalation, [
        _employee_post(escalation, texts.DESK_REOPENED.format(id=escalation.id)),
        _desk_post(escalation, texts.DESK_REOPENED.format(id=escalation.id)),
    ]


def attach_desk_post(*, session: Session, escalation_id: int, channel: str, thread: str, message_ref: str | None = None) -> Escalation:
    """The channel posted the escalation on the desk: remember where, for relays and edits."""
    escalation = get(session=session, escalation_id=escalation_id)
    escalation.tech_channel, escalation.tech_thread = channel, thread
    escalation.desk_message_ref = message_ref
    _touch(escalation)
    session.flush()
    return escalation


def listing(*, session: Session, status: str | None = None, limit: int = 100) -> list[Escalation]:
    query = select(Escalation).order_by(Escalation.id.desc()).limit(limit)
    if status == "active":
        query = query.where(Escalation.status.in_(ACTIVE))
    elif status:
        query = query.where(Escalation.status == EscalationStatus(status))
    return list(session.scalars(query))


def describe(*, session: Session, escalation: Escalation, with_messages: bool = False) -> dict[str, Any]:
    """An escalation as plain data (CLI --json, desk posts)."""
    conversation = escalation_conversation(escalation)
    technician = session.get(User, escalation.technician_id) if escalation.technician_id else None
    requester = session.get(User, escalation.requested_by_id) if escalation.requested_by_id else None

    def when(value: Any) -> str | None:
        return as_utc(value).isoformat() if value is not None else None

    data: dict[str, Any] = {
        "id": escalation.id,
        "status": escalation.status.value,
        "conversation_id": conversation.id,
        "place": f"{conversation.platform}:{conversation.channel}:{conversation.thread}",
        "requested_by": user_key(requester) if requester else None,
        "reason": escalation.reason,
        "technician": user_key(technician) if technician else None,
        "summary": escalation.summary,
        "severity": escalation.severity,
        "severity_reason": escalation.severity_reason,
        "resolution": escalation.resolution,
        "resolution_hours": escalation.resolution_hours,
        "resolution_machine": escalation.resolution_machine,
        "ticket_id": escalation.ticket_id,
        "desk": {"channel": escalation.tech_channel, "thread": escalation.tech_thread,
                 "message_ref": escalation.desk_message_ref},
        "created_at": when(escalation.created_at),
        "claimed_at": when(escalation.claimed_at),
        "resolved_at": when(escalation.resolved_at),
        "reopened_at": when(escalation.reopened_at),
        "last_ping_at": when(escalation.last_ping_at),
    }
    if with_messages:
        data["messages"] = [
            {"id": m.id, "role": m.role.value, "text": m.text, "status": m.status.value,
             "note": bool((m.meta or {}).get("desk_note"))}
            for m in session.scalars(
                select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id)
            )
        ]
    return data


# --- what the desk shows, and the small port that posts it ----------------------------------------
# The platforms post (bot/slack, bot/telegram); this module only says what a desk card holds and where
# an escalation's desk is, so a new platform is one more implementation of ``DeskDelivery``.

PENDING_REF = "pending"  # desk_message_ref while one worker is posting the card (see begin_desk_post)


@dataclass(frozen=True)
class DeskCard:
    """An escalation as its desk post shows it (all text as stored, i.e. anonymized)."""

    escalation_id: int
    platform: str
    status: str
    summary: str
    severity: str | None
    severity_reason: str | None
    reason: str | None
    technician: str | None  # the assignee's platform id (e.g. "U123"), None while unclaimed
    ticket_id: str | None
    employee_channel: str
    employee_thread: str  # the platform's thread of the employee's conversation
    employee_ref: str | None  # the platform's id of the escalated question (Telegram links to it)


class DeskDelivery(Protocol):
    """What a platform does for the desk; implemented beside each platform's outbound adapter."""

    def post_card(self, card: DeskCard, *, channel: str) -> tuple[str, str]:
        """Post the card on the desk; returns (thread, message ref) that replies on the desk carry."""
        ...

    def update_card(self, card: DeskCard, *, channel: str, ref: str) -> None:
        """Show the card's new state (summary written, claimed, resolved) in place."""
        ...


def desk_place(*, settings: Settings, platform: str) -> str | None:
    """The desk channel/chat of a platform, or None where no desk is configured there."""
    return {"slack": settings.slack_desk_channel, "telegram": settings.telegram_desk_chat}.get(platform) or None


def card(*, session: Session, escalation: Escalation) -> DeskCard:
    from core.conversations import platform_thread

    conversation = escalation_conversation(escalation)
    technician = session.get(User, escalation.technician_id) if escalation.technician_id else None
    question = session.get(Message, escalation.message_id) if escalation.message_id else None
    return DeskCard(
        escalation_id=escalation.id,
        platform=conversation.platform,
        status=escalation.status.value,
        summary=escalation.summary or "",
        severity=escalation.severity,
        severity_reason=escalation.severity_reason,
        reason=escalation.reason,
        technician=technician.external_id if technician is not None else None,
        ticket_id=escalation.ticket_id,
        employee_channel=conversation.channel,
        employee_thread=platform_thread(conversation.thread),
        employee_ref=((question.meta or {}).get("ref") if question is not None else None),
    )


def begin_desk_post(*, session: Session, escalation_id: int) -> bool:
    """Take the right to post an escalation's card (one conditional UPDATE, so two workers never post
    it twice). False when it is posted already or another worker is posting it."""
    from sqlalchemy import update

    result = session.execute(
        update(Escalation)
        .where(Escalation.id == escalation_id, Escalation.desk_message_ref.is_(None),
               Escalation.tech_thread.is_(None))
        .values(desk_message_ref=PENDING_REF)
    )
    session.flush()
    return bool(result.rowcount)


def abandon_desk_post(*, session: Session, escalation_id: int) -> None:
    """The card could not be posted: let the next attempt try again."""
    escalation = get(session=session, escalation_id=escalation_id)
    if escalation.desk_message_ref == PENDING_REF:
        escalation.desk_message_ref = None
        session.flush()


def at_desk(*, session: Session, platform: str, channel: str, thread: str) -> Escalation | None:
    """The escalation whose desk thread this is (Slack: the card's ts; Telegram: the card's message id)."""
    return session.scalar(
        select(Escalation)
        .join(Conversation, Conversation.id == Escalation.conversation_id)
        .where(Conversation.platform == platform, Escalation.tech_channel == channel,
               Escalation.tech_thread == thread)
        .order_by(Escalation.id.desc())
        .limit(1)
    )


def posted_card(*, session: Session, escalation_id: int) -> tuple[str, str, DeskCard] | None:
    """(desk channel, card message ref, card) of an escalation whose card is on the desk, else None."""
    escalation = get(session=session, escalation_id=escalation_id)
    if not escalation.tech_channel or escalation.desk_message_ref in (None, PENDING_REF):
        return None
    return escalation.tech_channel, escalation.desk_message_ref, card(session=session, escalation=escalation)


def escalated_in_thread(*, session: Session, platform: str, channel: str, thread: str) -> Escalation | None:
    """An active escalation of any conversation in this platform thread (the employee's thread, seen by
    someone else who writes there, e.g. a technician)."""
    from core.conversations import OWNER_SEPARATOR

    return session.scalar(
        select(Escalation)
        .join(Conversation, Conversation.id == Escalation.conversation_id)
        .where(Conversation.platform == platform, Conversation.channel == channel,
               (Conversation.thread == thread) | Conversation.thread.startswith(thread + OWNER_SEPARATOR),
               Escalation.status.in_(ACTIVE))
        .order_by(Escalation.id.desc())
        .limit(1)
    )


# Where relayed posts go when no channel is at hand to post them: the worker relays an employee's
# message (desk_takes) inside the answer path and registers a sink here that delivers it after commit.
PostSink = Callable[[Post], None]
_sinks: list[PostSink] = []


def on_post(sink: PostSink) -> None:
    """Register a sink for posts made where no channel posts them (the worker, at import)."""
    if sink not in _sinks:
        _sinks.append(sink)


def _emit_after_commit(session: Session, post: Post) -> None:
    """Hand ``post`` to the sinks once the session commits (never for a rolled-back relay, and never
    while a transaction holds the database's write lock during a network call)."""
    if not _sinks:
        return
    from sqlalchemy import event

    def deliver(_session: Session) -> None:
        for sink in list(_sinks):
            try:
                sink(post)
            except Exception:  # a failed post must not undo the stored relay; the sink logs why
                import logging

                logging.getLogger(__name__).exception("desk post of escalation %s failed", post.escalation_id)

    event.listen(session, "after_commit", deliver, once=True)
