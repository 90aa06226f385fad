"""Prompt building: a system role, retrieved tickets, the conversation history and the question.

The tokenizer's own chat template renders the turns, so the same code serves SmolLM2 and Llama-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.types import TicketHit

SYSTEM_PROMPT = (
    "You are supportbot, the IT and equipment support assistant of this company. "
    "Answer the employee's problem with concrete steps, using the resolved tickets below when they fit. "
    "Cite the tickets you used as [ticket ID]. If the tickets do not cover the problem, say so plainly "
    "and suggest escalating to a technician. Never invent ticket ids. Keep the answer short."
)


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


def build_messages(
    *,
    question: str,
    tickets: Sequence[TicketHit] = (),
    history: Sequence[Turn] = (),
    system: str = SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """The chat messages for one answer: system (with tickets), earlier turns, the question."""
    context = "\n\n".join(t.render() for t in tickets) if tickets else "(no matching resolved tickets)"
    messages = [{"role": "system", "content": f"{system}\n\nResolved tickets:\n{context}"}]
    for turn in history:
        role = "assistant" if turn.role == "assistant" else "user"
        if messages[-1]["role"] == role and role == "user":
            messages[-1]["content"] += "\n" + turn.content  # templates expect alternating turns
        else:
            messages.append({"role": role, "content": turn.content})
    if messages[-1]["role"] == "user":
        messages[-1]["content"] += "\n" + question
    else:
        messages.append({"role": "user", "content": question})
    return messages


def estimate_hours(tickets: Sequence[TicketHit]) -> float | None:
    """The estimated fix time: the score-weighted mean of the cited tickets' hours, when any are known."""
    known = [(t.hours, max(t.score, 1e-3)) for t in tickets if t.hours is not None]
    if not known:
        return None
    total = sum(w for _, w in known)
    return round(sum(h * w for h, w in known) / total, 1)
