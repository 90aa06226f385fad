"""Celery tasks of the answer path and the periodic sweeper. Tasks take ids and own their DB session.

How a question is answered exactly once, whatever the broker does:

- the answer task first *claims* the message: a compare-and-swap on the row (status -> answering) that
  commits together with this worker's heartbeat row listing the message as in flight. A second
  delivery (platform retry, Redis visibility timeout, sweeper re-queue) finds the claim of a live worker
  and steps aside instead of generating the answer a second time;
- the reply itself is stored under the unique ``messages.reply_to_id`` (``store_reply``), so even two
  racing generations end in one answer;
- a worker that dies (kill -9, OOM) stops heartbeating; its claims go stale and the sweeper re-queues
  the message. A message that keeps failing or crashing workers is given up after ``MAX_ATTEMPTS``
  and the user is told, so a poison message never loops forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import texts
from core.conversations import answer_for, store_reply
from core.db import Database
from core.schema import Conversation, Message, MessageRole, MessageStatus, WorkerHeartbeat, as_utc, utcnow
from workers.app import ANSWER_QUEUE, LIGHT_QUEUE, app, settings
from workers.observability import (
    ANSWER_LATENCY,
    ANSWERS,
    FAILURES,
    SWEEPER,
    conversation_id_var,
    message_context,
    start_metrics,
)

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 2.0
# A worker whose heartbeat is older than this is taken for dead and its claims are free to take over.
# Generous: under CPU pressure a live worker's heartbeat thread can lag by several seconds.
HEARTBEAT_STALE_S = 15.0
# Deliveries that reached the model (messages.attempts) before a message is declared poison.
MAX_ATTEMPTS = 4
# Sweeper re-queues of one message before it is given up (the wait doubles each time).
MAX_REQUEUES = 6

_lock = threading.Lock()  # guards the model load
_db_lock = threading.Lock()
_claim_lock = threading.Lock()
_db: Database | None = None
_answerer = None  # workers.answering.Answerer, loaded once per process
_stats = {"answered": 0, "failed": 0, "duplicates": 0}
_in_flight: set[int] = set()  # message ids this process is answering now
_worker_name: str | None = None


def database() -> Database:
    global _db
    with _db_lock:  # not the model lock: heartbeats must flow while the model loads
        if _db is None:
            _db = Database.from_settings(settings())
        return _db


def answerer():  # type: ignore[no-untyped-def]
    """The process's model + index, loaded on first use (or at worker start, see below)."""
    global _answerer
    db = database()
    with _lock:
        if _answerer is None:
            from workers.answering import Answerer

            _answerer = Answerer(settings=settings(), db=db)
        return _answerer


def _fail(message_id: int, reason: str, user_text: str, *, db: Database | None = None) -> None:
    """End a message failed with a reason; the user reads ``user_text`` (never silence)."""
    with (db or database()).session() as session:
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


# --- claims: who is answering what --------------------------------------------------------------


class Claim(Enum):
    claimed = "claimed"  # this worker answers it now
    done = "done"  # answered already (duplicate delivery)
    busy = "busy"  # a live worker is answering it; this delivery steps aside
    skip = "skip"  # not a user message, or held for review
    gave_up = "gave_up"  # failed too often; ended failed, user told


def workers_answering(session: Session, *, exclude: str | None = None) -> set[int]:
    """Message ids that live workers (other than ``exclude``) list as in flight."""
    fresh = utcnow() - timedelta(seconds=HEARTBEAT_STALE_S)
    ids: set[int] = set()
    for row in session.scalars(select(WorkerHeartbeat)).all():
        if row.name == exclude or as_utc(row.seen_at) < fresh or _died_here(row):
            continue
        ids.update(int(i) for i in (row.state or {}).get("in_flight_ids", []))
    return ids


def _died_here(row: WorkerHeartbeat) -> bool:
    """A worker of this host whose process is gone: its claims are free now, not after HEARTBEAT_STALE_S.

    (A host name shared by several containers could mistake a live worker elsewhere for a dead one; the
    cost is one extra generation, never a second reply: ``store_reply`` keeps the first.)
    """
    if row.hostname != socket.gethostname() or not row.pid or row.pid == os.getpid():
        return False
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _publish_heartbeat(session: Session, name: str, queues: str | None = None) -> None:
    row = session.get(WorkerHeartbeat, name)
    if row is None:
        row = WorkerHeartbeat(name=name, hostname=socket.gethostname(), pid=os.getpid(), queues=queues or "")
        session.add(row)
    if queues is not None:
        row.queues = queues
    row.pid = os.getpid()
    row.seen_at = utcnow()
    row.model_version = _answerer.model.version if _answerer is not None else None
    # A model worker is ready once its model is loaded; a light-only worker at once (queues known).
    ready = _answerer is not None or (bool(row.queues) and ANSWER_QUEUE not in row.queues.split(","))
    row.state = dict(_stats, in_flight=len(_in_flight), in_flight_ids=sorted(_in_flight), ready=ready)


def claim(message_id: int, *, worker: str, db: Database | None = None) -> tuple[Claim, int | None]:
    """Take ``message_id`` for this worker unless it is answered or a live worker has it.

    Returns the outcome and the message's conversation id (for the logs). The caller answers a
    claimed message and then calls ``release``.
    """
    with _claim_lock, (db or database()).session() as session:
        for _ in range(20):
            outcome, conversation_id, seen = _check_claim(session, message_id, worker=worker)
            if outcome is not Claim.claimed:
                return outcome, conversation_id
            # Compare-and-swap on updated_at: of two workers that read the same row, one wins. A lost
            # swap only means the row changed (intake marking it queued, say): look again.
            taken = session.execute(
                update(Message)
                .where(Message.id == message_id, Message.updated_at == seen)
                .values(status=MessageStatus.answering, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:
                _in_flight.add(message_id)
                # Same transaction: the claim and "this worker has it in flight" are visible together.
                _publish_heartbeat(session, worker)
                return Claim.claimed, conversation_id
            session.expire_all()
        return Claim.busy, conversation_id


def _check_claim(
    session: Session, message_id: int, *, worker: str
) -> tuple[Claim, int | None, datetime | None]:
    """What a claim would find now; ``Claim.claimed`` means "free to take" (with the row's updated_at)."""
    question = session.get(Message, message_id)
    if question is None or question.role != MessageRole.user:
        return Claim.skip, None, None
    conversation_id = question.conversation_id
    if answer_for(session=session, message_id=message_id) is not None:
        return Claim.done, conversation_id, None
    if question.status == MessageStatus.held:
        return Claim.skip, conversation_id, None
    # Whatever the status says (intake may mark a message queued after a worker took it), a message
    # that a live worker lists as in flight is being answered.
    if message_id in _in_flight or message_id in workers_answering(session, exclude=worker):
        return Claim.busy, conversation_id, None
    if (question.attempts or 0) >= MAX_ATTEMPTS:
        return Claim.gave_up, conversation_id, None
    return Claim.claimed, conversation_id, question.updated_at


def release(message_id: int) -> None:
    with _claim_lock:
        _in_flight.discard(message_id)


# --- the answer task ------------------------------------------------------------------------------


@app.task(name="supportbot.answer", bind=True, max_retries=2)
def answer(self, message_id: int) -> int | None:  # type: ignore[no-untyped-def]
    with message_context(message_id=message_id):
        return _answer(self, message_id)


def _answer(task, message_id: int) -> int | None:  # type: ignore[no-untyped-def]
    worker = _worker_name or task.request.hostname or f"worker@{socket.gethostname()}"
    try:
        outcome, conversation_id = claim(message_id, worker=worker)
    except Exception as err:  # the database is busy or gone: try again, the message is safe in SQL
        log.warning("could not claim message %s: %s", message_id, err)
        raise task.retry(exc=err, countdown=2 + 2 * task.request.retries) from err
    conversation_id_var.set(conversation_id)
    if outcome is Claim.gave_up:
        ref = uuid.uuid4().hex[:8]
        log.error("message %s gave up after %d attempts (ref %s)", message_id, MAX_ATTEMPTS, ref)
        _fail(message_id, f"gave up after {MAX_ATTEMPTS} attempts (ref {ref})", texts.FAILED.format(ref=ref))
        _count_failure("gave_up")
        return None
    if outcome is not Claim.claimed:
        if outcome in (Claim.done, Claim.busy):
            _stats["duplicates"] += 1
        log.info("message %s not answered by this delivery: %s", message_id, outcome.value)
        return None

    started = utcnow()
    log.info("answering message %s", message_id)
    try:
        reply = answerer().answer(message_id)
        if reply is None:
            return None
        new = reply.answered_at is None or as_utc(reply.answered_at) >= started
        if new:
            ANSWERS.labels(status="failed" if reply.error else "answered").inc()
            if reply.latency_ms is not None:
                ANSWER_LATENCY.observe(reply.latency_ms / 1000.0)
            if reply.error:
                _count_failure("timeout" if reply.error.startswith("timeout") else "error")
            else:
                _stats["answered"] += 1
        log.info(
            "message %s %s (reply %s, %.0f ms)",
            message_id,
            ("failed: " + reply.error) if reply.error else "answered",
            reply.id,
            reply.latency_ms or 0.0,
        )
        return int(reply.id)
    except SoftTimeLimitExceeded:  # only the prefork pool raises this; the threads pool relies on the batcher
        ref = uuid.uuid4().hex[:8]
        log.error("message %s hit the soft time limit (ref %s)", message_id, ref)
        _fail(message_id, f"soft time limit (ref {ref})", texts.TIMED_OUT.format(ref=ref))
        _count_failure("time_limit")
        return None
    except Exception as err:
        # A poison message must not loop or kill the worker: retry a little, then end failed and tell the user.
        ref = uuid.uuid4().hex[:8]
        if task.request.retries < task.max_retries:
            log.warning(
                "message %s failed (%s: %s), retrying (ref %s)", message_id, type(err).__name__, err, ref
            )
            FAILURES.labels(kind="retried").inc()
            raise task.retry(exc=err, countdown=1 + task.request.retries) from err
        log.exception("message %s failed for good (ref %s)", message_id, ref)
        _fail(message_id, f"{type(err).__name__}: {err} (ref {ref})", texts.FAILED.format(ref=ref))
        _count_failure("poison")
        return None
    finally:
        release(message_id)


def _count_failure(kind: str) -> None:
    _stats["failed"] += 1
    FAILURES.labels(kind=kind).inc()


def enqueue_answer(message_id: int) -> None:
    """Queue a stored message for answering (by task name: callers need not import the model)."""
    app.send_task("supportbot.answer", args=[message_id], queue=ANSWER_QUEUE)


# --- the sweeper: nothing stays unanswered --------------------------------------------------------


@dataclass(frozen=True)
class DelayedNotice:
    """What a platform needs to tell a user that their answer is late."""

    message_id: int
    platform: str
    channel: str
    thread: str
    text: str


DelayNotifier = Callable[[DelayedNotice], None]
_delay_notifiers: dict[str, DelayNotifier] = {}


def register_delay_notifier(platform: str, notify: DelayNotifier) -> None:
    """A platform adapter registers how to post the "still working on it" notice in its threads.

    The console needs none: `supportbot status` lists delayed messages and `ask` keeps waiting.
    """
    _delay_notifiers[platform] = notify


def _platform_notifier(platform: str) -> DelayNotifier | None:
    """By default a delayed notice goes through the same outbound adapter as the answers."""
    from bot.outbound import outbound_for

    outbound = outbound_for(platform, settings())
    if outbound is None:
        return None
    return lambda notice: outbound.send(channel=notice.channel, thread=notice.thread, text=notice.text)


@dataclass
class SweepReport:
    requeued: int = 0
    delayed: int = 0
    gave_up: int = 0
    in_progress: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def sweep_unanswered(*, db: Database, max_age_s: float, enqueue: Callable[[int], None]) -> SweepReport:
    """One sweep over unanswered user messages older than ``max_age_s``.

    - tells the user once that the answer is late (``meta["delayed"]`` plus the platform's notifier);
    - leaves alone a message a live worker is answering right now (no second generation);
    - re-queues the rest (never queued, lost with a dead worker or a broker restart), each time waiting
      twice as long, since a message may simply sit in a long queue and duplicates cost a little;
    - gives up, telling the user, on a message re-queued ``MAX_REQUEUES`` times.
    """
    report = SweepReport()
    now = utcnow()
    cutoff = now - timedelta(seconds=max_age_s)
    unanswered = (MessageStatus.received, MessageStatus.queued, MessageStatus.answering)
    with db.session() as session:
        stuck_ids = session.scalars(
            select(Message.id)
            .where(
                Message.role == MessageRole.user, Message.status.in_(unanswered), Message.updated_at < cutoff
            )
            .order_by(Message.id)
            .limit(1000)
        ).all()
    if not stuck_ids:
        return report
    notices: list[DelayedNotice] = []
    to_queue: list[int] = []
    to_fail: list[int] = []
    with db.session() as session:
        busy = workers_answering(session)
        for message_id in stuck_ids:
            message = session.get(Message, message_id)
            if message is None or message.status not in unanswered:
                continue
            meta: dict[str, Any] = dict(message.meta) if isinstance(message.meta, dict) else {}
            if "delayed" not in meta:
                conversation = session.get(Conversation, message.conversation_id)
                meta["delayed"] = {"at": now.isoformat(), "notified": False}
                report.delayed += 1
                if conversation is not None:
                    notices.append(
                        DelayedNotice(
                            message.id,
                            conversation.platform,
                            conversation.channel,
                            conversation.thread,
                            texts.DELAYED,
                        )
                    )
            if message.id in busy:
                report.in_progress += 1
            else:
                requeues = int(meta.get("requeues", 0))
                wait_s = max_age_s * 2 ** min(requeues, 5)
                if requeues >= MAX_REQUEUES:
                    to_fail.append(message.id)
                elif as_utc(message.updated_at) <= now - timedelta(seconds=wait_s):
                    meta["requeues"] = requeues + 1
                    message.status = MessageStatus.queued
                    message.updated_at = now
                    to_queue.append(message.id)
            message.meta = meta
    for notice in notices:
        notify = _delay_notifiers.get(notice.platform) or _platform_notifier(notice.platform)
        if notify is None:
            continue
        try:
            notify(notice)
        except Exception as err:  # a platform hiccup must not stop the sweep
            log.warning("delayed notice for message %s failed: %s", notice.message_id, err)
            continue
        with db.session() as session:
            row = session.get(Message, notice.message_id)
            if row is not None and isinstance(row.meta, dict):
                row.meta = {**row.meta, "delayed": {**row.meta.get("delayed", {}), "notified": True}}
    for message_id in to_queue:
        try:
            enqueue(message_id)
            report.requeued += 1
        except Exception as err:  # broker down: the next sweep tries again (the row is still unanswered)
            log.warning("could not re-queue message %s: %s", message_id, err)
    for message_id in to_fail:
        ref = uuid.uuid4().hex[:8]
        with message_context(message_id=message_id):
            log.error("message %s given up after %d re-queues (ref %s)", message_id, MAX_REQUEUES, ref)
        _fail(
            message_id,
            f"unanswered after {MAX_REQUEUES} re-queues (ref {ref})",
            texts.FAILED.format(ref=ref),
            db=db,
        )
        report.gave_up += 1
    return report


@app.task(name="supportbot.light.sweep")
def sweep(max_age_s: float = 120.0) -> dict[str, int]:
    """Re-queue user messages left unanswered past ``max_age_s`` (lost task, dead worker, broker restart).

    Every worker already sweeps on its own (``_sweeper_loop``); this task is a one-off sweep on demand.
    """
    return _sweep_once(max_age_s)


def _sweep_once(max_age_s: float) -> dict[str, int]:
    report = sweep_unanswered(db=database(), max_age_s=max_age_s, enqueue=enqueue_answer)
    for kind, n in report.as_dict().items():
        if n:
            SWEEPER.labels(action=kind).inc(n)
    if report.requeued or report.delayed or report.gave_up:
        log.warning("sweeper: %s", ", ".join(f"{k} {v}" for k, v in report.as_dict().items()))
    return report.as_dict()


# --- worker lifecycle: load the model before taking tasks, and report liveness -------------------


def _beat(name: str, queues: str) -> None:
    try:
        with _claim_lock, database().session() as session:
            _publish_heartbeat(session, name, queues)
    except Exception as err:  # liveness reporting must never take the worker down
        log.warning("heartbeat failed: %s", err)


def _heartbeat_loop(name: str, queues: str, stop: threading.Event) -> None:
    while not stop.is_set():
        _beat(name, queues)
        stop.wait(HEARTBEAT_EVERY_S)


def _sweeper_loop(stop: threading.Event) -> None:
    """Every worker runs this; the one holding the lease sweeps (see workers/leader.py).

    So recovery needs no flag and no separate beat: whichever worker is up, a session worker of `ask`
    included, re-queues what a dead worker left behind, and only one of them does it at a time.
    """
    from workers.leader import sweeper_lease

    config = settings()
    lease = sweeper_lease(config)
    leading = False
    try:
        while not stop.is_set():
            holds = lease.hold()
            if holds != leading:
                log.info("sweeper: %s", "this worker sweeps" if holds else "another worker sweeps")
                leading = holds
            if holds:
                try:
                    _sweep_once(config.sweep_after_s)
                except Exception as err:  # the database is busy or away: the next round tries again
                    log.warning("sweep failed: %s", err)
            stop.wait(config.sweep_every_s)
    finally:
        lease.release()


_stop = threading.Event()


@signals.worker_ready.connect
def _on_ready(sender=None, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    global _worker_name
    queues = ",".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values())) if sender else ""
    name = sender.hostname if sender else f"worker@{socket.gethostname()}"
    _worker_name = name
    started = time.monotonic()
    start_metrics(settings())
    threading.Thread(
        target=_heartbeat_loop, args=(name, queues, _stop), daemon=True, name="heartbeat"
    ).start()
    if ANSWER_QUEUE in queues.split(","):
        answerer()  # load before the first task so the first answer is not a cold start
        # Say so at once: `ask` and the admins' status read readiness from this row, and the loop's
        # next beat may be up to HEARTBEAT_EVERY_S away.
        _beat(name, queues)
        log.info("worker %s ready in %.1f s (queues %s)", name, time.monotonic() - started, queues)
    elif LIGHT_QUEUE in queues.split(","):
        log.info("worker %s ready (queues %s)", name, queues)
    # Sweeping starts once this worker can answer: re-queued work would only wait behind its model load,
    # and every needless re-queue counts towards a message's MAX_REQUEUES.
    threading.Thread(target=_sweeper_loop, args=(_stop,), daemon=True, name="sweeper").start()


@signals.worker_shutdown.connect
def _on_shutdown(**_kwargs) -> None:  # type: ignore[no-untyped-def]
    _stop.set()
