"""Celery tasks of the answer path and the periodic sweeper. Tasks take ids and own their DB session."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from core import texts
from core.conversations import store_reply
from core.db import Database
from core.schema import Message, MessageRole, MessageStatus, WorkerHeartbeat
from workers.app import ANSWER_QUEUE, app, settings
from workers.observability import ANSWER_LATENCY, ANSWERS, FAILURES, message_context, start_metrics

log = logging.getLogger(__name__)

_lock = threading.Lock()
_db: Database | None = None
_answerer = None  # workers.answering.Answerer, loaded once per process
_stats = {"answered": 0, "failed": 0, "in_flight": 0}


def database() -> Database:
    global _db
    with _lock:
        if _db is None:
            _db = Database.from_settings(settings())
        return _db


def answerer():  # type: ignore[no-untyped-def]
    """The process's model + index, loaded on first use (or at worker start, see below)."""
    global _answerer
    with _lock:
        if _answerer is None:
            from workers.answering import Answerer

            _answerer = Answerer(settings=settings(), db=_db or Database.from_settings(settings()))
        return _answerer


def _fail(message_id: int, reason: str, user_text: str) -> None:
    with database().session() as session:
        question = session.get(Message, message_id)
        if question is not None and question.role == MessageRole.user:
            store_reply(
                session=session,
                question=question,
                text=user_text,
                model_version="supportbot-rules",
                status=MessageStatus.failed,
                error=reason,
            )


@app.task(name="supportbot.answer", bind=True, max_retries=2)
def answer(self, message_id: int) -> int | None:  # type: ignore[no-untyped-def]
    with message_context(message_id=message_id):
        return _answer(self, message_id)


def _answer(task, message_id: int) -> int | None:  # type: ignore[no-untyped-def]
    _stats["in_flight"] += 1
    try:
        reply = answerer().answer(message_id)
        if reply is not None:
            _stats["answered"] += 1
            ANSWERS.labels(status="failed" if reply.error else "answered").inc()
            if reply.latency_ms is not None:
                ANSWER_LATENCY.observe(reply.latency_ms / 1000.0)
        return reply.id if reply is not None else None
    except SoftTimeLimitExceeded:
        ref = uuid.uuid4().hex[:8]
        log.error("message %s hit the soft time limit (ref %s)", message_id, ref)
        _fail(message_id, f"soft time limit (ref {ref})", texts.TIMED_OUT.format(ref=ref))
        _stats["failed"] += 1
        FAILURES.labels(kind="time_limit").inc()
        return None
    except Exception as err:
        # A poison message must not loop or kill the worker: retry a little, then end failed and tell the user.
        ref = uuid.uuid4().hex[:8]
        if task.request.retries < task.max_retries:
            log.warning("message %s failed (%s), retrying (ref %s)", message_id, err, ref)
            FAILURES.labels(kind="retried").inc()
            raise task.retry(exc=err, countdown=1 + task.request.retries) from err
        log.exception("message %s failed for good (ref %s)", message_id, ref)
        _fail(message_id, f"{type(err).__name__}: {err} (ref {ref})", texts.FAILED.format(ref=ref))
        _stats["failed"] += 1
        FAILURES.labels(kind="poison").inc()
        return None
    finally:
        _stats["in_flight"] -= 1


def enqueue_answer(message_id: int) -> None:
    """Queue a stored message for answering (by task name: callers need not import the model)."""
    app.send_task("supportbot.answer", args=[message_id], queue=ANSWER_QUEUE)


@app.task(name="supportbot.light.sweep")
def sweep(max_age_s: float = 120.0) -> int:
    """Re-queue user messages left unanswered past ``max_age_s`` (lost task, dead worker, broker restart)."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=max_age_s)
    requeued = 0
    with database().session() as session:
        stuck = session.scalars(
            select(Message).where(
                Message.role == MessageRole.user,
                Message.status.in_([MessageStatus.received, MessageStatus.queued, MessageStatus.answering]),
                Message.updated_at < cutoff,
            )
        ).all()
        for message in stuck:
            message.status = MessageStatus.queued
            message.updated_at = datetime.now(timezone.utc)
            requeued += 1
            enqueue_answer(message.id)
    if requeued:
        log.warning("sweeper re-queued %d unanswered messages", requeued)
    return requeued


# --- worker lifecycle: load the model before taking tasks, and report liveness -------------------


def _heartbeat_loop(name: str, queues: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with database().session() as session:
                row = session.get(WorkerHeartbeat, name)
                if row is None:
                    row = WorkerHeartbeat(
                        name=name, hostname=socket.gethostname(), pid=os.getpid(), queues=queues
                    )
                    session.add(row)
                row.seen_at = datetime.now(timezone.utc)
                row.model_version = _answerer.model.version if _answerer is not None else None
                row.state = dict(_stats, ready=_answerer is not None or ANSWER_QUEUE not in queues)
        except Exception as err:  # liveness reporting must never take the worker down
            log.warning("heartbeat failed: %s", err)
        stop.wait(2.0)


_stop = threading.Event()


@signals.worker_ready.connect
def _on_ready(sender=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    queues = ",".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values())) if sender else ""
    name = sender.hostname if sender else f"worker@{socket.gethostname()}"
    started = time.monotonic()
    start_metrics(settings())
    if ANSWER_QUEUE in queues.split(","):
        threading.Thread(target=_heartbeat_loop, args=(name, queues, _stop), daemon=True).start()
        answerer()  # load before the first task so the first answer is not a cold start
        log.info("worker %s ready in %.1f s", name, time.monotonic() - started)
    else:
        threading.Thread(target=_heartbeat_loop, args=(name, queues, _stop), daemon=True).start()


@signals.worker_shutdown.connect
def _on_shutdown(**_kwargs) -> None:  # type: ignore[no-untyped-def]
    _stop.set()
