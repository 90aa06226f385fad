"""Reading ticket files (JSONL or CSV) into the store and the index.

Every row is checked first; bad rows are reported with their line number and skipped. Tickets are
untrusted text like chat messages: every text field is anonymized by the same privacy layer before it
is stored or indexed, and a ticket that reads like instructions to an assistant is quarantined (stored
aside, never indexed) until an admin releases it. The good rows go into SQL in one transaction, and the
index follows after the commit: a crash never leaves half a file in SQL, and an index failure leaves SQL
as the truth with the index marked stale. The report says what happened to every row.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.db import Database
from core.errors import InputError, PrivacyError, RetrievalError
from core.settings import Settings
from core.trust import instruction_signals
from core.types import Anonymized
from retrieval import store
from retrieval.store import TEXT_FIELDS, TicketIn

# text -> anonymized text with the masked spans; raises PrivacyError (then nothing of the row is kept).
Anonymize = Callable[[str], Anonymized]

TARGET_FIELDS = ("id", *TEXT_FIELDS, "hours")
# Names other exports commonly use for our fields; an explicit --map always wins.
ALIASES = {"ticket_id": "id"}
MAX_FILE_BYTES = 2 * 1024**3
MAX_LINE_CHARS = 2_000_000
MAX_REPORTED_ERRORS = 50


@dataclass
class RowError:
    line: int
    reason: str


@dataclass
class RowNote:
    """Something done to one row: a field cut or masked, a duplicate id, a quarantine."""

    line: int
    id: str
    detail: str


@dataclass
class IngestReport:
    path: str
    rows: int = 0
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[RowError] = field(default_factory=list)  # rejected rows, with the reason
    duplicate_rows: list[RowNote] = field(default_factory=list)  # an earlier row with an id a later one replaced
    truncated: list[RowNote] = field(default_factory=list)  # detail: the field cut to the stored limit
    masked: list[RowNote] = field(default_factory=list)  # one per field, detail: "field: TYPE, TYPE"
    quarantined: list[RowNote] = field(default_factory=list)  # detail: the reasons
    indexed: bool = False
    index_error: str | None = None
    lines: dict[str, int] = field(default_factory=dict, repr=False)  # ticket id -> the line that won

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_rows)

    @property
    def stored(self) -> bool:
        return bool(self.added or self.updated or self.unchanged or self.quarantined)

    def problems(self) -> list[str]:
        """What ``--strict`` refuses: anything but a clean add, update or no-op."""
        found = [f"line {e.line}: rejected: {e.reason}" for e in self.skipped]
        found += [f"line {n.line}: {n.id}: {n.detail}" for n in self.duplicate_rows]
        found += [f"line {n.line}: {n.id}: {n.detail} cut to the stored limit" for n in self.truncated]
        found += [f"line {n.line}: {n.id}: masked {n.detail}" for n in self.masked]
        found += [f"line {n.line}: {n.id}: quarantined ({n.detail})" for n in self.quarantined]
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "added": len(self.added),
            "updated": len(self.updated),
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "duplicates": self.duplicates,
            "truncated_fields": len(self.truncated),
            "masked_fields": len(self.masked),
            "masked_tickets": len({n.id for n in self.masked}),
            "quarantined": len(self.quarantined),
            "indexed": self.indexed,
            "index_error": self.index_error,
        }

    def details(self) -> dict[str, Any]:
        """Every row's fate, for ``--json``."""
        return {
            **self.summary(),
            "added_ids": self.added,
            "updated_ids": self.updated,
            "rejected": [{"line": e.line, "reason": e.reason} for e in self.skipped],
            "duplicate_rows": [{"line": n.line, "id": n.id, "detail": n.detail} for n in self.duplicate_rows],
            "truncated_rows": [{"line": n.line, "id": n.id, "field": n.detail} for n in self.truncated],
            "masked_rows": [{"line": n.line, "id": n.id, "detail": n.detail} for n in self.masked],
            "quarantined_tickets": [{"line": n.line, "id": n.id, "reasons": n.detail} for n in self.quarantined],
        }


@dataclass
class Screened:
    """A ticket after the privacy layer and the instruction check."""

    ticket: TicketIn  # anonymized
    masked: dict[str, list[str]]  # field -> the entity types masked in it
    reasons: list[str]  # why it reads like instructions; non-empty means quarantine


def screen_ticket(ticket: TicketIn, anonymize: Anonymize) -> Screened:
    """Check the raw text for planted instructions (before masking hides an attacker's address), then
    anonymize every text field. Raises PrivacyError when a field cannot be anonymized."""
    reasons = instruction_signals(*(getattr(ticket, name) for name in TEXT_FIELDS))
    values: dict[str, str] = {}
    masked: dict[str, list[str]] = {}
    for name in TEXT_FIELDS:
        text = getattr(ticket, name)
        if not text:
            continue
        result = anonymize(text)
        values[name] = result.text
        if result.entities:
            masked[name] = sorted({e.type for e in result.entities})
    return Screened(replace(ticket, **values), masked, reasons)


def stored_limit(settings: Settings) -> int:
    """Characters of one ticket field that are kept: what the privacy layer anonymizes in bounded time
    (privacy_max_chars), never more than max_stored_chars. Cut here, so the report says so."""
    return min(settings.max_stored_chars, settings.privacy_max_chars)


def ticket_anonymizer(settings: Settings) -> Anonymize:
    """The one privacy layer of the product: tickets are masked exactly like chat messages."""
    from bot.privacy import Anonymizer

    anonymizer = Anonymizer.from_settings(settings)
    return lambda text: anonymizer.anonymize(text, scope=None)


def store_screened(*, session: Any, screened: Iterable[Screened]) -> store.UpsertOutcome:
    """Clean tickets into the store, the rest into quarantine; one transaction is the caller's session."""
    items = list(screened)
    store.quarantine_tickets(session=session, tickets=[(s.ticket, s.reasons) for s in items if s.reasons])
    return store.upsert_tickets(session=session, tickets=[s.ticket for s in items if not s.reasons])


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """``["question=title", "answer=work_performed"]`` -> {"question": "title", ...} (source -> our field)."""
    mapping: dict[str, str] = {}
    for item in items or []:
        source, sep, target = item.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise InputError(f"--map wants SOURCE=FIELD, got {item!r}")
        if target not in TARGET_FIELDS:
            raise InputError(f"--map target {target!r} is not one of {', '.join(TARGET_FIELDS)}")
        mapping[source] = target
    return mapping


def apply_mapping(raw: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    mapped_targets = set(mapping.values())
    for key, value in raw.items():
        target = mapping.get(key)
        if target is None and key not in mapping:
            target = key if key in TARGET_FIELDS else ALIASES.get(key)
            if target in mapped_targets:
                continue  # an explicit mapping to this field wins over a same-named column
        if target is None:
            continue
        if target in row and row[target] not in (None, "") and value not in (None, ""):
            # Two sources mapped to one field: keep both texts.
            row[target] = f"{row[target]}\n{value}"
        elif value not in (None, "") or target not in row:
            row[target] = value
    return row


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty")
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path} is larger than {MAX_FILE_BYTES // 1024**3} GiB; split it")
    with open(path, "rb") as handle:
        head = handle.read(8192)
    if b"\x00" in head:
        raise InputError(f"{path} looks binary (NUL bytes); expected JSONL or CSV text")


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line number, raw row or None, error or None) for a .jsonl/.json or .csv file."""
    _check_file(path)
    try:
        text_stream = open(path, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err
    with text_stream:
        if path.suffix.lower() == ".csv":
            yield from _read_csv(text_stream)
        else:
            yield from _read_jsonl(text_stream)


def _read_jsonl(stream: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    line_no = 0
    while True:
        try:
            line = stream.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError as err:
            yield line_no + 1, None, f"not UTF-8 text ({err.reason}); the rest of the file is skipped"
            return
        if not line:
            return
        line_no += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            # Drain the rest of this oversized line.
            while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            yield line_no, None, f"line longer than {MAX_LINE_CHARS} characters"
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, None, f"invalid JSON: {err.msg} at column {err.colno}"
            continue
        if not isinstance(value, dict):
            yield line_no, None, f"expected a JSON object, got {type(value).__name__}"
            continue
        yield line_no, value, None


def _read_csv(stream: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    csv.field_size_limit(min(sys.maxsize, MAX_LINE_CHARS))
    reader = csv.DictReader(stream)
    try:
        if not reader.fieldnames:
            return
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield reader.line_num, None, f"malformed CSV: {err}"
                continue
            line_no = reader.line_num
            if None in raw:
                yield line_no, None, "more values than header columns"
                continue
            yield line_no, {k: v for k, v in raw.items() if k is not None}, None
    except UnicodeDecodeError as err:
        yield reader.line_num + 1, None, f"not UTF-8 text ({err.reason}); the rest of the file is skipped"


def parse_file(path: Path, *, mapping: Mapping[str, str] | None, max_chars: int,
               source: str = "import") -> tuple[list[TicketIn], IngestReport]:
    """Validated tickets (the last row with an id wins) and a report of what was rejected, cut or
    overwritten. Nothing is anonymized here; ``ingest_file`` does that before storing."""
    report = IngestReport(path=str(path))
    tickets: dict[str, TicketIn] = {}
    lines: dict[str, int] = {}
    for line_no, raw, error in read_rows(path):
        report.rows += 1
        if error is None and raw is not None:
            row = apply_mapping(raw, mapping or {})
            try:
                ticket = store.validate_ticket(row, max_chars=max_chars, source=source)
            except InputError as err:
                error = str(err)
            else:
                if ticket.id in tickets:
                    report.duplicate_rows.append(
                        RowNote(lines[ticket.id], ticket.id, f"duplicate id: replaced by line {line_no}")
                    )
                    report.truncated = [n for n in report.truncated if n.id != ticket.id]
                tickets[ticket.id] = ticket  # the last row with an id wins
                lines[ticket.id] = line_no
                for name in TEXT_FIELDS:
                    value = row.get(name)
                    if isinstance(value, str) and len(value.strip()) > max_chars:
                        report.truncated.append(RowNote(line_no, ticket.id, name))
                continue
        report.skipped.append(RowError(line=line_no, reason=error or "unreadable row"))
    report.lines = lines
    return list(tickets.values()), report


def ingest_file(*, settings: Settings, db: Database, path: Path | str, mapping: Mapping[str, str] | None = None,
                progress: bool = False, index: Any = None, anonymize: Anonymize | None = None,
                strict: bool = False) -> IngestReport:
    """Validate a ticket file, anonymize and screen every row, store them in one transaction, then
    update the index. With ``strict``, any row that is not a clean add or update stops the whole file
    before anything is stored."""
    path = Path(path)
    tickets, report = parse_file(path, mapping=mapping, max_chars=stored_limit(settings))
    lines = report.lines
    if not tickets:
        if report.skipped:
            if strict:
                raise InputError(_strict_message(path, report))
            return report
        raise InputError(f"{path} holds no tickets")
    anonymize = anonymize or ticket_anonymizer(settings)
    screened: list[Screened] = []
    for ticket in tickets:
        try:
            result = screen_ticket(ticket, anonymize)
        except PrivacyError as err:
            # Never stored raw: a row the privacy layer cannot handle is rejected, with the reason.
            report.skipped.append(RowError(line=lines[ticket.id], reason=f"not stored: {err}"))
            continue
        for name, types in result.masked.items():
            report.masked.append(RowNote(lines[ticket.id], ticket.id, f"{name}: {', '.join(types)}"))
        if result.reasons:
            report.quarantined.append(RowNote(lines[ticket.id], ticket.id, ", ".join(result.reasons)))
        screened.append(result)
    if strict and report.problems():
        raise InputError(_strict_message(path, report))
    if not screened:
        return report
    with db.session() as session:
        outcome = store_screened(session=session, screened=screened)
    report.added, report.updated, report.unchanged = outcome.added, outcome.updated, len(outcome.unchanged)
    if not outcome.changed and index is None and not outcome.unchanged:
        report.indexed = True  # only quarantined rows: the index has nothing new
        return report
    try:
        if index is None:
            from retrieval.search import TicketIndex

            # Opening reconciles with SQL, which already holds this file: the rows get embedded there.
            index = TicketIndex.open(settings=settings, db=db, progress=progress)
        else:
            index.index_changes(changed=outcome.changed, removed=[], progress=progress)
        report.indexed = True
    except RetrievalError as err:
        report.index_error = str(err)
    except Exception as err:  # the SQL state stands; the next open repairs the index
        _mark_stale(settings)
        report.index_error = f"index update failed, marked stale: {err}"
    return report


def _strict_message(path: Path, report: IngestReport) -> str:
    problems = report.problems()
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return f"--strict: nothing stored from {path}: {shown}"


def _mark_stale(settings: Settings) -> None:
    try:
        settings.index_dir.mkdir(parents=True, exist_ok=True)
        (settings.index_dir / "STALE").write_text("ingest", encoding="utf-8")
    except OSError:
        pass
