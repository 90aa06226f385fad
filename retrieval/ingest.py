"""Reading ticket files (JSONL or CSV) into the store and the index.

Every row is checked first; bad rows are reported with their line number and skipped. The good rows
go into SQL in one transaction, and the index follows after the commit: a crash never leaves half a
file in SQL, and an index failure leaves SQL as the truth with the index marked stale.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.db import Database
from core.errors import InputError, RetrievalError
from core.settings import Settings
from retrieval import store
from retrieval.store import TEXT_FIELDS, TicketIn

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
class IngestReport:
    path: str
    rows: int = 0
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[RowError] = field(default_factory=list)
    duplicates: int = 0
    indexed: bool = False
    index_error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "added": len(self.added),
            "updated": len(self.updated),
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "duplicates": self.duplicates,
            "indexed": self.indexed,
            "index_error": self.index_error,
        }


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
    report = IngestReport(path=str(path))
    tickets: dict[str, TicketIn] = {}
    for line_no, raw, error in read_rows(path):
        report.rows += 1
        if error is None and raw is not None:
            try:
                ticket = store.validate_ticket(apply_mapping(raw, mapping or {}), max_chars=max_chars,
                                               source=source)
            except InputError as err:
                error = str(err)
            else:
                if ticket.id in tickets:
                    report.duplicates += 1
                tickets[ticket.id] = ticket  # the last row with an id wins
                continue
        report.skipped.append(RowError(line=line_no, reason=error or "unreadable row"))
    return list(tickets.values()), report


def ingest_file(*, settings: Settings, db: Database, path: Path | str, mapping: Mapping[str, str] | None = None,
                progress: bool = False, index: Any = None) -> IngestReport:
    """Validate a ticket file, store the good rows in one transaction, then update the index."""
    path = Path(path)
    tickets, report = parse_file(path, mapping=mapping, max_chars=settings.max_stored_chars)
    if not tickets:
        if report.skipped:
            return report
        raise InputError(f"{path} holds no tickets")
    with db.session() as session:
        outcome = store.upsert_tickets(session=session, tickets=tickets)
    report.added, report.updated, report.unchanged = outcome.added, outcome.updated, len(outcome.unchanged)
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


def _mark_stale(settings: Settings) -> None:
    try:
        settings.index_dir.mkdir(parents=True, exist_ok=True)
        (settings.index_dir / "STALE").write_text("ingest", encoding="utf-8")
    except OSError:
        pass
