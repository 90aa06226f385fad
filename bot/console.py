"""The console channel: `supportbot ask` and `supportbot chat` take the same path Slack and Telegram do.

adapter -> intake (anonymize, store) -> queue -> worker -> store -> the adapter reads the reply.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from bot.intake import Intake, Receipt
from core import texts
from core.conversations import answer_for
from core.db import Database
from core.errors import BrokerUnavailable, SupportbotError
from core.schema import Message, WorkerHeartbeat, as_utc
from core.settings import Settings
from core.types import Inbound

log = logging.getLogger(__name__)

PLATFORM = "console"
HEARTBEAT_FRESH_S = 10.0
# The reply poll starts at 20 ms and slows by 1.5x a read up to this: a reply stored between two reads
# waits half the gap on average, and answers land after one to a few seconds, when the gap is at its cap.
# At 0.2 s an ask took 0.18 s longer than the worker's own question-to-answer time; at 0.05 s, 0.07 s
# (median of 8 asks each, alternating, one worker). A read is one indexed SELECT: 20 a second is cheap.
REPLY_POLL_MAX_S = 0.05


@dataclass(frozen=True)
class Reply:
    answer: str
    sources: list[str]
    latency_ms: float | None
    model_version: str | None
    conversation_id: int
    message_id: int  # the reply's id: rate it with `supportbot rate MESSAGE_ID good|bad`
    question_id: int
    confidence: float | None
    estimated_hours: float | None
    status: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def console_user() -> str:
    # A stable opaque id instead of the login name: user ids are stored, names must not be.
    return "u-" + hashlib.sha256(getpass.getuser().encode()).hexdigest()[:12]


def live_workers(db: Database, *, ready_only: bool = True) -> list[WorkerHeartbeat]:
    fresh = datetime.now(timezone.utc) - timedelta(seconds=HEARTBEAT_FRESH_S)
    with db.session() as session:
        rows = session.scalars(select(WorkerHeartbeat)).all()
    out = []
    for row in rows:
        seen = as_utc(row.seen_at)
        if seen >= fresh and "answer" in row.queues.split(",") and (row.state.get("ready") or not ready_only):
            out.append(row)
    return out


class SessionWorker:
    """A worker started for this console session when none is running (embedded broker only)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.process: subprocess.Popen[bytes] | None = None

    def ensure(self, *, wait_s: float = 300.0, quiet: bool = False) -> None:
        if live_workers(self.db):
            return
        if not self.settings.embedded_broker:
            # A configured broker's workers are someone else's to start: wait a while for one that is
            # starting up (deploys restart ask's worker too) rather than fail the question at once.
            if self._wait_for_worker(self.settings.worker_wait_s, quiet=quiet):
                return
            raise BrokerUnavailable(texts.NO_WORKER.format(broker=_redact_url(self.settings.celery_broker_url)))
        if not quiet:
            print("Starting a worker for this session (loading the model)…", file=sys.stderr, flush=True)
        log_path = self.settings.data_dir / "session-worker.log"
        env = dict(os.environ, SUPPORTBOT_DATA_DIR=str(self.settings.data_dir))
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "worker", "--name", f"session-{uuid.uuid4().hex[:6]}"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SupportbotError(f"the session worker exited early; see {log_path}")
            if live_workers(self.db):
                return
            time.sleep(0.2)
        raise SupportbotError(f"the session worker did not become ready in {wait_s:g} s; see {log_path}")

    def _wait_for_worker(self, wait_s: float, *, quiet: bool) -> bool:
        """Wait up to ``wait_s`` for a ready worker, telling the user on stderr; True when one is ready."""
        started = time.monotonic()
        deadline = started + wait_s
        told: str | None = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if live_workers(self.db):
                return True
            starting = live_workers(self.db, ready_only=False)  # heartbeating, model still loading
            line = (
                f"A worker is starting ({starting[0].name}, loading the model); waiting up to {wait_s:g} s…"
                if starting
                else f"No worker is up yet; waiting up to {wait_s:g} s for one to start…"
            )
            if line != told and not quiet:
                print(line, file=sys.stderr, flush=True)
                told = line
        return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _redact_url(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Console:
    """One console conversation."""

    def __init__(self, *, settings: Settings, db: Database, intake: Intake, thread: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.intake = intake
        self.thread = thread or uuid.uuid4().hex[:12]
        self.user = console_user()
        self.last_reply_id: int | None = None

    def send(self, text: str | bytes) -> Receipt:
        receipt = self.intake.receive(
            Inbound(
                platform=PLATFORM,
                channel="console",
                thread=self.thread,
                user_external_id=self.user,
                text=text if isinstance(text, str) else text.decode("utf-8", errors="replace"),
                event_id=uuid.uuid4().hex,
            )
        )
        # A --thread that another user started gives this user a conversation of their own beside it
        # (core.conversations): follow that one, so later turns, ratings and /escalate stay in it.
        from core.schema import Conversation

        with self.db.session() as session:
            conversation = session.get(Conversation, receipt.conversation_id)
            if conversation is not None:
                self.thread = conversation.thread
        return receipt

    def wait(self, receipt: Receipt, *, timeout_s: float | None = None) -> Reply:
        deadline = time.monotonic() + (timeout_s or self.settings.answer_wait_s)
        delay = 0.02
        while True:
            with self.db.session() as session:
                reply = answer_for(session=session, message_id=receipt.message_id)
                if reply is not None:
                    self.last_reply_id = reply.id
                    question = session.get(Message, receipt.message_id)
                    return Reply(
                        answer=reply.text,
                        sources=list(reply.sources or []),
                        latency_ms=reply.latency_ms,
                        model_version=reply.model_version,
                        conversation_id=receipt.conversation_id,
                        message_id=reply.id,
                        question_id=receipt.message_id,
                        confidence=reply.confidence,
                        estimated_hours=reply.estimated_hours,
                        status=question.status.value if question else "answered",
                    )
            if time.monotonic() >= deadline:
                raise SupportbotError(
                    texts.WAIT_TIMEOUT.format(seconds=timeout_s or self.settings.answer_wait_s, message_id=receipt.message_id)
                )
            time.sleep(delay)
            delay = min(delay * 1.5, REPLY_POLL_MAX_S)

    def ask(self, text: str | bytes) -> Reply:
        return self.wait(self.send(text))
