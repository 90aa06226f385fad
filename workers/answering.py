"""The answer step: retrieve, prompt, generate, store. One ``Answerer`` per worker process."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from core import texts
from core.conversations import answer_for, history, store_reply
from core.db import Database
from core.desk import desk_takes, is_technician
from core.errors import GenerationTimeout, SupportbotError
from core.schema import Message, MessageRole, MessageStatus, ModelStatus, ModelVersion
from core.settings import Settings
from core.types import SearchResult, TicketHit
from model.prompt import Turn, build_messages, estimate_hours
from workers.compose import Composed, by_model, compose, for_technician
from workers.observability import COMPOSITION

log = logging.getLogger(__name__)


def prompt_tickets(result: SearchResult, min_confidence: float) -> list[TicketHit]:
    """Only tickets the retriever is confident about are shown to the model and cited as sources;
    a weak third hit would dilute the prompt and the fix-time estimate."""
    return [h for h in result.hits if h.score >= min_confidence] or list(result.hits[:1])


class Answerer:
    def __init__(self, *, settings: Settings, db: Database) -> None:
        from model.runtime import LanguageModel
        from retrieval.search import TicketIndex
        from workers.batching import Batcher

        started = time.monotonic()
        self.settings = settings
        self.db = db
        # All torch work of the process runs on the batcher's thread (see workers/batching.py). The index
        # is not loaded beside the model on another thread: from_pretrained builds modules under a
        # process-wide meta-device patch, and a second load at the same time got meta tensors
        # ("Cannot copy out of meta tensor"); without sentence-transformers' import it takes ~0.2 s anyway.
        self.batcher = Batcher(load=lambda: LanguageModel(settings), max_batch=settings.batch_max)
        self.model = self.batcher.loaded()
        self.index = self.batcher.call(TicketIndex.open, settings=settings, db=db)
        # Embedding forward passes (also those of a repair) go to the torch thread from any thread.
        self.index.embedder.runner = self.batcher.call
        self._adapter_checked = 0.0
        self._adapter_lock = threading.Lock()
        self.sync_adapter(force=True)
        log.info("answerer ready in %.1f s (model %s)", time.monotonic() - started, self.model.version)

    def sync_adapter(self, *, force: bool = False) -> None:
        """Follow the registry: the active adapter row decides what this worker serves, no restart."""
        now = time.monotonic()
        if not force and now - self._adapter_checked < 2.0:
            return
        with self._adapter_lock:
            self._adapter_checked = now
            with self.db.session() as session:
                active = (
                    session.query(ModelVersion)
                    .filter(ModelVersion.status == ModelStatus.active)
                    .order_by(ModelVersion.promoted_at.desc())
                    .first()
                )
                target = (active.adapter_path, active.name) if active and active.adapter_path else None
            if target is None:
                if self.model.adapter_path and self.model.adapter_path != self.settings.adapter:
                    self.batcher.call(self.model.use_adapter, self.settings.adapter, drain=True)
                return
            if target[0] != self.model.adapter_path:
                self.batcher.call(self.model.use_adapter, target[0], target[1], drain=True)

    def answer(self, message_id: int) -> Message | None:
        """Answer one stored user message, exactly once. Returns the reply (new or earlier)."""
        with self.db.session() as session:
            question = session.get(Message, message_id)
            if question is None or question.role != MessageRole.user:
                log.warning("message %s is not a user message; nothing to answer", message_id)
                return None
            earlier = answer_for(session=session, message_id=message_id)
            if earlier is not None:
                return earlier  # redelivered task or duplicate: the answer exists already
            if question.status == MessageStatus.held:
                return None
            if desk_takes(session=session, settings=self.settings, message=question):
                # An open escalation (or a technician's reply in one): relayed to the desk, never answered.
                log.info("message %s relayed to the desk, not answered", message_id)
                return None
            # A technician asking the bot themselves (a DM, a mention: never in an escalation, desk_takes
            # took those) troubleshoots too and gets every matching ticket with its repair and hours.
            technician = is_technician(session=session, settings=self.settings,
                                       user_id=question.user_id or question.conversation.user_id)
            question.status = MessageStatus.answering
            question.attempts = (question.attempts or 0) + 1
            turns = [
                Turn("assistant" if m.role == MessageRole.assistant else "user", m.text[: self.settings.max_message_chars])
                for m in history(
                    session=session,
                    conversation_id=question.conversation_id,
                    before_id=question.id,
                    turns=self.settings.history_turns,
                )
                if m.text
            ]
            text = question.text
            truncated = bool(question.meta.get("truncated")) or len(text) > self.settings.max_message_chars

        self.sync_adapter()
        ref = uuid.uuid4().hex[:8]
        query = text[: self.settings.max_message_chars]
        try:
            # The index's SQL checks and writer lock (an ingest elsewhere may hold it) on this thread;
            # the search itself (embedding, FAISS: OpenMP too) on the torch thread, then finds it fresh.
            self.index.refresh()
            result = self.batcher.call(self.index.search, query, k=self.settings.retrieval_k)
            composed, hits, hours = self._write(query, turns, result)
            if technician:
                composed = for_technician(composed, result.hits, question=query,
                                          user_texts=[t.content for t in turns if t.role == "user"],
                                          trusted_domains=self.settings.trusted_domains)
            reply = composed.text
            if truncated:
                reply = texts.TRUNCATED_NOTE.format(limit=self.settings.max_message_chars) + "\n\n" + reply
            status, error = MessageStatus.answered, None
        except GenerationTimeout as err:
            log.error("message %s: generation timed out (ref %s)", message_id, ref)
            reply, hits, hours, result = texts.TIMED_OUT.format(ref=ref), [], None, SearchResult()
            composed = Composed(reply)
            status, error = MessageStatus.failed, f"timeout: {err} (ref {ref})"
        except SupportbotError as err:
            log.exception("message %s failed (ref %s)", message_id, ref)
            reply, hits, hours, result = texts.FAILED.format(ref=ref), [], None, SearchResult()
            composed = Composed(reply)
            status, error = MessageStatus.failed, f"{type(err).__name__}: {err} (ref {ref})"
        for kind in ("fallback", "flagged"):
            if getattr(composed, kind):
                COMPOSITION.labels(kind=kind).inc()
        if composed.fallback or composed.flagged:
            log.info("message %s: model text %s%s", message_id, "dropped" if composed.fallback else "kept",
                     f" ({'; '.join(composed.notes)})" if composed.notes else "")

        with self.db.session() as session:
            question = session.get(Message, message_id)
            assert question is not None
            stored, created = store_reply(
                session=session,
                question=question,
                text=reply,
                model_version=self.model.version,
                sources=[h.id for h in hits],
                confidence=result.confidence,
                estimated_hours=hours,
                status=status,
                error=error,
                fallback=composed.fallback,
                flagged=composed.flagged,
                notes=composed.notes,
            )
        if created:
            self.deliver(stored.id)
        return stored

    def deliver(self, reply_id: int) -> bool:
        """Post a stored reply to its platform through the outbound port, once: only the worker that
        stored it delivers it. The port renders it; this process imports no chat SDK."""
        from bot.outbound import deliver_stored

        return deliver_stored(db=self.db, settings=self.settings, reply_id=reply_id)

    def _write(self, query: str, turns: list[Turn], result: SearchResult) -> tuple[Composed, list[TicketHit], float | None]:
        if not result.hits or result.confidence < self.settings.min_confidence:
            reply = texts.NOT_SURE
            if result.hits:
                near = ", ".join(f"{h.id} ({h.title})" if h.title else h.id for h in result.hits[:2])
                reply += "\n\n" + texts.POSSIBLY_RELATED.format(tickets=near)
            return Composed(reply), [], None
        hits = prompt_tickets(result, self.settings.min_confidence)
        messages = build_messages(question=query, tickets=hits, history=turns)
        generation = self.batcher.generate(messages, timeout_s=self.settings.answer_soft_limit_s)
        try:
            hits = by_model(hits, lambda fixes: self.batcher.call(self.model.score, messages, fixes),
                            self.settings.rank_fixes, adapted=self.model.adapter_path is not None)
        except SupportbotError as err:  # the retriever's order is still a good answer
            log.warning("ranking the fixes failed, the retriever's order stays: %s", err)
        hours = estimate_hours(hits)
        composed = compose(
            generation.text,
            hits,
            hours,
            question=query,
            # What the user said may come back (their own phone number); nothing else may.
            user_texts=[t.content for t in turns if t.role == "user"],
            trusted_domains=self.settings.trusted_domains,
            certainty=generation.certainty,
        )
        if generation.timed_out:
            composed.text = texts.CUT_SHORT + "\n\n" + composed.text  # the user knows why it stops mid-way
        return composed, hits, hours
