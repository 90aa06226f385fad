"""``supportbot eval rag``: the real answer path on questions whose tickets are not in the index.

For each held-out question: retrieve from an index of the other tickets, prompt, generate with the
model the workers would serve (base + active adapter), compose exactly as the worker does, and score the
delivered answer with ROUGE-1/2/L (F1, stemmed) against the repair that was really done. Two baselines
run on the same questions in the same run:

- ``top_ticket``: the repair text of the top retrieved ticket, as it stands (what retrieval alone gives);
- ``no_retrieval``: the base model answering the question without tickets (what the model alone gives).

The delivered answer is scored on what carries the fix: the model's kept text and the quoted repair.
The "Sources:" and fix-time lines and the "What fixed this before:" wrapper are formatting, not content,
and are left out of the score (they are the same for every answer and would only add noise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import texts
from core.errors import InputError
from core.settings import Settings
from model.prompt import build_messages, estimate_hours
from retrieval.evaluate import json_objects
from workers.compose import by_model, compose, is_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    id: str
    question: str
    reference: str


def held_out(ticket_id: str, percent: int, offset: int = 0) -> bool:
    """Deterministic split by ticket id: the same ticket is always on the same side. ``offset`` moves the
    held-out band (ids whose bucket is in [offset, offset + percent)): a band other than the reported
    one is where the composer's rules may be developed without touching the reported questions."""
    bucket = int(hashlib.sha256(ticket_id.encode()).hexdigest()[:8], 16) % 100
    return (bucket - offset) % 100 < percent


def _id(row: dict[str, Any], number: int) -> str:
    return str(row.get("id") or row.get("ticket_id") or number)


def split_tickets(
    rows: list[dict[str, Any]], percent: int, offset: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    index, asked = [], []
    for number, row in enumerate(rows):
        (asked if held_out(_id(row, number), percent, offset) else index).append(row)
    return index, asked


_SOURCES = texts.SOURCES.split("{", 1)[0]
_FIX_TIME = texts.FIX_TIME.split("{", 1)[0]
_FIXED_BEFORE = texts.FIXED_BEFORE.split("{", 1)[0]


def scored_text(answer: str) -> str:
    """The part of a delivered answer that carries the fix (see the module docstring)."""
    kept = []
    for line in answer.splitlines():
        line = line.strip()
        if not line or line.startswith((_SOURCES, _FIX_TIME)):
            continue
        if line.startswith(_FIXED_BEFORE):
            line = re.sub(r"\s*\([^()]*\)$", "", line[len(_FIXED_BEFORE) :])  # "(SB-1, about 0.5 h)"
        kept.append(line)
    return "\n".join(kept)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def evaluate_rag(
    *,
    settings: Settings,
    tickets: Path,
    questions: Path | None = None,
    holdout_percent: int = 10,
    holdout_offset: int = 0,
    question_field: str = "title",
    reference_field: str = "work_performed",
    limit: int | None = 50,
    adapter: str | None = None,
    cases_out: Path | None = None,
    model_baseline: bool = True,
) -> dict[str, Any]:
    """The report described in the module docstring. ``questions`` None: hold out a share of ``tickets``."""
    from model.evaluate import rouge
    from model.runtime import LanguageModel
    from retrieval.evaluate import temporary_store
    from retrieval.ingest import ingest_file
    from retrieval.search import TicketIndex
    from workers.answering import prompt_tickets

    rows = json_objects(tickets)
    if questions is None:
        index_rows, asked_rows = split_tickets(rows, holdout_percent, holdout_offset)
    else:
        index_rows = rows
        asked_rows = json_objects(questions)
    cases = [
        Case(_id(r, n), str(r.get(question_field) or "").strip(), str(r.get(reference_field) or "").strip())
        for n, r in enumerate(asked_rows)
    ]
    # The split is by id, so a held-out question's own ticket is never in the index.
    cases = [c for c in cases if c.question and c.reference]
    if limit:
        cases = cases[:limit]
    if not cases:
        raise InputError("no question with a reference answer to evaluate")

    lm = LanguageModel(settings)
    if adapter:
        lm.use_adapter(adapter)
    delivered, top_ticket, no_retrieval, references = [], [], [], []
    latencies: list[float] = []
    shown: list[dict[str, Any]] = []  # each case as it went, for --cases-out
    fallback = loops = not_sure = 0
    with temporary_store(settings) as (temp_settings, db):
        history = temp_settings.data_dir / "history.jsonl"
        history.write_text("".join(json.dumps(r) + "\n" for r in index_rows), encoding="utf-8")
        report = ingest_file(settings=temp_settings, db=db, path=history)
        if report.index_error:
            raise InputError(f"indexing {tickets} failed: {report.index_error}")
        index = TicketIndex.open(settings=temp_settings, db=db)
        for case in cases:
            started = time.perf_counter()
            result = index.search(case.question, k=settings.retrieval_k)
            if result.hits and result.confidence >= settings.min_confidence:
                hits = prompt_tickets(result, settings.min_confidence)  # what the worker shows the model
                messages = build_messages(question=case.question, tickets=hits)
                generation = lm.generate([messages])[0]
                hits = by_model(hits, lambda fixes: lm.score(messages, fixes), settings.rank_fixes,  # noqa: B023
                                adapted=lm.adapter_path is not None)
                composed = compose(generation.text, hits, estimate_hours(hits), question=case.question,
                                   trusted_domains=settings.trusted_domains, certainty=generation.certainty)
                answer, fell_back, notes = composed.text, composed.fallback, composed.notes
                lead, certainty = hits[0].id, generation.certainty
                model_text = generation.text
            else:
                answer, fell_back, notes, model_text, lead = texts.NOT_SURE, False, ["not sure"], "", None
                certainty = None
                not_sure += 1
            latencies.append((time.perf_counter() - started) * 1000)
            fallback += fell_back
            loops += is_loop(answer)
            delivered.append(scored_text(answer))
            top_ticket.append(result.hits[0].work_performed if result.hits else "")
            references.append(case.reference)
            shown.append({"id": case.id, "question": case.question, "reference": case.reference,
                          "model_text": model_text, "certainty": certainty, "answer": answer, "fallback": fell_back, "notes": notes,
                          "hits": [h.id for h in result.hits], "lead": lead})
        served = lm.version if adapter else settings.base_model
        # The model alone, on the same questions: the base model, no adapter, no tickets. It does not
        # depend on the adapter, so a comparison of adapters on the same questions may skip it.
        if model_baseline:
            lm.use_adapter(None)
            for case in cases:
                generation = lm.generate([build_messages(question=case.question)])[0]
                no_retrieval.append(generation.text)
    if cases_out is not None:
        cases_out.write_text("".join(json.dumps(c) + "\n" for c in shown), encoding="utf-8")

    n = len(cases)
    return {
        "questions": n,
        "indexed_tickets": len(report.added) + len(report.updated) + report.unchanged,
        "model": served,
        "rank_fixes": settings.rank_fixes,
        "lead_moved": sum(1 for c in shown if c["lead"] and c["hits"] and c["lead"] != c["hits"][0]),
        "delivered": rouge(delivered, references),
        "baselines": {"top_ticket": rouge(top_ticket, references),
                      "no_retrieval": rouge(no_retrieval, references) if model_baseline else None},
        "model_text_dropped": round(fallback / n, 3),
        "not_sure": round(not_sure / n, 3),
        "answers_with_loops": loops,
        "latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                       "mean": round(statistics.fmean(latencies), 1)},
    }
