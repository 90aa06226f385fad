"""Ratings: a 👍 or 👎 on one assistant answer, with an optional reason. Re-rating replaces."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.schema import Message, MessageRole, Rating

GOOD = 1
BAD = -1
MAX_REASON_CHARS = 2000

_WORDS = {
    "good": GOOD, "+1": GOOD, "1": GOOD, "up": GOOD, "yes": GOOD, "👍": GOOD,
    "bad": BAD, "-1": BAD, "down": BAD, "no": BAD, "👎": BAD,
}  # fmt: skip


def _default_anonymize(text: str) -> str:
    from bot.privacy import scrub

    return scrub(text)


def parse_value(value: int | str | bool) -> int:
    """+1 or -1 from what a person or a platform hands over ("good", "bad", 1, -1, True, False)."""
    if isinstance(value, bool):
        return GOOD if value else BAD
    if isinstance(value, int):
        if value in (GOOD, BAD):
            return value
    elif isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise InputError(f"a rating is good or bad (+1 or -1), not {value!r}")


def rate(
    *,
    session: Session,
    message_id: int,
    value: int | str | bool,
    reason: str | None = None,
    user_id: int | None = None,
    anonymize: Callable[[str], str] | None = None,
) -> Rating:
    """Store one person's rating of an assistant answer; a second rating by the same person replaces it."""
    score = parse_value(value)
    message = session.get(Message, message_id)
    if message is None:
        raise InputError(f"there is no message {message_id}")
    if message.role != MessageRole.assistant:
        raise InputError(
            f"message {message_id} is a {message.role.value} message; only assistant answers can be rated"
        )
    reason = (reason or "").strip()[:MAX_REASON_CHARS] or None
    if reason is not None:
        # A reason is free text from a person, like a chat message: it is stored only anonymized, whatever
        # the caller did before (placeholders it already holds stay as they are).
        reason = (anonymize or _default_anonymize)(reason) or None
    # SQL unique constraints treat NULL user ids as distinct, so the replace is done here, not by the index.
    owner = Rating.user_id.is_(None) if user_id is None else Rating.user_id == user_id
    rating = session.scalars(
        select(Rating).where(Rating.message_id == message_id, owner).with_for_update()
    ).first()
    if rating is None:
        rating = Rating(message_id=message_id, user_id=user_id, value=score, reason=reason)
        session.add(rating)
    else:
        rating.value = score
        rating.reason = reason
    session.flush()
    return rating


def message_score(ratings: list[Rating]) -> int:
    """The verdict on one answer from all its ratings: any 👎 outweighs 👍s (a wrong fix is costly)."""
    if not ratings:
        return 0
    return BAD if any(r.value < 0 for r in ratings) else GOOD
