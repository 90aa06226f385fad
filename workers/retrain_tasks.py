"""Retraining asked for in chat or due on schedule (model/retrain.py), and its report back to admins.

``supportbot.retrain`` runs on the ``train`` queue (one at a time); ``supportbot.light.retrain_check``
is the beat's: it queues a retrain when enough ratings are newer than the last run. The report goes
to the admin who asked (a Slack DM, a Telegram private chat) or, for the beat, to every admin listed
in the settings.
"""

from __future__ import annotations

import logging
from typing import Any

from core.roles import FAILED, SUCCEEDED, record
from core.schema import Role
from workers.app import TRAIN_QUEUE, app, settings

log = logging.getLogger(__name__)

RETRAIN_TASK = "supportbot.retrain"
BEAT_ACTOR = "beat:schedule"  # the operator's schedule; configured by whoever runs supportbot (an admin)


def enqueue_retrain(*, requested_by: str, targets: list[dict[str, str]]) -> None:
    """Queue a retrain by task name, so the chat adapters need not import the training code."""
    app.send_task(RETRAIN_TASK, args=[requested_by, targets], queue=TRAIN_QUEUE)


def admin_targets(current: Any) -> list[dict[str, str]]:
    """Where to tell every admin named in the settings (``slack:U…`` / ``telegram:N``)."""
    targets = []
    for qualified in current.admins:
        platform, _, external_id = qualified.partition(":")
        if platform in ("slack", "telegram"):
            targets.append({"platform": platform, "user": external_id})
    return targets


@app.task(name=RETRAIN_TASK, acks_late=True, ignore_result=True)
def retrain_task(requested_by: str, targets: list[dict[str, str]]) -> dict[str, Any]:
    from core.db import Database
    from model.retrain import run_retrain

    current = settings()
    database = Database.from_settings(current)
    report = run_retrain(settings=current, database=database, requested_by=requested_by)
    with database.session() as session:
        record(session=session, actor=requested_by if ":" in requested_by else BEAT_ACTOR, role=Role.admin,
               action="retrain", result=FAILED if report["status"] == "failed" else SUCCEEDED,
               detail=f"{report['status']} {report.get('version', '')} gate "
                      f"{(report.get('gate') or {}).get('passed')}")  # fmt: skip
    for target in targets:
        try:
            deliver_report(current, target, report)
        except Exception:  # one unreachable admin must not keep the others from hearing
            log.exception("could not send the retrain report to %s", target)
    return {k: v for k, v in report.items() if k != "table"}


def deliver_report(current: Any, target: dict[str, str], report: dict[str, Any]) -> None:
    from bot.outbound import outbound_for

    outbound = outbound_for(target["platform"], current)
    if outbound is None:
        log.warning("no %s token in this worker: the retrain report for %s stays unsent", target["platform"], target)
        return
    if target["platform"] == "slack":
        from bot.slack.admin import send_report

        send_report(outbound.client, user=target["user"], report=report)  # type: ignore[attr-defined]
    else:
        from bot.telegram.admin import send_report as send_telegram_report

        send_telegram_report(outbound, chat_id=int(target["user"]), report=report)


@app.task(name="supportbot.light.retrain_check", ignore_result=True)
def retrain_check() -> dict[str, Any]:
    """The beat: a retrain when at least ``retrain_min_new_ratings`` ratings are newer than the last run."""
    from core.db import Database

    current = settings()
    return check_due(settings=current, database=Database.from_settings(current), enqueue=enqueue_retrain)


def check_due(*, settings: Any, database: Any, enqueue: Any) -> dict[str, Any]:
    from sqlalchemy import func, select

    from core.schema import AuditEntry
    from model.retrain import last_run_at, new_ratings, run_in_progress

    with database.session() as session:
        # Counted from the last run, or from the beat's last retrain when that one found nothing to
        # train on (it created no run): otherwise the same ratings would queue a retrain every check.
        last_queued = session.scalar(select(func.max(AuditEntry.at)).where(
            AuditEntry.actor == BEAT_ACTOR, AuditEntry.action == "retrain", AuditEntry.result == "allowed"))
        since = max((t for t in (last_run_at(session=session), last_queued) if t is not None), default=None)
        count = new_ratings(session=session, since=since)
        busy = run_in_progress(session=session) is not None
        if busy or count < settings.retrain_min_new_ratings:
            return {"queued": False, "new_ratings": count, "busy": busy}
        record(session=session, actor=BEAT_ACTOR, role=Role.admin, action="retrain", result="allowed",
               detail=f"{count} new ratings (threshold {settings.retrain_min_new_ratings})")  # fmt: skip
    enqueue(requested_by=BEAT_ACTOR, targets=admin_targets(settings))
    log.info("scheduled retrain queued: %d new ratings", count)
    return {"queued": True, "new_ratings": count, "busy": False}
