"""Rated conversations -> chat JSONL for fine-tuning, with a dataset card.

What goes where:

- ``train.jsonl`` / ``validation.jsonl``: ``{"messages": [{"role", "content", "weight"?}, ...]}``, one
  conversation per row, split by a hash of the conversation id (deterministic, no conversation in
  both). An assistant turn with ``"weight": 0`` is context only (unrated, or 👎 with no fix known);
  👍 answers and technicians' fixes that replace a 👎 answer are the targets.
- No preference (KTO) rows: nothing trains on them yet (model/train.py is supervised fine-tuning
  only), and data that nothing reads is not written. A 👎 answer without a fix stays as context.
- ``card.json`` and ``README.md``: counts, token statistics, the dataset hash.

Every text goes through a second anonymization pass (``bot.privacy.scrub``) before it is written,
even though the database only holds anonymized text: the training set outlives the database rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.schema import (
    Escalation,
    EscalationStatus,
    Message,
    MessageRole,
    MessageStatus,
    Rating,
    Ticket,
)
from core.types import TECHNICIAN_VIEW, TicketHit
from model.ratings import BAD, GOOD, message_score

log = logging.getLogger(__name__)

Scrub = Callable[[str], str]
TRAIN, VALIDATION = "train", "validation"
DEFAULT_VALIDATION_PERCENT = 10


@dataclass
class Record:
    """One conversation ready to be written: the split key and its chat messages."""

    key: str
    messages: list[dict[str, Any]]


@dataclass
class ExportSummary:
    out_dir: str
    dataset_hash: str
    counts: dict[str, int]
    tokens: dict[str, Any]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Conversations from the database -----------------------------------------------------------------


def _system_message(tickets: Sequence[Ticket]) -> dict[str, Any]:
    """The system prompt the answers were written under: same builder as the worker, cited tickets."""
    from model.prompt import build_messages

    hits = [
        TicketHit(id=t.id, title=t.title, machine=t.machine, condition=t.condition,
                  work_performed=t.work_performed, hours=t.hours)
        for t in tickets
    ]  # fmt: skip
    return build_messages(question="", tickets=hits)[0]


def rated_conversation_ids(session: Session, since: datetime | None = None) -> list[int]:
    """Conversations with a rated answer or a resolved escalation (a technician's fix is a target too);
    with ``since``, only those rated or resolved after it (a retrain's new data)."""
    rated = (
        select(Message.conversation_id)
        .join(Rating, Rating.message_id == Message.id)
        .where(Message.role == MessageRole.assistant)
    )
    resolved = select(Escalation.conversation_id).where(
        Escalation.status == EscalationStatus.resolved, Escalation.resolution.is_not(None)
    )
    if since is not None:
        rated = rated.where(Rating.created_at > since)
        resolved = resolved.where(Escalation.resolved_at > since)
    rows = session.execute(rated.union(resolved))
    return sorted({r[0] for r in rows})


def conversation_record(session: Session, conversation_id: int, counts: dict[str, int]) -> Record | None:
    """One stored conversation as chat turns with weights, or None when nothing in it can be trained."""
    messages = list(
        session.scalars(
            select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
        )
    )
    if any(m.status == MessageStatus.held for m in messages):
        # A held message failed anonymization: the conversation may carry raw personal data.
        counts["conversations_held"] += 1
        return None
    if any(m.flagged for m in messages):
        # The output check removed something planted (an address, a link): such material never trains.
        counts["conversations_flagged"] += 1
        return None
    ids = [m.id for m in messages]
    ratings: dict[int, list[Rating]] = defaultdict(list)
    for r in session.scalars(select(Rating).where(Rating.message_id.in_(ids))):
        ratings[r.message_id].append(r)
    resolutions = {
        e.message_id: e.resolution.strip()
        for e in session.scalars(
            select(Escalation).where(
                Escalation.conversation_id == conversation_id,
                Escalation.status == EscalationStatus.resolved,
                Escalation.message_id.is_not(None),
            )
        )
        if e.resolution and e.resolution.strip()
    }

    # A resolution belongs to the escalated question (Escalation.message_id, a user message) or, in
    # older rows, to the answer itself; either way it is the target for that question's answer.
    answered = {m.reply_to_id for m in messages if m.role == MessageRole.assistant and m.reply_to_id}
    turns: list[dict[str, Any]] = []
    consumed: set[int] = set()
    cited: list[str] = []
    for i, m in enumerate(messages):
        text = (m.text or "").strip()
        if m.id in consumed or m.role == MessageRole.system or not text:
            continue
        if m.role == MessageRole.user:
            turns.append({"role": "user", "content": text})
            if m.id in resolutions and m.id not in answered:
                # Escalated and never answered by the bot: the technician's fix is the answer.
                counts["answers_from_resolution"] += 1
                turns.append({"role": "assistant", "content": resolutions[m.id], "weight": 1})
            continue
        if m.role == MessageRole.technician:
            turns.append({"role": "assistant", "content": text, "weight": 0})
            continue
        # An assistant answer.
        if m.status == MessageStatus.failed:
            continue
        cited += [str(s) for s in (m.sources or []) if str(s) not in cited]
        score = message_score(ratings.get(m.id, []))
        if m.fallback and score == GOOD:
            # A 👍 on a ticket's own repair text quoted in place of the model's: the model earned nothing.
            # It stays as context, never as a target.
            counts["answers_fallback"] += 1
            turns.append({"role": "assistant", "content": text, "weight": 0})
            continue
        if any(str(note).startswith(TECHNICIAN_VIEW) for note in (m.meta or {}).get("composition", [])):
            # A technician's own question, answered with every matching ticket (workers/compose.py): a list
            # to troubleshoot with, not what an employee should be told, so never a target.
            counts["answers_technician_view"] += 1
            turns.append({"role": "assistant", "content": text, "weight": 0})
            continue
        resolved_fix = resolutions.get(m.id) or (resolutions.get(m.reply_to_id) if m.reply_to_id else None)
        if resolved_fix and score != GOOD and score != BAD:
            # Escalated without a rating: the technician's fix is what the answer should have been.
            counts["answers_replaced"] += 1
            turns.append({"role": "assistant", "content": resolved_fix, "weight": 1})
            continue
        if score == GOOD:
            counts["answers_good"] += 1
            turns.append({"role": "assistant", "content": text, "weight": 1})
        elif score == BAD:
            counts["answers_bad"] += 1
            fix = resolved_fix
            if fix is None:
                # Else the technician's next message in this conversation, before the next answer.
                for later in messages[i + 1 :]:
                    if later.role == MessageRole.assistant:
                        break
                    if later.role == MessageRole.technician and (later.text or "").strip():
                        fix = later.text.strip()
                        consumed.add(later.id)
                        break
            if fix:
                counts["answers_replaced"] += 1
                turns.append({"role": "assistant", "content": fix, "weight": 1})
            else:
                # Kept as context (the next user turn likely answers it) but never a target.
                counts["answers_unpaired"] += 1
                turns.append({"role": "assistant", "content": text, "weight": 0})
        else:
            turns.append({"role": "assistant", "content": text, "weight": 0})

    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    last = max((i for i, t in enumerate(turns) if t.get("weight")), default=-1)
    system = _system_message([t for t in (session.get(Ticket, tid) for tid in cited) if t is not None])
    record = Record(
        key=f"conversation:{conversation_id}", messages=[system, *turns[: last + 1]] if last >= 0 else []
    )
    if not record.messages:
        return None
    return record


def records_from_database(
    session: Session, counts: dict[str, int], since: datetime | None = None
) -> Iterator[Record]:
    for conversation_id in rated_conversation_ids(session, since):
        counts["conversations_rated"] += 1
        record = conversation_record(session, conversation_id, counts)
        if record is not None:
            yield record


# Conversations from files (bootstrapping before there are ratings) ------------------------------


def records_from_dialogues(path: Path, counts: dict[str, int]) -> Iterator[Record]:
    """Customer-care dialogues ``{"conversation_id", "turns": [{"speaker": customer|agent, "text"}]}``.

    Agent turns become trained assistant turns; consecutive turns by one speaker are joined.
    """
    for number, row in _jsonl(path, counts):
        turns = row.get("turns")
        if not isinstance(turns, list):
            counts["rows_malformed"] += 1
            continue
        messages: list[dict[str, Any]] = []
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                continue
            role = "assistant" if turn.get("speaker") == "agent" else "user"
            text = turn["text"].strip()
            if not text:
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
        while messages and messages[0]["role"] != "user":
            messages.pop(0)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if not messages:
            counts["rows_without_answer"] += 1
            continue
        yield Record(key=f"dialogue:{row.get('conversation_id', number)}", messages=messages)


def records_from_tickets(path: Path, counts: dict[str, int]) -> Iterator[Record]:
    """Resolved tickets as one-turn Q/A: the reported problem -> the work performed."""
    from core.trust import instruction_signals

    for number, row in _jsonl(path, counts):
        title = str(row.get("title") or "").strip()
        fix = str(row.get("work_performed") or "").strip()
        if not title or not fix:
            counts["rows_without_answer"] += 1
            continue
        if instruction_signals(title, fix, str(row.get("machine") or row.get("part") or "")):
            counts["rows_quarantined"] += 1  # would be quarantined at ingest; never a training target
            continue
        question = title
        if row.get("machine") or row.get("part"):
            question += f"\n(machine/part: {row.get('machine') or row.get('part')})"
        yield Record(
            key=f"ticket:{row.get('ticket_id') or row.get('id') or number}",
            messages=[{"role": "user", "content": question}, {"role": "assistant", "content": fix}],
        )


def records_from_store(session: Session, index: Any, counts: dict[str, int], *, neighbours: int = 2,
                       limit: int | None = None) -> Iterator[Record]:
    """The company's own resolved tickets (already anonymized and screened at ingest) as the first
    training set: the reported problem -> the repair that was done, under the system prompt the worker
    would build, quoting the ticket's nearest *other* tickets, so that the model learns to write a fix
    from similar tickets as it must when it serves, not to copy the one ticket it was shown."""
    from model.prompt import build_messages
    from retrieval.store import TicketIn, problem_text

    query = select(Ticket).where(Ticket.work_performed != "").order_by(Ticket.id)
    if limit:
        query = query.limit(limit)
    for row in session.scalars(query):
        ticket = TicketIn.from_row(row)
        question = problem_text(ticket)
        if not question or not ticket.work_performed.strip():
            counts["rows_without_answer"] += 1
            continue
        counts["rows_read"] += 1
        hits = [h for h in index.search(question, k=neighbours + 1).hits if h.id != ticket.id][:neighbours]
        system = build_messages(question="", tickets=hits)[0]
        yield Record(
            key=f"ticket:{ticket.id}",
            messages=[system, {"role": "user", "content": question},
                      {"role": "assistant", "content": ticket.work_performed.strip()}],
        )


def _jsonl(path: Path, counts: dict[str, int]) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            counts["rows_read"] += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                counts["rows_malformed"] += 1
                continue
            if not isinstance(row, dict):
                counts["rows_malformed"] += 1
                continue
            yield number, row


# Writing ------------------------------------------------------------------------------------------


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def split_of(key: str, validation_percent: int) -> str:
    """Deterministic: the same conversation always lands in the same split."""
    return VALIDATION if _bucket(key) % 100 < validation_percent else TRAIN


def _fingerprint(messages: Iterable[dict[str, Any]]) -> str:
    norm = [
        (m["role"], re.sub(r"\s+", " ", m["content"]).strip().lower(), m.get("weight", 1)) for m in messages
    ]
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()


def write_dataset(
    records: Iterable[Record],
    out_dir: Path,
    *,
    scrub: Scrub | None,
    counts: dict[str, int],
    source: str,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    tokenizer: Any = None,
    max_seq_len: int = 1024,
) -> ExportSummary:
    """Scrub, deduplicate, split and write; then the card. Files appear whole or not at all."""
    if not 0 <= validation_percent < 100:
        raise InputError("validation_percent must be in [0, 100)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder")
    cache: dict[str, str] = {}

    def clean_part(text: str) -> str:
        if text not in cache:
            cache[text] = scrub(text)  # type: ignore[misc]
        return cache[text]

    def clean(text: str) -> str:
        if scrub is None:
            return text
        # Paragraph by paragraph: a bootstrapped conversation's system turn repeats the instructions and
        # quotes tickets that its neighbours quote too, so each paragraph is scrubbed once, not per turn.
        return "\n\n".join(clean_part(part) for part in text.split("\n\n"))

    def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "content": clean(m["content"])} for m in messages]

    seen: set[str] = set()
    rows: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    chats: dict[str, list[list[dict[str, Any]]]] = {TRAIN: [], VALIDATION: []}
    train_keys: list[str] = []
    for record in records:
        split = split_of(record.key, validation_percent)
        if record.messages:
            messages = clean_messages(record.messages)
            fp = _fingerprint(messages)
            if fp in seen:
                counts["duplicates_dropped"] += 1
            else:
                seen.add(fp)
                rows[split].append(json.dumps({"messages": messages}, ensure_ascii=False))
                chats[split].append(messages)
                if split == TRAIN:
                    train_keys.append(record.key)
    if not rows[TRAIN] and not rows[VALIDATION]:
        raise InputError(
            "nothing to export: no conversation has a trained answer (rate answers with /good or "
            f"`supportbot rate`); counts: {dict(counts)}"
        )
    if validation_percent and not rows[VALIDATION] and len(rows[TRAIN]) >= 2:
        # Tiny exports: still hold one conversation back, picked by the same hash every time.
        index = min(range(len(train_keys)), key=lambda i: _bucket(train_keys[i]))
        log.info("no conversation fell into validation; holding back %s", train_keys[index])
        rows[VALIDATION].append(rows[TRAIN].pop(index))
        chats[VALIDATION].append(chats[TRAIN].pop(index))

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN, VALIDATION):
        _write_atomic(out_dir / f"{name}.jsonl", "".join(line + "\n" for line in rows[name]))
    counts.update(
        examples_train=len(rows[TRAIN]),
        examples_validation=len(rows[VALIDATION]),
    )
    tokens = token_stats(chats, tokenizer, max_seq_len) if tokenizer is not None else {}
    summary = ExportSummary(
        out_dir=str(out_dir),
        dataset_hash=dataset_hash(out_dir),
        counts=dict(counts),
        tokens=tokens,
        source=source,
    )
    card = {
        **summary.to_dict(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "validation_percent": validation_percent,
        "second_pass_scrub": scrub is not None,
        "format": "chat JSONL; assistant turns with weight 0 are context only",
    }
    _write_atomic(out_dir / "card.json", json.dumps(card, indent=2) + "\n")
    _write_atomic(out_dir / "README.md", render_card(card))
    return summary


def token_stats(
    chats: dict[str, list[list[dict[str, Any]]]], tokenizer: Any, max_seq_len: int
) -> dict[str, Any]:
    """Per split: tokens per conversation (after the chat template) and trained answer tokens."""
    from model.train import tokenize

    stats: dict[str, Any] = {"tokenizer": getattr(tokenizer, "name_or_path", ""), "max_seq_len": max_seq_len}
    for split, conversations in chats.items():
        lengths, targets, truncated = [], 0, 0
        for messages in conversations:
            full = tokenize(tokenizer, messages, 10**9)
            fitted = tokenize(tokenizer, messages, max_seq_len)
            if full is None:
                continue
            lengths.append(len(full.ids))
            targets += full.n_targets
            truncated += bool(fitted is None or fitted.truncated)
        if not lengths:
            stats[split] = {"conversations": 0}
            continue
        ordered = sorted(lengths)
        stats[split] = {
            "conversations": len(lengths),
            "tokens": sum(lengths),
            "target_tokens": targets,
            "tokens_min": ordered[0],
            "tokens_mean": round(statistics.fmean(lengths), 1),
            "tokens_p50": ordered[len(ordered) // 2],
            "tokens_p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "tokens_max": ordered[-1],
            "over_max_seq_len": truncated,
        }
    return stats


def render_card(card: dict[str, Any]) -> str:
    counts = "\n".join(f"| {k} | {v} |" for k, v in sorted(card["counts"].items()))
    token_rows = []
    for split in (TRAIN, VALIDATION):
        s = card["tokens"].get(split)
        if s and s.get("conversations"):
            token_rows.append(
                f"| {split} | {s['conversations']} | {s['tokens']} | {s['target_tokens']} | {s['tokens_mean']} "
                f"| {s['tokens_p95']} | {s['tokens_max']} | {s['over_max_seq_len']} |"
            )
    tokens = (
        "| split | conversations | tokens | target tokens | mean | p95 | max | over max_seq_len |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(token_rows)
        if token_rows
        else "(no tokenizer given)"
    )
    return f"""# supportbot fine-tuning data

Source: {card["source"]}. Created {card["created_at"]}. Dataset hash `{card["dataset_hash"]}`.
Second anonymization pass: {"yes" if card["second_pass_scrub"] else "NO"}.
Split: {card["validation_percent"]}% of conversations to validation, by a hash of the conversation key.

Files: `train.jsonl`, `validation.jsonl` (chat messages; an assistant turn with `"weight": 0` is
context only).

## Counts

| what | n |
|---|---|
{counts}

## Tokens

{tokens}
"""


def dataset_hash(data_dir: Path) -> str:
    """The identity of a training set: a hash of its train and validation files."""
    digest = hashlib.sha256()
    for name in (TRAIN, VALIDATION):
        path = data_dir / f"{name}.jsonl"
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def new_counts() -> dict[str, int]:
    return defaultdict(int)


# The service functions -----------------------------------------------------------------------------


def export(
    *,
    session: Session,
    out_dir: Path,
    scrub: Scrub | None,
    tokenizer: Any = None,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    max_seq_len: int = 1024,
    since: datetime | None = None,
) -> ExportSummary:
    """Rated conversations from the database into ``out_dir`` (with ``since``: only those rated after it).
    InputError when there is nothing to train."""
    counts = new_counts()
    return write_dataset(
        records_from_database(session, counts, since),
        out_dir,
        scrub=scrub,
        counts=counts,
        source="rated conversations",
        validation_percent=validation_percent,
        tokenizer=tokenizer,
        max_seq_len=max_seq_len,
    )


def export_store(
    *,
    session: Session,
    index: Any,
    out_dir: Path,
    scrub: Scrub | None,
    tokenizer: Any = None,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    max_seq_len: int = 1024,
    limit: int | None = None,
) -> ExportSummary:
    """The stored tickets as question -> answer conversations (``records_from_store``), to bootstrap."""
    counts = new_counts()
    return write_dataset(
        records_from_store(session, index, counts, limit=limit),
        out_dir,
        scrub=scrub,
        counts=counts,
        source="stored tickets",
        validation_percent=validation_percent,
        tokenizer=tokenizer,
        max_seq_len=max_seq_len,
    )


def export_file(
    *,
    path: Path,
    kind: str,
    out_dir: Path,
    scrub: Scrub | None,
    tokenizer: Any = None,
    validation_percent: int = DEFAULT_VALIDATION_PERCENT,
    max_seq_len: int = 1024,
    limit: int | None = None,
) -> ExportSummary:
    """Historical ``dialogues`` or resolved ``tickets`` (JSONL) into the same format, to bootstrap."""
    counts = new_counts()
    readers = {"dialogues": records_from_dialogues, "tickets": records_from_tickets}
    if kind not in readers:
        raise InputError(f"kind is one of {', '.join(readers)}, not {kind!r}")
    records: Iterable[Record] = readers[kind](path, counts)
    if limit is not None:
        records = (r for i, r in enumerate(records) if i < limit)
    return write_dataset(
        records,
        out_dir,
        scrub=scrub,
        counts=counts,
        source=f"{kind} file {path.name}",
        validation_percent=validation_percent,
        tokenizer=tokenizer,
        max_seq_len=max_seq_len,
    )
