"""`supportbot status`: workers, queue depths, active model version, recent errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select

from core.db import Database
from core.schema import Message, MessageRole, MessageStatus, ModelStatus, ModelVersion, WorkerHeartbeat
from core.settings import Settings
from workers.app import ANSWER_QUEUE, LIGHT_QUEUE, TRAIN_QUEUE


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each broker queue (None when the broker can't be asked)."""
    queues = (ANSWER_QUEUE, LIGHT_QUEUE, TRAIN_QUEUE)
    if settings.embedded_broker:
        # The file broker keeps one file per message, named after its queue's exchange.
        folder = settings.broker_dir / "in"
        files = [p.name for p in folder.glob("*.msg")] if folder.is_dir() else []
        return {q: sum(1 for f in files if f"_{q}." in f or f.endswith(f".{q}.msg")) for q in queues}
    try:
        import redis

        client = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2)
        return {q: int(client.llen(q)) for q in queues}
    except Exception:
        return dict.fromkeys(queues)


def collect(settings: Settings) -> dict[str, Any]:
    db = Database.from_settings(settings)
    now = datetime.now(timezone.utc)
    with db.session() as session:
        workers = []
        for row in session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.name)).all():
            seen = row.seen_at if row.seen_at.tzinfo else row.seen_at.replace(tzinfo=timezone.utc)
            workers.append(
                {
                    "name": row.name,
                    "pid": row.pid,
                    "queues": row.queues,
                    "model_version": row.model_version,
                    "alive": (now - seen).total_seconds() < 10,
                    "seen_s_ago": round((now - seen).total_seconds(), 1),
                    **row.state,
                }
            )
        counts = dict(
            session.execute(
                select(Message.status, func.count()).where(Message.role == MessageRole.user).group_by(Message.status)
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
        latencies = session.scalars(
            select(Message.latency_ms)
            .where(Message.role == MessageRole.assistant, Message.latency_ms.is_not(None))
            .order_by(Message.id.desc())
            .limit(200)
        ).all()
    lat = sorted(latencies)
    return {
        "workers": [w for w in workers if w["alive"]],
        "queues": queue_depths(settings),
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
    lines.append("queues: " + ", ".join(f"{k}={v}" for k, v in report["queues"].items()))
    lines.append("messages: " + ", ".join(f"{k}={v}" for k, v in sorted(report["messages"].items())))
    lines.append(f"active model: {report['active_model'] or 'base (no adapter)'}")
    lat = report["latency_ms"]
    if lat["n"]:
        lines.append(f"answer latency: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms over {lat['n']}")
    if report["recent_errors"]:
        lines.append("recent errors:")
        lines += [f"  message {e['message_id']} ({e['status']}): {e['error']}" for e in report["recent_errors"]]
    return "\n".join(lines)
