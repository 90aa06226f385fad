"""Domain types that cross the ports (adapters, retriever, generator). Plain dataclasses, no SDK types."""

from __future__ import annotations

from dataclasses import dataclass, field

# The composition note that marks a technician's own question answered with every matching ticket
# (workers/compose.for_technician); the export never trains on such an answer.
TECHNICIAN_VIEW = "technician view"


@dataclass(frozen=True)
class TicketHit:
    """A resolved ticket found for a question, with its fused relevance score."""

    id: str
    title: str = ""
    machine: str = ""
    condition: str = ""
    work_performed: str = ""
    hours: float | None = None
    score: float = 0.0

    def render(self, max_chars: int = 600) -> str:
        parts = [f"[ticket {self.id}]"]
        if self.title:
            parts.append(f"Problem: {self.title}")
        if self.machine:
            parts.append(f"Machine: {self.machine}")
        if self.condition:
            parts.append(f"Found: {self.condition}")
        if self.work_performed:
            parts.append(f"Fix: {self.work_performed}")
        if self.hours is not None:
            parts.append(f"Time to fix: {self.hours:g} h")
        text = "\n".join(parts)
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


@dataclass(frozen=True)
class SearchResult:
    """What the retriever returns: hits best first, and how sure it is that the best hit fits (0..1)."""

    hits: list[TicketHit] = field(default_factory=list)
    confidence: float = 0.0


@dataclass(frozen=True)
class Entity:
    """A span the anonymizer masked, with offsets into the original text."""

    type: str
    start: int
    end: int


@dataclass(frozen=True)
class Anonymized:
    text: str
    entities: list[Entity] = field(default_factory=list)


@dataclass(frozen=True)
class Inbound:
    """A message as an adapter hands it over, already converted from the platform's SDK types."""

    platform: str
    channel: str
    thread: str
    user_external_id: str
    text: str
    event_id: str | None = None  # the platform's event/update id, used as the idempotency key
    message_ref: str | None = None  # the platform's id of this message (Telegram replies quote it)


@dataclass(frozen=True)
class ConversationRef:
    """Where a reply goes on its platform: the platform's own channel and thread, not our keys."""

    platform: str
    channel: str
    thread: str  # the platform's thread (Slack thread_ts, Telegram "topic<id>" or the question's id)
    reply_to: str | None = None  # the platform's id of the question (Telegram replies quote it)


@dataclass(frozen=True)
class Reply:
    """A reply as the outbound port takes it: content, not layout. Each platform package renders it."""

    text: str  # the answer's body, without the sources and fix-time lines (rendered from the fields)
    conversation: ConversationRef
    message_id: int | None = None  # our stored reply's id: rating buttons carry it
    sources: tuple[tuple[str, str], ...] = ()  # (ticket id, title) of the cited tickets
    estimated_hours: float | None = None
    kind: str = "answer"  # "answer" (rate/escalate buttons) or "notice" (plain text)
    placeholder: str | None = None  # a "working on it" message the answer replaces, if one was posted


@dataclass(frozen=True)
class Delivered:
    """What the platform gave back for a delivered reply: its ids of the posted messages."""

    refs: tuple[str, ...] = ()
