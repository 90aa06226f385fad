"""`supportbot eval privacy`: recall on labelled PII, over-masking on real tickets, latency per message.

Every number it prints comes from data that tuned nothing:
Data (public, under ../shared/data; never copied into the repo):
- pii/presidio_synth_v2.json, odd rows: synthetic sentences with labelled spans (per-type recall). The
  even rows tune the Presidio score threshold (``tune_threshold``) and are never reported,
- pii/wnut17/emerging.dev.conll: real noisy social-media text (PERSON recall; train file only used to tune),
- tickets/maintnet_dev.jsonl: real maintenance tickets that hold no personal data (share with any mask),
- tickets/dellqa_dev.jsonl, odd rows: real IT forum questions (share with any mask; a few do hold names,
  so this is an upper bound on over-masking). The name model trains on the even rows only.
Built here (``eval_sets.py``): planted credentials with random values (secret recall, by ``<SECRET>``
masks only), names in other scripts from the held-out "test" part of the name lists, and text in
those scripts without names (false PERSON masks).
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


CHAT_SIZED = 1_000  # characters: latency is reported for messages up to this length


@dataclass
class Timer:
    samples_ms: list[float] = field(default_factory=list)

    def detect(self, anonymizer: Anonymizer, text: str) -> list[Entity]:
        """The whole anonymize call is timed: detection, pseudonyms and replacement."""
        started = time.perf_counter()
        found = anonymizer.anonymize(text).entities
        if len(text) <= CHAT_SIZED:
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


def synth_rows(path: Path, part: str) -> list[dict]:
    """Even rows ("train") tune the score threshold; odd rows ("test") are reported."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return rows[0::2] if part == "train" else rows[1::2]


def eval_synth(
    anonymizer: Anonymizer, path: Path, timer: Timer, limit: int | None = None, part: str = "test"
) -> dict:
    rows = synth_rows(path, part)[:limit]
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
        "part": "odd rows (held out)" if part == "test" else "even rows (tuning)",
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


def eval_retrieval_impact(
    anonymizer: Anonymizer, pairs: Path, settings: Any, limit: int | None = None
) -> dict:
    """What over-masking costs retrieval: recall@1/5 and MRR of the held-out DellQA questions (odd rows)
    searched among all accepted answers, with the questions raw and anonymized (as workers see them)."""
    from retrieval.evaluate import evaluate as evaluate_retrieval

    answers, questions = [], []
    for number, line in enumerate(pairs.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        question, answer = row.get("question"), row.get("solution")
        if not (
            isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()
        ):
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


def eval_secrets(anonymizer: Anonymizer, timer: Timer, per_kind: int = 40) -> dict:
    """Recall of planted credentials, counted only where ``<SECRET>`` masks cover the value."""
    from bot.privacy.eval_sets import planted_secrets

    total: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    missed: list[str] = []
    for kind, text, spans in planted_secrets(per_kind):
        found = [e for e in timer.detect(anonymizer, text) if e.type == "SECRET"]
        for start, end in spans:
            total[kind] += 1
            ok = covered(text, start, end, found)
            caught[kind] += ok
            if not ok and len(missed) < 5:
                missed.append(f"{kind}: {text[:80]!r}")
    return {
        "planted": sum(total.values()),
        "recall": round(sum(caught.values()) / sum(total.values()), 4),
        "by_kind": {kind: round(caught[kind] / total[kind], 4) for kind in total},
        "missed_examples": missed,
    }


def secret_false_positives(path: Path, fields: tuple[str, ...], limit: int | None = None) -> dict:
    """Rows of real text (no credentials in them) where the secret layer fires; all rows, none tuned on."""
    from bot.privacy.normalize import normalize
    from bot.privacy.secrets import find_secrets

    lines = path.read_text(encoding="utf-8").splitlines()[:limit]
    hits, examples = 0, []
    for line in lines:
        row = json.loads(line)
        text = normalize(". ".join(str(row.get(k) or "") for k in fields)).text
        spans = find_secrets(text)
        hits += bool(spans)
        examples += [text[max(0, s - 30) : e + 10] for s, e in spans][: max(0, 5 - len(examples))]
    return {
        "file": str(path),
        "rows": len(lines),
        "rows_with_secret": hits,
        "share": round(hits / len(lines), 4) if lines else None,
        "examples": examples,
    }


def eval_scripts(anonymizer: Anonymizer, timer: Timer, per_script: int = 60) -> dict:
    # per_script also bounds the name-free sentences: up to per_script per script and locale.
    """Names in other scripts (held-out "test" part of the lists) and name-free text in those scripts."""
    from bot.privacy.eval_sets import held_out_names, non_name_sentences

    total: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    for script, text, spans in held_out_names("test", per_script):
        found = timer.detect(anonymizer, text)
        for start, end in spans:
            total[script] += 1
            caught[script] += covered(text, start, end, found)
    sentences: Counter[str] = Counter()
    false: Counter[str] = Counter()
    examples = []
    for script, text in non_name_sentences(per_locale=min(per_script, 40)):
        found = [e for e in timer.detect(anonymizer, text) if e.type == "PERSON"]
        sentences[script] += 1
        false[script] += bool(found)
        if found and len(examples) < 6:
            examples.append(f"{script}: {text[found[0].start : found[0].end]}")
    return {
        "names": sum(total.values()),
        "recall": round(sum(caught.values()) / sum(total.values()), 4),
        "recall_by_script": {k: round(caught[k] / total[k], 4) for k in sorted(total)},
        "name_free_sentences": sum(sentences.values()),
        "name_free_with_person_mask": round(sum(false.values()) / sum(sentences.values()), 4),
        "false_masks_by_script": {k: f"{false[k]}/{sentences[k]}" for k in sorted(sentences)},
        "false_mask_examples": examples,
    }


def time_long_paste(anonymizer: Anonymizer, source: Path | None, chars: int = 100_000) -> dict:
    """One 100,000-character paste through ``anonymize``, the cut included (repair text, or a log)."""
    if source is not None and source.exists():
        body = " ".join(
            str(json.loads(line).get("work_performed") or "")
            for line in source.read_text(encoding="utf-8").splitlines()
        )
    else:
        body = "2024-05-01 12:00:01 ERROR spooler: job 42 failed, retrying in 5 s\n" * 2000
    paste = (
        "Hi, I'm Priya Raman, my password is Hunter2! Log below:\n" + body * (1 + chars // max(len(body), 1))
    )[:chars]
    started = time.perf_counter()
    result = anonymizer.anonymize(paste, scope=None)
    seconds = time.perf_counter() - started
    return {
        "chars": len(paste),
        "kept_chars": len(result.text),
        "seconds": round(seconds, 3),
        "planted_masked": "Priya" not in result.text and "Hunter2" not in result.text,
    }


def tune_threshold(
    synth: Path, grid: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8)
) -> dict:
    """Choose the Presidio score threshold on the even (training) rows of the synthetic set only.

    Structured types only (PERSON comes from our own finders, which bypass it), rules only (the name
    model does not touch structured types). One pass at threshold 0 keeps every detection with its
    score; each threshold of the grid then keeps the detections scoring at least that much. The
    highest threshold whose recall is within 0.002 of the best wins: the same recall with fewer weak
    pattern matches (false masks) is better.
    """
    from bot.privacy.config import PrivacyConfig

    rows = synth_rows(synth, "train")
    anonymizer = Anonymizer(PrivacyConfig(name_model=False, score_threshold=0.0))
    structured = [e for e in anonymizer.config.entities if e not in ("PERSON", "SECRET")]
    scored = []
    for row in rows:
        found = [d for d in anonymizer.detect(row["full_text"]) if d.type in structured]
        scored.append((row, found))
    results = {}
    for threshold in grid:
        total = caught = false_masks = 0
        for row, found in scored:
            kept = [Entity(d.type, d.start, d.end) for d in found if d.score >= threshold]
            gold = [(s["start_position"], s["end_position"]) for s in row["spans"]]
            for span in row["spans"]:
                if span["entity_type"] in structured:
                    total += 1
                    caught += covered(row["full_text"], span["start_position"], span["end_position"], kept)
            false_masks += sum(1 for e in kept if not any(e.start < b and a < e.end for a, b in gold))
        results[threshold] = {"recall": round(caught / max(total, 1), 4), "false_masks": false_masks}
    best = max(r["recall"] for r in results.values())
    chosen = max(t for t, r in results.items() if r["recall"] >= best - 0.002)
    return {"rows": len(rows), "part": "even rows (training)", "grid": results, "chosen": chosen}


def evaluate(
    anonymizer: Anonymizer,
    *,
    synth: Path,
    wnut_dir: Path,
    tickets: Path,
    support: Path | None = None,
    limit: int | None = None,
    retrieval_settings: Any = None,
    generated: int | None = None,
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
    # ``generated`` shrinks the generated sets (a quick look); the defaults are what the README reports.
    report["secrets"] = eval_secrets(anonymizer, timer, per_kind=min(generated or 40, 40))
    report["secret_false_positives"] = [
        secret_false_positives(path, fields, limit)
        for path, fields in ((tickets, TICKET_FIELDS), (support, ("question", "solution")))
        if path is not None and path.exists()
    ]
    report["scripts"] = eval_scripts(anonymizer, timer, per_script=min(generated or 60, 60))
    report["long_paste"] = time_long_paste(anonymizer, tickets)
    if retrieval_settings is not None and support is not None and support.exists():
        report["retrieval"] = eval_retrieval_impact(anonymizer, support, retrieval_settings, limit)
    report["latency"] = timer.summary()
    report["name_model"] = name_model_summary(anonymizer)
    report["skipped"] = skipped
    return report


def name_model_summary(anonymizer: Anonymizer) -> dict | None:
    """What the learned name model is and what tuned its threshold (CV on WNUT-17 train, see train_names)."""
    model = anonymizer.engine.name_finder.model
    if model is None:
        return None
    info = getattr(model, "info", None) or {}  # older model files carry no training record
    return {"threshold": model.threshold, "training": {k: v for k, v in info.items() if k != "cv"},
            "cv_on_train": info.get("cv")}  # fmt: skip


def render(report: dict) -> str:
    lines = []
    if "synth" in report:
        lines.append(
            f"Presidio synthetic, {report['synth']['part']} ({report['synth']['sentences']} sentences): "
            "recall per entity type"
        )
        for kind, row in report["synth"]["recall"].items():
            note = "" if row["masked_type"] else "  (not masked by design)"
            lines.append(f"  {kind:<18} {row['recall']:.3f}  n={row['n']}{note}")
    if "wnut17_dev" in report:
        row = report["wnut17_dev"]
        lines.append(
            f"WNUT-17 dev ({row['sentences']} sentences, {row['persons']} persons): PERSON recall "
            f"{row['person_recall']:.3f}, precision of PERSON masks {row['person_mask_precision']:.3f}"
        )
    if report.get("name_model"):
        row = report["name_model"]
        cv = row.get("cv_on_train") or {}
        tuned = cv.get("at_threshold") or {}
        lines.append(
            f"Name model: fine-tuned MiniLM tagger, threshold {row['threshold']} (chosen by {cv.get('folds', '?')}-fold "
            f"CV on WNUT-17 train: recall {tuned.get('recall', float('nan')):.3f}, on unseen swapped-in names "
            f"{tuned.get('probe_recall', float('nan')):.3f}, support rows masked {tuned.get('negative_rows_masked', float('nan')):.3f})"
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
    if "secrets" in report:
        row = report["secrets"]
        lines.append(
            f"Planted credentials ({row['planted']}, random values): <SECRET> recall {row['recall']:.4f}"
        )
        lines += [f"  {kind:<20} {value:.3f}" for kind, value in row["by_kind"].items()]
        lines += [f"  missed: {m}" for m in row["missed_examples"]]
    for row in report.get("secret_false_positives", []):
        lines.append(
            f"Secret layer on {Path(row['file']).name} ({row['rows']} rows, no credentials): "
            f"{row['rows_with_secret']} rows fire ({row['share']:.4f})"
        )
        lines += [f"  {example!r}" for example in row["examples"]]
    if "scripts" in report:
        row = report["scripts"]
        lines.append(
            f"Names in other scripts, held-out test names ({row['names']}): recall {row['recall']:.4f}"
        )
        lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in row["recall_by_script"].items()))
        lines.append(
            f"Name-free text in those scripts ({row['name_free_sentences']} sentences): with a PERSON mask "
            f"{row['name_free_with_person_mask']:.4f}  ("
            + ", ".join(f"{k} {v}" for k, v in row["false_masks_by_script"].items())
            + ")"
        )
    if report.get("latency"):
        lat = report["latency"]
        lines.append(
            f"Latency per chat-sized message (<= {CHAT_SIZED} chars, {lat['messages']}): "
            f"p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms"
        )
    if "long_paste" in report:
        row = report["long_paste"]
        lines.append(
            f"A {row['chars']:,}-character paste: {row['seconds']} s through anonymize (cut to "
            f"{row['kept_chars']:,} chars; planted name and password masked: {row['planted_masked']})"
        )
    for reason in report.get("skipped", []):
        lines.append(f"skipped: {reason}")
    return "\n".join(lines)
