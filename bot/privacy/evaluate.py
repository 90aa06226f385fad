"""`supportbot eval privacy`: recall on labelled PII, over-masking on real tickets, latency per message.

Data (public, under ../shared/data; never copied into the repo):
- pii/presidio_synth_v2.json: synthetic sentences with labelled spans (per-type recall),
- pii/wnut17/emerging.dev.conll: real noisy social-media text (PERSON recall; train file only used to tune),
- tickets/maintnet_dev.jsonl: real maintenance tickets that hold no personal data (share with any mask),
- tickets/dellqa_dev.jsonl, odd rows: real IT forum questions (share with any mask; a few do hold names,
  so this is an upper bound on over-masking). The name model trains on the even rows only.
A labelled span counts as caught when masks cover every non-space character of it (any mask type:
what matters for privacy is that the value is gone).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.privacy.anonymizer import Anonymizer
from core.types import Entity

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@dataclass
class Timer:
    samples_ms: list[float] = field(default_factory=list)

    def detect(self, anonymizer: Anonymizer, text: str) -> list[Entity]:
        """The whole anonymize call is timed: detection, pseudonyms and replacement."""
        started = time.perf_counter()
        found = anonymizer.anonymize(text).entities
        self.samples_ms.append((time.perf_counter() - started) * 1000)
        return found

    def summary(self) -> dict[str, float]:
        if not self.samples_ms:
            return {}
        ordered = sorted(self.samples_ms)
        return {
            "messages": len(ordered),
            "p50_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        }


def covered(text: str, start: int, end: int, found: list[Entity]) -> bool:
    masked = set()
    for d in found:
        masked.update(range(d.start, d.end))
    return all(i in masked for i in range(start, end) if not text[i].isspace())


def eval_synth(anonymizer: Anonymizer, path: Path, timer: Timer, limit: int | None = None) -> dict:
    rows = json.loads(path.read_text(encoding="utf-8"))[:limit]
    total: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    for row in rows:
        text = row["full_text"]
        found = timer.detect(anonymizer, text)
        for span in row["spans"]:
            kind = span["entity_type"]
            total[kind] += 1
            caught[kind] += covered(text, span["start_position"], span["end_position"], found)
    masked = set(anonymizer.config.entities)
    return {
        "file": str(path),
        "sentences": len(rows),
        "recall": {
            kind: {
                "recall": round(caught[kind] / total[kind], 4),
                "n": total[kind],
                "masked_type": kind in masked,
            }
            for kind in sorted(total, key=lambda k: -total[k])
        },
    }


def read_conll(path: Path) -> list[tuple[str, list[tuple[int, int]]]]:
    """Sentences as text (tokens joined by spaces) with character spans of the ``person`` entities."""
    sentences: list[tuple[str, list[tuple[int, int]]]] = []
    text, spans, current = "", [], None
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if text:
                sentences.append((text, [tuple(s) for s in spans]))  # type: ignore[misc]
            text, spans, current = "", [], None
            continue
        parts = line.split("\t")
        token, label = parts[0], parts[-1].strip()
        if text:
            text += " "
        start = len(text)
        text += token
        if label == "B-person":
            current = [start, len(text)]
            spans.append(current)
        elif label == "I-person" and current is not None:
            current[1] = len(text)
        else:
            current = None
    return sentences


def eval_wnut(anonymizer: Anonymizer, path: Path, timer: Timer, limit: int | None = None) -> dict:
    sentences = read_conll(path)[:limit]
    total = caught = person_masks = person_masks_on_people = 0
    for text, gold in sentences:
        found = timer.detect(anonymizer, text)
        for start, end in gold:
            total += 1
            caught += covered(text, start, end, found)
        for d in found:
            if d.type == "PERSON":
                person_masks += 1
                person_masks_on_people += any(d.start < e and s < d.end for s, e in gold)
    return {
        "file": str(path),
        "sentences": len(sentences),
        "persons": total,
        "person_recall": round(caught / total, 4) if total else None,
        # WNUT does not label @handles as people; we mask them on purpose, so this is a lower bound.
        "person_mask_precision": round(person_masks_on_people / person_masks, 4) if person_masks else None,
    }


TICKET_FIELDS = ("title", "part", "location", "work_performed")


def eval_tickets(
    anonymizer: Anonymizer,
    path: Path,
    timer: Timer,
    limit: int | None = None,
    fields: tuple[str, ...] = TICKET_FIELDS,
    held_out: bool = False,
) -> dict:
    """Share of rows with any mask. ``held_out``: only odd rows (the name model learns from the even ones)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if held_out:
        lines = lines[1::2]
    lines = lines[:limit]
    masked_tickets = 0
    by_type: Counter[str] = Counter()
    examples: Counter[str] = Counter()
    for line in lines:
        row = json.loads(line)
        text = ". ".join(str(row.get(k) or "") for k in fields)
        found = timer.detect(anonymizer, text)
        masked_tickets += bool(found)
        for d in found:
            by_type[d.type] += 1
            examples[f"{d.type}: {text[d.start : d.end]}"] += 1
    return {
        "file": str(path),
        "tickets": len(lines),
        "masked_share": round(masked_tickets / len(lines), 4) if lines else None,
        "masks_by_type": dict(by_type),
        "most_masked": examples.most_common(10),
    }


def eval_retrieval_impact(anonymizer: Anonymizer, pairs: Path, settings: Any, limit: int | None = None) -> dict:
    """What over-masking costs retrieval: recall@1/5 and MRR of the held-out DellQA questions (odd rows)
    searched among all accepted answers, with the questions raw and anonymized (as workers see them)."""
    from retrieval.evaluate import evaluate as evaluate_retrieval

    answers, questions = [], []
    for number, line in enumerate(pairs.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        question, answer = row.get("question"), row.get("solution")
        if not (isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()):
            continue
        answers.append({"id": f"row-{number}", "work_performed": answer})
        if number % 2:
            questions.append((f"row-{number}", question))
    questions = questions[:limit]
    report: dict[str, Any] = {"file": str(pairs), "questions": len(questions)}
    with tempfile.TemporaryDirectory(prefix="supportbot-privacy-") as tmp:
        tickets = Path(tmp) / "tickets.jsonl"
        tickets.write_text("".join(json.dumps(a) + "\n" for a in answers), encoding="utf-8")
        for name, rewrite in (("raw", lambda q: q), ("anonymized", lambda q: anonymizer.anonymize(q).text)):
            queries = Path(tmp) / f"{name}.jsonl"
            queries.write_text(
                "".join(json.dumps({"query": rewrite(q), "relevant": [i]}) + "\n" for i, q in questions),
                encoding="utf-8",
            )
            scores = evaluate_retrieval(settings=settings, tickets=tickets, queries=queries, k=10)
            report[name] = {key: scores[key] for key in ("recall@1", "recall@5", "mrr")}
    return report


def evaluate(
    anonymizer: Anonymizer,
    *,
    synth: Path,
    wnut_dir: Path,
    tickets: Path,
    support: Path | None = None,
    limit: int | None = None,
    retrieval_settings: Any = None,
) -> dict:
    """``retrieval_settings``: also measure what masking costs retrieval (``eval_retrieval_impact``)."""
    timer = Timer()
    report: dict = {}
    skipped = []
    if synth.exists():
        report["synth"] = eval_synth(anonymizer, synth, timer, limit)
    else:
        skipped.append(f"{synth} not found")
    dev = wnut_dir / "emerging.dev.conll"
    if dev.exists():
        report["wnut17_dev"] = eval_wnut(anonymizer, dev, timer, limit)
    else:
        skipped.append(f"{dev} not found")
    if tickets.exists():
        report["tickets"] = eval_tickets(anonymizer, tickets, timer, limit)
    else:
        skipped.append(f"{tickets} not found")
    if support is not None and support.exists():
        report["support"] = eval_tickets(anonymizer, support, timer, limit, ("question",), held_out=True)
    elif support is not None:
        skipped.append(f"{support} not found")
    if retrieval_settings is not None and support is not None and support.exists():
        report["retrieval"] = eval_retrieval_impact(anonymizer, support, retrieval_settings, limit)
    report["latency"] = timer.summary()
    report["skipped"] = skipped
    return report


def render(report: dict) -> str:
    lines = []
    if "synth" in report:
        lines.append(f"Presidio synthetic ({report['synth']['sentences']} sentences): recall per entity type")
        for kind, row in report["synth"]["recall"].items():
            note = "" if row["masked_type"] else "  (not masked by design)"
            lines.append(f"  {kind:<18} {row['recall']:.3f}  n={row['n']}{note}")
    if "wnut17_dev" in report:
        row = report["wnut17_dev"]
        lines.append(
            f"WNUT-17 dev ({row['sentences']} sentences, {row['persons']} persons): PERSON recall "
            f"{row['person_recall']:.3f}, precision of PERSON masks {row['person_mask_precision']:.3f}"
        )
    for key, title in (("tickets", "Tickets"), ("support", "Support questions, held-out half (names occur)")):
        if key in report:
            row = report[key]
            lines.append(
                f"{title} {Path(row['file']).name} ({row['tickets']}): share with any mask {row['masked_share']:.4f}"
            )
            for example, count in row["most_masked"]:
                lines.append(f"  {count:>4}  {example}")
    if "retrieval" in report:
        row = report["retrieval"]
        lines.append(f"Retrieval of held-out support questions ({row['questions']}), raw -> anonymized:")
        for key in ("recall@1", "recall@5", "mrr"):
            lines.append(f"  {key:<9} {row['raw'][key]:.4f} -> {row['anonymized'][key]:.4f}")
    if report.get("latency"):
        lat = report["latency"]
        lines.append(
            f"Latency per message ({lat['messages']}): p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms"
        )
    for reason in report.get("skipped", []):
        lines.append(f"skipped: {reason}")
    return "\n".join(lines)
