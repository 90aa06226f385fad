"""The intake port: every channel adapter hands an ``Inbound`` here.

Order matters and is the privacy and no-loss guarantee: validate, anonymize, persist, then queue.
Nothing raw is ever stored or queued; a message is in SQL before the broker sees its id.
"""

from __future__ import annotations

import logging
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from bot.privacy.config import char_limit
from core import texts
from core.conversations import (
    find_by_idempotency_key,
    get_or_create_conversation,
    get_or_create_user,
    store_reply,
)
from core.db import Database
from core.errors import BrokerUnavailable, PrivacyError
from core.schema import Message, MessageRole, MessageStatus
from core.settings import Settings
from core.types import Inbound

log = logging.getLogger(__name__)

RULES_VERSION = "supportbot-rules"
# Input is binary when more than this share of its visible characters are control bytes or undecodable.
BINARY_SHARE = 0.30


@dataclass(frozen=True)
class Receipt:
    message_id: int
    conversation_id: int
    duplicate: bool = False
    # Set when intake answered by itself (empty, binary, held) and nothing was queued.
    immediate_reply: str | None = None
    queued: bool = False
    # The message was longer than privacy_max_chars: only its start was anonymized and stored.
    truncated: bool = False


def clean_text(raw: str | bytes) -> tuple[str, str | None]:
    """Normalize raw input. Returns (text, problem) where problem is "empty", "binary" or None.

    Binary means mostly not text: a few NUL or control bytes among words ("printer\0 jams") are
    dropped and the words kept.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not raw or not raw.strip():
        return "", "empty"
    sample = raw[:65_536]
    bad = sum(
        1
        for ch in sample
        if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\n\r\t")
    )
    visible = sum(1 for ch in sample if not ch.isspace())
    if bad > BINARY_SHARE * max(visible, 1):
        return "", "binary"
    # Drop stray control characters (NUL would also break PostgreSQL text columns) and lone surrogates.
    text = "".join(ch for ch in raw if ch in "\n\r\t" or unicodedata.category(ch) not in ("Cc", "Cs"))
    text = text.replace("\ufffd", "")
    return (text, None) if text.strip() else ("", "empty")


class Intake:
    """Validate, anonymize, store and queue inbound messages."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        anonymize: Callable[[str, str], str],
        enqueue: Callable[[int], None],
        known_names: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.anonymize = anonymize  # (text, scope) -> anonymized text; raises PrivacyError
        self.enqueue = enqueue
        # Adapters feed the platform's member directory here: those names are always masked.
        self.known_names = known_names or (lambda names: None)

    def receive(self, inbound: Inbound) -> Receipt:
        key = f"{inbound.platform}:{inbound.event_id}" if inbound.event_id else None
        with self.db.session() as session:
            if key:
                seen = find_by_idempotency_key(session=session, key=key)
                if seen is not None:
                    # A platform retry or a double delivery: one message, one answer.
                    log.info("duplicate delivery of %s ignored (message %s)", key, seen.id)
                    return Receipt(seen.id, seen.conversation_id, duplicate=True)

        text, problem = clean_text(inbound.text)
        # Anonymization time grows with length: one message gets a hard bound (bot/privacy/config.py).
        limit = char_limit(self.settings)
        truncated = len(text) > limit
        if truncated:
            text = text[:limit]
        scope = f"{inbound.platform}:{inbound.channel}:{inbound.thread}"
        held_reason = None
        if not problem:
            try:
                text = self.anonymize(text, scope)
            except PrivacyError as err:
                held_reason = str(err) or "anonymization failed"
                text = ""  # never stored raw

        with self.db.session() as session:
            user = get_or_create_user(
                session=session, platform=inbound.platform, external_id=self._user_key(inbound)
            )
            conversation = get_or_create_conversation(
                session=session,
                platform=inbound.platform,
                channel=inbound.channel,
                thread=inbound.thread,
                user_id=user.id,
            )
            if not problem and not held_reason and self._over_rate_limit(session, user.id):
                problem = "rate_limited"
            message = Message(
                conversation_id=conversation.id,
                user_id=user.id,
                role=MessageRole.user,
                text=text,
                idempotency_key=key,
                status=MessageStatus.held if held_reason else MessageStatus.received,
                error=held_reason or problem,
                meta={"chars": len(inbound.text), "truncated": truncated, "ref": inbound.message_ref},
            )
            try:
                # The unique idempotency key settles two deliveries of one event racing each other.
                with session.begin_nested():
                    session.add(message)
            except IntegrityError:
                seen = find_by_idempotency_key(session=session, key=key) if key else None
                if seen is None:
                    raise
                log.info("duplicate delivery of %s ignored (message %s, concurrent)", key, seen.id)
                return Receipt(seen.id, seen.conversation_id, duplicate=True)
            immediate = None
            if problem or held_reason:
                ref = uuid.uuid4().hex[:8]
                immediate = {
                    "empty": texts.EMPTY_MESSAGE,
                    "binary": texts.BINARY_MESSAGE,
                    "rate_limited": texts.RATE_LIMITED,
                }.get(problem or "", texts.PRIVACY_HELD.format(ref=ref))
                if held_reason:
                    log.warning("message %s held: anonymization failed (ref %s)", message.id, ref)
                store_reply(
                    session=session,
                    question=message,
                    text=immediate,
                    model_version=RULES_VERSION,
                    status=MessageStatus.answered,
                )
                message.error = held_reason or problem  # store_reply cleared it; keep the reason
                if held_reason:
                    message.status = MessageStatus.held
            receipt = Receipt(message.id, conversation.id, immediate_reply=immediate, truncated=truncated)

        if immediate is not None:
            return receipt
        try:
            self.enqueue(receipt.message_id)
        except Exception as err:  # the broker's client raises many kinds; the message is safe in SQL
            log.error("could not queue message %s: %s", receipt.message_id, err)
            raise BrokerUnavailable(f"could not queue message {receipt.message_id}: {err}") from err
        with self.db.session() as session:
            row = session.get(Message, receipt.message_id)
            if row is not None and row.status == MessageStatus.received:
                row.status = MessageStatus.queued
        return Receipt(receipt.message_id, receipt.conversation_id, queued=True, truncated=truncated)

    def _over_rate_limit(self, session, user_id: int) -> bool:  # type: ignore[no-untyped-def]
        limit = self.settings.rate_limit_per_minute
        if not limit:
            return False
        since = datetime.now(timezone.utc) - timedelta(minutes=1)
        recent = session.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.user_id == user_id, Message.role == MessageRole.user, Message.created_at >= since)
        )
        return int(recent or 0) >= limit

    @staticmethod
    def _user_key(inbound: Inbound) -> str:
        # The platform's user id is an opaque id, not a name; it stays so rate limits and ratings work.
        return inbound.user_external_id or "unknown"
