"""Tickets in SQL: validation, idempotent upsert by id, delete, and the digests the index checks.

SQL is the truth; the vector/lexical index is derived from it and can always be rebuilt.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.schema import QuarantinedTicket, Ticket

TEXT_FIELDS = ("title", "machine", "condition", "work_performed")
# The fields that describe a problem (what an employee would say) versus its resolution.
PROBLEM_FIELDS = ("title", "machine", "condition")
MAX_ID_CHARS = 128
MAX_HOURS = 10_000.0
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class TicketIn:
    """A validated ticket, ready to store and index."""

    id: str
    title: str = ""
    machine: str = ""
    condition: str = ""
    work_performed: str = ""
    hours: float | None = None
    source: str = "import"

    @property
    def content_hash(self) -> str:
        return content_hash(self.title, self.machine, self.condition, self.work_performed, self.hours)

    @classmethod
    def from_row(cls, row: Ticket) -> TicketIn:
        return cls(
            id=row.id,
            title=row.title or "",
            machine=row.machine or "",
            condition=row.condition or "",
            work_performed=row.work_performed or "",
            hours=row.hours,
            source=row.source or "import",
        )


def content_hash(title: str, machine: str, condition: str, work_performed: str, hours: float | None) -> str:
    payload = "\x1f".join([title, machine, condition, work_performed, "" if hours is None else repr(hours)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _clean_text(value: Any, *, field: str, max_chars: int) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"field {field!r} must be text, got {type(value).__name__}")
    # Control characters (NUL above all) break SQL drivers and tokenizers; tabs/newlines stay.
    text = _CONTROL.sub(" ", value).strip()
    return text[:max_chars]


def _clean_hours(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InputError("field 'hours' must be a number")
    try:
        hours = float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"field 'hours' must be a number, got {value!r:.40}") from err
    if not math.isfinite(hours) or hours < 0 or hours > MAX_HOURS:
        raise InputError(f"field 'hours' must be between 0 and {MAX_HOURS:g}, got {hours:g}")
    return hours


def validate_ticket(raw: Mapping[str, Any] | Ticket | TicketIn, *, max_chars: int = 100_000,
                    source: str = "import") -> TicketIn:
    """Check one ticket; raises InputError saying what is wrong."""
    if isinstance(raw, TicketIn):
        return raw
    if isinstance(raw, Ticket):
        return TicketIn.from_row(raw)
    if not isinstance(raw, Mapping):
        raise InputError(f"a ticket must be an object with fields, got {type(raw).__name__}")
    raw_id = raw.get("id")
    if isinstance(raw_id, bool) or raw_id is None:
        raise InputError("field 'id' is missing")
    ticket_id = _clean_text(raw_id, field="id", max_chars=MAX_ID_CHARS + 1)
    if not ticket_id:
        raise InputError("field 'id' is empty")
    if len(ticket_id) > MAX_ID_CHARS:
        raise InputError(f"field 'id' is longer than {MAX_ID_CHARS} characters")
    fields = {name: _clean_text(raw.get(name), field=name, max_chars=max_chars) for name in TEXT_FIELDS}
    if not any(fields.values()):
        raise InputError("the ticket has no text (title, machine, condition or work_performed)")
    return TicketIn(
        id=ticket_id,
        hours=_clean_hours(raw.get("hours")),
        source=str(raw.get("source") or source)[:50],
        **fields,
    )


@dataclass
class UpsertOutcome:
    added: list[str]
    updated: list[str]
    unchanged: list[str]

    @property
    def changed(self) -> list[str]:
        return self.added + self.updated


def upsert_tickets(*, session: Session, tickets: Iterable[TicketIn]) -> UpsertOutcome:
    """Insert or update by id. A ticket whose content did not change is left alone (idempotent)."""
    by_id: dict[str, TicketIn] = {}
    for ticket in tickets:
        by_id[ticket.id] = ticket  # a later row with the same id wins
    outcome = UpsertOutcome([], [], [])
    ids = list(by_id)
    existing: dict[str, Ticket] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for row in session.scalars(select(Ticket).where(Ticket.id.in_(chunk))):
            existing[row.id] = row
    for ticket_id, ticket in by_id.items():
        digest = ticket.content_hash
        row = existing.get(ticket_id)
        if row is None:
            session.add(
                Ticket(
                    id=ticket_id,
                    title=ticket.title,
                    machine=ticket.machine,
                    condition=ticket.condition,
                    work_performed=ticket.work_performed,
                    hours=ticket.hours,
                    source=ticket.source,
                    content_hash=digest,
                )
            )
            outcome.added.append(ticket_id)
        elif row.content_hash == digest:
            outcome.unchanged.append(ticket_id)
        else:
            row.title, row.machine, row.condition = ticket.title, ticket.machine, ticket.condition
            row.work_performed, row.hours, row.source = ticket.work_performed, ticket.hours, ticket.source
            row.content_hash = digest
            outcome.updated.append(ticket_id)
    session.flush()
    # A clean version supersedes a quarantined one with the same id.
    delete_tickets(session=session, ids=list(by_id), table=QuarantinedTicket)
    return outcome


def delete_tickets(*, session: Session, ids: Iterable[str], table: type[Ticket] | type[QuarantinedTicket] = Ticket) -> list[str]:
    """Delete by id; returns the ids that existed."""
    wanted = list(dict.fromkeys(ids))
    deleted: list[str] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows = list(session.scalars(select(table).where(table.id.in_(chunk))))
        for row in rows:
            session.delete(row)
            deleted.append(row.id)
    session.flush()
    return deleted


# Quarantine: tickets that read like instructions to an assistant (core/trust.py). They live in their own
# table, so nothing that reads ``tickets`` (the index, citations, the export) can pick one up by mistake.


def quarantine_tickets(*, session: Session, tickets: Iterable[tuple[TicketIn, list[str]]]) -> list[str]:
    """Store (anonymized) tickets aside with the reasons; a ticket already in the index keeps its old,
    trusted version there until an admin releases the new one."""
    ids: list[str] = []
    for ticket, reasons in tickets:
        row = session.get(QuarantinedTicket, ticket.id)
        if row is None:
            row = QuarantinedTicket(id=ticket.id)
            session.add(row)
        row.title, row.machine, row.condition = ticket.title, ticket.machine, ticket.condition
        row.work_performed, row.hours, row.source = ticket.work_performed, ticket.hours, ticket.source
        row.reasons = list(reasons)
        ids.append(ticket.id)
    session.flush()
    return ids


def quarantined(*, session: Session, limit: int | None = None) -> list[tuple[TicketIn, list[str]]]:
    query = select(QuarantinedTicket).order_by(QuarantinedTicket.created_at, QuarantinedTicket.id)
    if limit is not None:
        query = query.limit(limit)
    return [
        (
            TicketIn(id=row.id, title=row.title or "", machine=row.machine or "", condition=row.condition or "",
                     work_performed=row.work_performed or "", hours=row.hours, source=row.source or "import"),
            list(row.reasons or []),
        )
        for row in session.scalars(query)
    ]  # fmt: skip


def release_quarantined(*, session: Session, ids: Iterable[str]) -> UpsertOutcome:
    """An admin vouches for these tickets: they move into the ticket store (the caller indexes them)."""
    wanted = set(ids)
    chosen = [ticket for ticket, _ in quarantined(session=session) if ticket.id in wanted]
    outcome = upsert_tickets(session=session, tickets=chosen)
    delete_tickets(session=session, ids=[t.id for t in chosen], table=QuarantinedTicket)
    return outcome


def get_tickets(*, session: Session, ids: list[str]) -> dict[str, TicketIn]:
    found: dict[str, TicketIn] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for row in session.scalars(select(Ticket).where(Ticket.id.in_(chunk))):
            found[row.id] = TicketIn.from_row(row)
    return found


def ticket_digests(*, session: Session) -> dict[str, str]:
    """id -> content hash for every ticket; rows written without a hash get one computed here."""
    digests: dict[str, str] = {}
    missing: list[str] = []
    for ticket_id, digest in session.execute(select(Ticket.id, Ticket.content_hash)):
        if digest:
            digests[ticket_id] = digest
        else:
            missing.append(ticket_id)
    for ticket in get_tickets(session=session, ids=missing).values():
        digests[ticket.id] = ticket.content_hash
    return digests


def store_stamp(*, session: Session) -> tuple[int, str]:
    """A cheap (count, newest update) pair: it changes when any writer adds, edits or deletes tickets."""
    count, newest = session.execute(select(func.count(Ticket.id), func.max(Ticket.updated_at))).one()
    return int(count or 0), str(newest or "")


def count_tickets(*, session: Session) -> int:
    return int(session.scalar(select(func.count(Ticket.id))) or 0)


def problem_text(ticket: TicketIn) -> str:
    """What the employee would have described: the query side of a (problem, resolution) pair."""
    return ". ".join(part for part in (ticket.title, ticket.machine, ticket.condition) if part)


def document_text(ticket: TicketIn) -> str:
    """Everything the ticket says, as indexed and as the positive side when tuning."""
    return ". ".join(part for part in (ticket.title, ticket.machine, ticket.condition, ticket.work_performed) if part)
