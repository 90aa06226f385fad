"""Desk tasks: the escalation card and summary, resolutions, relays and follow-up pings, on workers.

Each takes ids or plain values and owns its session. What reaches Slack or Telegram goes through the
platform's outbound adapter (bot/outbound.py ``outbound_for``; the desk card through its
``core.desk.DeskDelivery`` methods), so no chat SDK is imported here:
- ``summarize_escalation`` posts the desk card when an escalation is opened, writes the summary and
  severity, then updates the card;
- ``resolve_escalation`` runs ``core.desk.resolve`` with this worker's ticket index (the fix is a
  ticket the very next answer can cite), tells the employee and the desk, and updates the card;
- an employee's message in an open escalation is relayed by the answer path (``core.desk.desk_takes``)
  and posted to the desk thread by the sink registered below;
- ``escalation_pings`` posts the unclaimed pings to the desk and the idle reminders to the assignee.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import texts
from core.db import Database
from core.schema import Escalation, EscalationStatus, as_utc, utcnow
from core.settings import Settings
from workers.app import LIGHT_QUEUE, app, settings

log = logging.getLogger(__name__)

SUMMARIZE_TASK = "supportbot.light.summarize_escalation"
PINGS_TASK = "supportbot.light.escalation_pings"
RESOLVE_TASK = "supportbot.light.resolve_escalation"
DESK_THREAD_WAIT_S = 15.0  # how long a relay waits for a card another worker is posting


@dataclass(frozen=True)
class DeskPing:
    """One follow-up to post: ``kind`` "unclaimed" (to the desk) or "idle" (to the assignee)."""

    escalation_id: int
    kind: str
    platform: str
    channel: str | None
    thread: str | None
    technician_id: int | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _last_activity(escalation: Escalation) -> datetime:
    stamps = [escalation.claimed_at, escalation.updated_at, escalation.reopened_at, escalation.created_at]
    return max(as_utc(s) for s in stamps if s is not None)


def due_pings(*, session: Session, settings: Settings, now: datetime | None = None) -> list[DeskPing]:
    """Escalations unclaimed for ``escalation_ping_after_s`` and claimed ones idle for
    ``escalation_remind_after_s``; each is pinged once per period (``last_ping_at`` is set here, in the
    caller's transaction, so two beats never ping twice)."""
    from core.desk import escalation_conversation

    now = now or utcnow()
    unclaimed_before = now - timedelta(seconds=settings.escalation_ping_after_s)
    idle_before = now - timedelta(seconds=settings.escalation_remind_after_s)
    rows = session.scalars(
        select(Escalation)
        .where(Escalation.status.in_([EscalationStatus.open, EscalationStatus.claimed]))
        .order_by(Escalation.id)
        .with_for_update(skip_locked=True)
    )
    pings: list[DeskPing] = []
    for escalation in rows:
        period_start = unclaimed_before if escalation.status == EscalationStatus.open else idle_before
        last_ping = as_utc(escalation.last_ping_at) if escalation.last_ping_at else None
        if last_ping is not None and last_ping > period_start:
            continue  # pinged within this period already
        conversation = escalation_conversation(escalation)
        if escalation.status == EscalationStatus.open:
            waiting_since = as_utc(escalation.reopened_at or escalation.created_at)
            if waiting_since > unclaimed_before:
                continue
            minutes = int((now - waiting_since).total_seconds() // 60)
            summary = (escalation.summary or "").splitlines()[0][:200] if escalation.summary else ""
            text = texts.DESK_PING_UNCLAIMED.format(id=escalation.id, minutes=minutes, summary=summary).strip()
            kind = "unclaimed"
        else:
            idle_since = _last_activity(escalation)
            if idle_since > idle_before:
                continue
            minutes = int((now - idle_since).total_seconds() // 60)
            text = texts.DESK_PING_IDLE.format(id=escalation.id, minutes=minutes)
            kind = "idle"
        escalation.last_ping_at = now
        pings.append(DeskPing(escalation.id, kind, conversation.platform, escalation.tech_channel,
                              escalation.tech_thread, escalation.technician_id, text))
    session.flush()
    return pings


@app.task(name=PINGS_TASK)
def escalation_pings() -> list[dict[str, Any]]:
    """Beat job (workers/app.py): the follow-ups due now, recorded so each is sent once per period."""
    db = Database.from_settings(settings())
    try:
        with db.session() as session:
            pings = due_pings(session=session, settings=settings())
    finally:
        db.engine.dispose()
    for ping in pings:
        log.info("escalation %s: %s ping due", ping.escalation_id, ping.kind)
        try:
            deliver_ping(db=_worker_db(), settings=settings(), ping=ping)
        except Exception as err:  # one platform down must not keep the others' pings back
            log.error("escalation %s: %s ping not delivered: %s", ping.escalation_id, ping.kind, err)
    return [p.to_dict() for p in pings]


def summarize_escalation_now(*, db: Database, settings: Settings, escalation_id: int, generate: Any = None) -> Escalation | None:
    """Write the desk summary and severity of one escalation (model/summaries.py). ``generate`` is
    ``messages -> text`` (the worker's model); None writes the rules-only summary."""
    from model.summaries import escalation_brief

    with db.session() as session:
        escalation = session.get(Escalation, escalation_id)
        if escalation is None:
            return None
        brief = escalation_brief(session=session, escalation=escalation, generate=generate)
        escalation.summary = brief.text
        escalation.severity = brief.severity
        escalation.severity_reason = brief.severity_reason
        return escalation


@app.task(name=SUMMARIZE_TASK, bind=True, max_retries=2)
def summarize_escalation(self, escalation_id: int) -> int:  # type: ignore[no-untyped-def]
    """On a worker, so channels never load a model. With ``escalation_summary_writer=model`` the
    process's answer model writes the problem line; the default extractive writer needs no model."""
    from workers.tasks import answerer, database

    generate = None
    if settings().escalation_summary_writer == "model":
        model = answerer()

        def generate(messages: list[dict[str, str]]) -> str:
            return str(model.batcher.generate(messages, timeout_s=settings().answer_soft_limit_s).text)

    db = database()
    # The card first, so technicians see the escalation at once; the summary then updates it.
    _publish_quietly(db=db, escalation_id=escalation_id)
    summarize_escalation_now(db=db, settings=settings(), escalation_id=escalation_id, generate=generate)
    _publish_quietly(db=db, escalation_id=escalation_id)
    return escalation_id


def enqueue_summary(escalation_id: int) -> None:
    """By name, so channels (bot/) queue it without importing the model."""
    app.send_task(SUMMARIZE_TASK, args=[escalation_id], queue=LIGHT_QUEUE)


# --- delivery on the desk's platform ------------------------------------------------------------


def _worker_db() -> Database:
    from workers.tasks import database

    return database()


def _outbound(platform: str, settings: Settings):  # type: ignore[no-untyped-def]
    from bot.outbound import outbound_for

    return outbound_for(platform, settings)


def _reply_to(thread: str | None) -> str | None:
    # Telegram quotes a message id (the card, the employee's question); Slack threads are timestamps.
    return thread if thread and thread.isdigit() else None


def publish_card(*, db: Database, settings: Settings, escalation_id: int) -> str | None:
    """Post the escalation's card on its platform's desk, or update it where it is posted already.
    Returns the desk thread, or None where the platform has no desk here or another worker is posting."""
    from core import desk

    with db.session() as session:
        escalation = session.get(Escalation, escalation_id)
        if escalation is None:
            return None
        platform = desk.escalation_conversation(escalation).platform
        place = desk.desk_place(settings=settings, platform=platform)
        outbound = _outbound(platform, settings) if place else None
        if outbound is None or not hasattr(outbound, "post_card"):
            log.info("escalation %s: no %s desk configured here; it is on the CLI and web desk", escalation_id, platform)
            return None
        card = desk.card(session=session, escalation=escalation)
        posted = escalation.tech_thread is not None and escalation.desk_message_ref not in (None, desk.PENDING_REF)
        channel, ref, thread = escalation.tech_channel, escalation.desk_message_ref, escalation.tech_thread
        mine = False if posted else desk.begin_desk_post(session=session, escalation_id=escalation_id)
    if posted:
        outbound.update_card(card, channel=channel, ref=ref)
        return thread
    if not mine:
        return None
    try:
        thread, ref = outbound.post_card(card, channel=place)
    except Exception:
        with db.session() as session:
            desk.abandon_desk_post(session=session, escalation_id=escalation_id)
        raise
    with db.session() as session:
        desk.attach_desk_post(session=session, escalation_id=escalation_id, channel=place, thread=thread, message_ref=ref)
    log.info("escalation %s posted on the %s desk", escalation_id, platform)
    return thread


def _publish_quietly(*, db: Database, escalation_id: int) -> None:
    try:
        publish_card(db=db, settings=settings(), escalation_id=escalation_id)
    except Exception as err:  # the escalation is stored and on the CLI/web desk; the next update retries
        log.error("escalation %s: desk card not posted: %s", escalation_id, err)


def _desk_thread(*, db: Database, settings: Settings, escalation_id: int) -> tuple[str | None, str | None]:
    """(channel, thread) of the escalation's desk post, posting the card first if nobody has."""
    import time

    thread = publish_card(db=db, settings=settings, escalation_id=escalation_id)
    deadline = time.monotonic() + DESK_THREAD_WAIT_S
    while True:
        with db.session() as session:
            escalation = session.get(Escalation, escalation_id)
            if escalation is None:
                return None, None
            if escalation.tech_thread is not None:
                return escalation.tech_channel, escalation.tech_thread
            pending = escalation.desk_message_ref is not None
        if thread is None and not pending or time.monotonic() > deadline:
            return None, None
        time.sleep(0.2)


def deliver_post(*, db: Database, settings: Settings, post: Any) -> bool:
    """Post a ``core.desk.Post`` on its platform: to the employee's thread, or to the desk thread.
    Returns whether it was posted."""
    from core.conversations import platform_thread

    outbound = _outbound(post.platform, settings)
    if outbound is None:
        return False  # the console reads the desk's messages from SQL
    if post.to == "employee":
        thread = platform_thread(post.thread or "")
        outbound.send(channel=post.channel, thread=thread, text=post.text, reply_to=_reply_to(thread))
        return True
    channel, thread = post.channel, post.thread
    if not thread:
        channel, thread = _desk_thread(db=db, settings=settings, escalation_id=post.escalation_id)
    if not channel or not thread:
        log.info("escalation %s: no desk thread to post to on %s", post.escalation_id, post.platform)
        return False
    outbound.send(channel=channel, thread=thread, text=post.text, reply_to=_reply_to(thread))
    return True


def tell_desk(*, db: Database, settings: Settings, escalation_id: int, text: str) -> bool:
    """A line in the escalation's desk thread (claimed, resolved, a refused resolution)."""
    from core import desk
    from core.desk import Post

    with db.session() as session:
        escalation = session.get(Escalation, escalation_id)
        if escalation is None:
            return False
        platform = desk.escalation_conversation(escalation).platform
        post = Post("desk", escalation_id, platform, escalation.tech_channel, escalation.tech_thread, text)
    return deliver_post(db=db, settings=settings, post=post)


def deliver_ping(*, db: Database, settings: Settings, ping: DeskPing) -> bool:
    """An unclaimed ping to the desk (its thread, or the desk itself); an idle reminder to the
    assignee directly (a Slack DM, a Telegram private chat), on the escalation's platform."""
    from core import desk
    from core.schema import User

    outbound = _outbound(ping.platform, settings)
    if outbound is None:
        return False
    if ping.kind == "idle" and ping.technician_id is not None:
        with db.session() as session:
            technician = session.get(User, ping.technician_id)
            address = technician.external_id if technician is not None and technician.platform == ping.platform else None
        if address:
            outbound.send(channel=address, thread="", text=ping.text)
            return True
    channel = ping.channel or desk.desk_place(settings=settings, platform=ping.platform)
    if not channel:
        return False
    thread = ping.thread or ""
    outbound.send(channel=channel, thread=thread, text=ping.text, reply_to=_reply_to(thread))
    return True


@app.task(name=RESOLVE_TASK, bind=True, max_retries=2)
def resolve_escalation(self, escalation_id: int, technician: str, text: str, hours: Any = None,  # type: ignore[no-untyped-def]
                       machine: str | None = None) -> str | None:
    """A technician's Resolve from Slack or Telegram: ``core.desk.resolve`` on this worker, whose ticket
    index makes the fix findable by the very next question. A refused resolution is said on the desk."""
    from core import desk
    from core.errors import DeskError
    from workers.tasks import answerer, database

    db, model = database(), answerer()

    def run() -> tuple[str, list[Any], str]:
        # On the torch thread: the fix is embedded into the index the answers search.
        with db.session() as session:
            user = desk.user_by_key(session=session, key=technician)
            resolution = desk.resolve(session=session, settings=settings(), index=model.index,
                                      escalation_id=escalation_id, technician_id=user.id, text=text,
                                      hours=hours, machine=machine)
            return resolution.ticket_id, list(resolution.posts), desk.user_key(user)

    try:
        ticket_id, posts, who = model.batcher.call(run)
    except DeskError as err:
        log.info("escalation %s not resolved: %s", escalation_id, err)
        tell_desk(db=db, settings=settings(), escalation_id=escalation_id, text=str(err))
        return None
    for post in posts:
        try:
            deliver_post(db=db, settings=settings(), post=post)
        except Exception as err:  # resolved and stored either way; the employee sees it in the thread later
            log.error("escalation %s: resolution not delivered: %s", escalation_id, err)
    try:
        tell_desk(db=db, settings=settings(), escalation_id=escalation_id,
                  text=texts.DESK_RESOLVED_DESK.format(id=escalation_id, who=who, ticket=ticket_id))
    except Exception as err:
        log.error("escalation %s: desk not told of the resolution: %s", escalation_id, err)
    _publish_quietly(db=db, escalation_id=escalation_id)
    return ticket_id


def enqueue_resolve(*, escalation_id: int, technician: str, text: str, hours: Any = None,
                    machine: str | None = None) -> None:
    """By name, from the adapters (they hold no ticket index)."""
    app.send_task(RESOLVE_TASK, args=[escalation_id, technician, text, hours, machine], queue=LIGHT_QUEUE)


def _relay_sink(post: Any) -> None:
    """The answer path relayed an employee's message (core.desk.desk_takes): post it on the desk."""
    deliver_post(db=_worker_db(), settings=settings(), post=post)


def _register_sink() -> None:
    from core import desk

    desk.on_post(_relay_sink)


_register_sink()
