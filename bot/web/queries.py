"""What the console pages show, read with a few aggregate SQL queries (portable: SQLite and PostgreSQL).

Each function takes a session and returns plain dicts and lists for the templates. Counting happens in
SQL; only latencies come back row by row, because percentiles are not portable SQL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import case, exists, func, literal, select
from sqlalchemy.orm import Session, aliased

from core.schema import (
    Conversation,
    Escalation,
    EscalationStatus,
    Message,
    MessageRole,
    MessageStatus,
    ModelVersion,
    Rating,
    TrainingRun,
    as_utc,
)

OUTCOMES = ("answered", "escalated", "fallback", "failed", "pending")
PAGE_SIZE = 50


def _day(value: Any) -> str:
    """func.date() is a string on SQLite and a date on PostgreSQL."""
    return value.isoformat() if isinstance(value, date) else str(value)[:10]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def since(days: int) -> datetime:
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


def day_labels(days: int) -> list[str]:
    start = since(days).date()
    return [(start + timedelta(days=i)).isoformat() for i in range(days)]


def overview(*, session: Session, days: int = 30) -> dict[str, Any]:
    start = since(days)
    labels = day_labels(days)
    question, reply = aliased(Message), aliased(Message)
    # A join on the escalated question ids, not a correlated EXISTS: that one scans escalations once per
    # question (2.6 s at 10,000 conversations on SQLite, against 0.1 s for the join).
    escalated = select(Escalation.message_id).where(Escalation.message_id.is_not(None)).distinct().subquery()
    outcome = case(
        (escalated.c.message_id.is_not(None), literal("escalated")),
        (question.status == MessageStatus.failed, literal("failed")),
        (reply.fallback.is_(True), literal("fallback")),
        (reply.id.is_not(None), literal("answered")),
        else_=literal("pending"),
    )
    day = func.date(question.created_at)
    rows = session.execute(
        select(day, outcome, func.count())
        .select_from(question)
        .outerjoin(reply, reply.reply_to_id == question.id)
        .outerjoin(escalated, escalated.c.message_id == question.id)
        .where(question.role == MessageRole.user, question.created_at >= start)
        .group_by(day, outcome)
    ).all()
    per_day = {name: dict.fromkeys(labels, 0) for name in OUTCOMES}
    totals = dict.fromkeys(OUTCOMES, 0)
    for d, name, count in rows:
        label = _day(d)
        if label in per_day[name]:
            per_day[name][label] += count
        totals[name] += count

    rday = func.date(Rating.created_at)
    ratings = session.execute(
        select(rday, func.sum(case((Rating.value > 0, 1), else_=0)), func.count())
        .where(Rating.created_at >= start)
        .group_by(rday)
    ).all()
    thumbs = {label: None for label in labels}  # type: dict[str, float | None]
    good_total = rated_total = 0
    for d, good, count in ratings:
        if _day(d) in thumbs and count:
            thumbs[_day(d)] = round(100.0 * (good or 0) / count, 1)
        good_total += good or 0
        rated_total += count

    aday = func.date(Message.created_at)
    latency_rows = session.execute(
        select(aday, Message.latency_ms).where(
            Message.role == MessageRole.assistant, Message.created_at >= start, Message.latency_ms.is_not(None)
        )
    ).all()
    by_day: dict[str, list[float]] = {label: [] for label in labels}
    every: list[float] = []
    for d, ms in latency_rows:
        by_day.setdefault(_day(d), []).append(ms)
        every.append(ms)
    p50 = [_seconds(percentile(by_day[label], 0.5)) for label in labels]
    p95 = [_seconds(percentile(by_day[label], 0.95)) for label in labels]
    questions = sum(totals.values())
    return {
        "days": days,
        "labels": labels,
        "per_day": {name: [per_day[name][label] for label in labels] for name in OUTCOMES},
        "totals": totals,
        "questions": questions,
        "thumbs": [thumbs[label] for label in labels],
        "thumbs_up_rate": round(100.0 * good_total / rated_total, 1) if rated_total else None,
        "ratings": rated_total,
        "p50": p50,
        "p95": p95,
        "p50_all": _seconds(percentile(every, 0.5)),
        "p95_all": _seconds(percentile(every, 0.95)),
    }


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000.0, 3)


@dataclass(frozen=True)
class ConversationFilter:
    rating: str = ""  # good, bad, unrated
    platform: str = ""
    escalated: str = ""  # yes, no
    date_from: date | None = None
    date_to: date | None = None
    page: int = 1


def conversations(*, session: Session, where: ConversationFilter) -> dict[str, Any]:
    query = select(Conversation.id, Conversation.platform, Conversation.created_at)
    rated = select(Rating.id).join(Message, Message.id == Rating.message_id).where(
        Message.conversation_id == Conversation.id
    )
    if where.rating == "good":
        query = query.where(rated.where(Rating.value > 0).exists())
    elif where.rating == "bad":
        query = query.where(rated.where(Rating.value < 0).exists())
    elif where.rating == "unrated":
        query = query.where(~rated.exists())
    if where.platform:
        query = query.where(Conversation.platform == where.platform)
    escalation = exists().where(Escalation.conversation_id == Conversation.id)
    if where.escalated == "yes":
        query = query.where(escalation)
    elif where.escalated == "no":
        query = query.where(~escalation)
    if where.date_from:
        query = query.where(Conversation.created_at >= datetime.combine(where.date_from, datetime.min.time(), timezone.utc))
    if where.date_to:
        end = datetime.combine(where.date_to + timedelta(days=1), datetime.min.time(), timezone.utc)
        query = query.where(Conversation.created_at < end)
    page = max(1, where.page)
    rows = session.execute(
        query.order_by(Conversation.id.desc()).limit(PAGE_SIZE + 1).offset((page - 1) * PAGE_SIZE)
    ).all()
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    ids = [r.id for r in rows]
    first_question: dict[int, str] = {}
    counts: dict[int, int] = {}
    versions: dict[int, str] = {}
    if ids:
        for conv_id, text, role, version in session.execute(
            select(Message.conversation_id, Message.text, Message.role, Message.model_version)
            .where(Message.conversation_id.in_(ids))
            .order_by(Message.id)
        ):
            counts[conv_id] = counts.get(conv_id, 0) + 1
            if role == MessageRole.user and conv_id not in first_question:
                first_question[conv_id] = text
            if version:
                versions[conv_id] = version
    votes: dict[int, tuple[int, int]] = {}
    if ids:
        for conv_id, good, bad in session.execute(
            select(
                Message.conversation_id,
                func.sum(case((Rating.value > 0, 1), else_=0)),
                func.sum(case((Rating.value < 0, 1), else_=0)),
            )
            .join(Rating, Rating.message_id == Message.id)
            .where(Message.conversation_id.in_(ids))
            .group_by(Message.conversation_id)
        ):
            votes[conv_id] = (int(good or 0), int(bad or 0))
    escalated_ids = set()
    if ids:
        escalated_ids = set(session.scalars(select(Escalation.conversation_id).where(Escalation.conversation_id.in_(ids))))
    platforms = sorted(session.scalars(select(Conversation.platform).distinct()))
    return {
        "rows": [
            {
                "id": r.id,
                "platform": r.platform,
                "created_at": _when(r.created_at),
                "question": _clip(first_question.get(r.id, ""), 120),
                "messages": counts.get(r.id, 0),
                "good": votes.get(r.id, (0, 0))[0],
                "bad": votes.get(r.id, (0, 0))[1],
                "escalated": r.id in escalated_ids,
                "model_version": versions.get(r.id, ""),
            }
            for r in rows
        ],
        "page": page,
        "more": more,
        "platforms": platforms,
    }


def conversation(*, session: Session, conversation_id: int) -> dict[str, Any] | None:
    conv = session.get(Conversation, conversation_id)
    if conv is None:
        return None
    messages = list(session.scalars(select(Message).where(Message.conversation_id == conv.id).order_by(Message.id)))
    ratings: dict[int, list[Rating]] = {}
    for rating in session.scalars(select(Rating).where(Rating.message_id.in_([m.id for m in messages]))):
        ratings.setdefault(rating.message_id, []).append(rating)
    escalations = list(session.scalars(select(Escalation).where(Escalation.conversation_id == conv.id)))
    # Users appear by a per-conversation number, never by their platform id: the transcript is anonymized.
    speakers: dict[int, str] = {}
    shown = []
    for m in messages:
        who = m.role.value
        if m.user_id is not None and m.role in (MessageRole.user, MessageRole.technician):
            who = f"{m.role.value} {speakers.setdefault(m.user_id, str(len(speakers) + 1))}"
        shown.append(
            {
                "id": m.id,
                "role": m.role.value,
                "who": who,
                "text": m.text,
                "status": m.status.value,
                "created_at": _when(m.created_at),
                "model_version": m.model_version,
                "sources": list(m.sources or []),
                "confidence": m.confidence,
                "latency_s": _seconds(m.latency_ms),
                "fallback": m.fallback,
                "flagged": m.flagged,
                "error": m.error,
                "ratings": [
                    {"value": "👍" if r.value > 0 else "👎", "reason": r.reason, "at": _when(r.created_at)}
                    for r in ratings.get(m.id, [])
                ],
            }
        )
    return {
        "id": conv.id,
        "platform": conv.platform,
        "created_at": _when(conv.created_at),
        "messages": shown,
        "escalations": [_escalation(e) for e in escalations],
    }


def _escalation(e: Escalation) -> dict[str, Any]:
    # claimed_at arrives with the desk (migration 0003); older schemas simply have none.
    claimed = getattr(e, "claimed_at", None)
    created = as_utc(e.created_at) if e.created_at else None
    return {
        "id": e.id,
        "conversation_id": e.conversation_id,
        "status": e.status.value,
        "summary": _clip(e.summary or "", 160),
        "created_at": _when(e.created_at),
        "claimed_at": _when(claimed),
        "resolved_at": _when(e.resolved_at),
        "to_claim_h": _hours(created, claimed),
        "to_resolve_h": _hours(created, e.resolved_at),
    }


def escalations(*, session: Session, status: str = "", limit: int = 200) -> dict[str, Any]:
    counts = {s.value: 0 for s in EscalationStatus}
    for status_value, count in session.execute(select(Escalation.status, func.count()).group_by(Escalation.status)):
        counts[status_value.value] = count
    query = select(Escalation).order_by(Escalation.id.desc()).limit(limit)
    if status in counts:
        query = query.where(Escalation.status == EscalationStatus(status))
    rows = [_escalation(e) for e in session.scalars(query)]
    claims = [r["to_claim_h"] for r in rows if r["to_claim_h"] is not None]
    resolves = [r["to_resolve_h"] for r in rows if r["to_resolve_h"] is not None]
    return {
        "counts": counts,
        "rows": rows,
        "median_to_claim_h": _round(percentile(claims, 0.5)),
        "median_to_resolve_h": _round(percentile(resolves, 0.5)),
        "tracks_claims": hasattr(Escalation, "claimed_at"),
    }


def training_runs(*, session: Session, limit: int = 50) -> list[dict[str, Any]]:
    names = dict(session.execute(select(ModelVersion.id, ModelVersion.name)).all())
    return [
        {
            "id": run.id,
            "status": run.status.value,
            "version": names.get(run.model_version_id) or (run.metrics or {}).get("version"),
            "step": (run.metrics or {}).get("step"),
            "total_steps": (run.metrics or {}).get("total_steps"),
            "val_loss": (run.metrics or {}).get("val_loss"),
            "base_val_loss": (run.metrics or {}).get("base_val_loss"),
            "created_at": _when(run.created_at),
            "finished_at": _when(run.finished_at),
            "error": run.error,
        }
        for run in session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit))
    ]


def training_run(*, session: Session, run_id: int) -> dict[str, Any] | None:
    run = session.get(TrainingRun, run_id)
    if run is None:
        return None
    metrics = dict(run.metrics or {})
    history = _history(run.output_dir) or ([metrics] if "loss" in metrics else [])
    version = session.get(ModelVersion, run.model_version_id) if run.model_version_id else None
    evaluation = []
    if version is not None:
        vm = version.metrics or {}
        evaluation.append(("base (before training)", vm.get("base_val_loss")))
        evaluation.append((f"{version.name} (after training)", vm.get("val_loss")))
        gate = vm.get("gate") or {}
        if gate.get("candidate_score") is not None:
            evaluation.append((f"gate reference: {gate.get('reference')}", gate.get("reference_score")))
            evaluation.append((f"gate candidate: {version.name}", gate.get("candidate_score")))
    return {
        "id": run.id,
        "status": run.status.value,
        "data_dir": run.data_dir,
        "output_dir": run.output_dir,
        "config": run.config or {},
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        "steps": [h.get("step") for h in history],
        "loss": [h.get("loss") for h in history],
        "val_loss": [h.get("val_loss") for h in history],
        "version": version.name if version else None,
        "version_status": version.status.value if version else None,
        "gate": (version.metrics or {}).get("gate") if version else None,
        "evaluation": evaluation,
        "error": run.error,
    }


def _history(output_dir: str | None) -> list[dict[str, Any]]:
    """The per-step record model/train.py writes to training.json beside the adapter."""
    if not output_dir:
        return []
    path = Path(output_dir) / "training.json"
    try:
        history = json.loads(path.read_text()).get("history") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [h for h in history if isinstance(h, dict)]


def _when(value: datetime | None) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M") if value else ""


def _hours(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((as_utc(end) - start).total_seconds() / 3600.0, 2)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

