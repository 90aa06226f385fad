"""`supportbot status`: workers, queue depths, active model version, recent errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select

from core.db import Database
from core.schema import (
    Message,
    MessageRole,
    MessageStatus,
    ModelStatus,
    ModelVersion,
    WorkerHeartbeat,
    as_utc,
)
from core.settings import Settings
from workers.app import ANSWER_QUEUE, LIGHT_QUEUE, TRAIN_QUEUE

QUEUES = (ANSWER_QUEUE, LIGHT_QUEUE, TRAIN_QUEUE)
ALIVE_S = 15.0  # as workers.tasks.HEARTBEAT_STALE_S: older heartbeats are dead workers
# kombu's Redis transport keeps one list per priority step: "answer", "answer\x06\x163", ...
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Tasks waiting in each broker queue (None when the broker can't be asked)."""
    if settings.embedded_broker:
        # The file broker keeps one file per message, "<ms>_<uuid>.<queue>.msg"; kombu matches the
        # part after the first dot the same way when it takes one.
        folder = settings.broker_dir / "in"
        try:
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        except OSError:
            return dict.fromkeys(QUEUES)
        suffixes = [n.partition(".")[2] for n in names]
        return {q: suffixes.count(f"{q}.msg") for q in QUEUES}
    try:
        import redis

        client = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            with client.pipeline(transaction=False) as pipe:
                for q in QUEUES:
                    for step in _REDIS_PRIORITY_STEPS:
                        pipe.llen(f"{q}{_REDIS_PRIORITY_SEP}{step}" if step else q)
                lengths = pipe.execute()
        finally:
            client.close()
    except Exception:
        return dict.fromkeys(QUEUES)
    n = len(_REDIS_PRIORITY_STEPS)
    return {q: int(sum(lengths[i * n : (i + 1) * n])) for i, q in enumerate(QUEUES)}


def reserved_tasks(settings: Settings) -> int | None:
    """Redis: tasks taken by workers and not yet acknowledged (they return if their worker dies)."""
    if settings.embedded_broker:
        return None
    try:
        import redis

        client = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.hlen("unacked"))
        finally:
            client.close()
    except Exception:
        return None


def collect(settings: Settings) -> dict[str, Any]:
    db = Database.from_settings(settings)
    now = datetime.now(timezone.utc)
    with db.session() as session:
        workers = []
        for row in session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.name)).all():
            seen = as_utc(row.seen_at)
            workers.append(
                {
                    "name": row.name,
                    "pid": row.pid,
                    "queues": row.queues,
                    "model_version": row.model_version,
                    "alive": (now - seen).total_seconds() < ALIVE_S,
                    "seen_s_ago": round((now - seen).total_seconds(), 1),
                    **row.state,
                }
            )
        counts = dict(
            session.execute(
                select(Message.status, func.count())
                .where(Message.role == MessageRole.user)
                .group_by(Message.status)
            ).all()
        )
        active = session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.active))
        errors = session.scalars(
            select(Message)
            .where(Message.error.is_not(None), Message.updated_at > now - timedelta(days=1))
            .where(Message.status.in_([MessageStatus.failed, MessageStatus.held]))
            .order_by(Message.id.desc())
            .limit(10)
        ).all()
        waiting = session.scalars(
            select(Message)
            .where(
                Message.role == MessageRole.user,
                Message.status.in_([MessageStatus.received, MessageStatus.queued, MessageStatus.answering]),
            )
            .order_by(Message.id)
            .limit(500)
        ).all()
        delayed = [
            {
                "message_id": m.id,
                "conversation_id": m.conversation_id,
                "status": m.status.value,
                "since": m.meta["delayed"].get("at"),
                "requeues": m.meta.get("requeues", 0),
            }
            for m in waiting
            if isinstance(m.meta, dict) and isinstance(m.meta.get("delayed"), dict)
        ]
        latencies = session.scalars(
            select(Message.latency_ms)
            .where(Message.role == MessageRole.assistant, Message.latency_ms.is_not(None))
            .order_by(Message.id.desc())
            .limit(200)
        ).all()
        # How often the model's text was dropped for a ticket's (fallback) or changed by the output check
        # (flagged), over the last week's answers: the admin's first sign that the model needs training.
        week = now - timedelta(days=7)
        total, fallback, flagged = session.execute(
            select(
                func.count(Message.id),
                func.count(Message.id).filter(Message.fallback.is_(True)),
                func.count(Message.id).filter(Message.flagged.is_(True)),
            ).where(
                Message.role == MessageRole.assistant,
                Message.model_version != "supportbot-rules",  # intake's own replies (empty, binary, held)
                Message.created_at > week,
                Message.status.in_([MessageStatus.answered, MessageStatus.sent]),
            )
        ).one()
    lat = sorted(latencies)
    return {
        "answers_7d": {
            "total": int(total or 0),
            "fallback": int(fallback or 0),
            "flagged": int(flagged or 0),
            "fallback_rate": round(fallback / total, 3) if total else None,
        },
        "workers": [w for w in workers if w["alive"]],
        "queues": queue_depths(settings),
        "reserved": reserved_tasks(settings),
        "delayed": delayed,
        "messages": {k.value if hasattr(k, "value") else str(k): v for k, v in counts.items()},
        "active_model": active.name if active else None,
        "latency_ms": {
            "p50": lat[len(lat) // 2] if lat else None,
            "p95": lat[int(len(lat) * 0.95)] if lat else None,
            "n": len(lat),
        },
        "recent_errors": [{"message_id": m.id, "status": m.status.value, "error": m.error} for m in errors],
    }


def render(report: dict[str, Any]) -> str:
    lines = ["workers:"]
    for w in report["workers"] or []:
        lines.append(f"  {w['name']} pid={w['pid']} queues={w['queues']} model={w['model_version']}")
    if not report["workers"]:
        lines.append("  none alive")
    depths = ", ".join(f"{k}={'?' if v is None else v}" for k, v in report["queues"].items())
    if report.get("reserved") is not None:
        depths += f" (taken by workers, not yet acknowledged: {report['reserved']})"
    lines.append("queues: " + depths)
    lines.append("messages: " + ", ".join(f"{k}={v}" for k, v in sorted(report["messages"].items())))
    lines.append(f"active model: {report['active_model'] or 'base (no adapter)'}")
    answers = report.get("answers_7d") or {}
    if answers.get("total"):
        lines.append(
            f"answers (7 days): {answers['total']}, model text dropped for the ticket's fix (fallback) "
            f"{answers['fallback']} ({answers['fallback_rate']:.0%}), changed by the output check {answers['flagged']}"
        )
    lat = report["latency_ms"]
    if lat["n"]:
        lines.append(f"answer latency: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms over {lat['n']}")
    if report.get("delayed"):
        lines.append("delayed (the user was told the answer is late):")
        lines += [
            f"  message {d['message_id']} ({d['status']}) since {d['since']}, re-queued {d['requeues']}x"
            for d in report["delayed"]
        ]
    if report["recent_errors"]:
        lines.append("recent errors:")
        lines += [
            f"  message {e['message_id']} ({e['status']}): {e['error']}" for e in report["recent_errors"]
        ]
    return "\n".join(lines)
