"""Desk tasks: the escalation summary (model, on a worker) and the follow-up pings (beat).

Both take ids or nothing and own their session. The pings are returned and logged here; posting them
to Slack/Telegram is the outbound port's job (the channels read ``DeskPing`` rows from the result).
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

    summarize_escalation_now(db=database(), settings=settings(), escalation_id=escalation_id, generate=generate)
    return escalation_id


def enqueue_summary(escalation_id: int) -> None:
    """By name, so channels (bot/) queue it without importing the model."""
    app.send_task(SUMMARIZE_TASK, args=[escalation_id], queue=LIGHT_QUEUE)
