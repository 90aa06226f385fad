"""Evaluation of the base model and adapters on held-out conversations, and the promotion gate.

Two measures on a validation file (chat JSONL as written by ``model.export``):
- validation loss: cross-entropy per trained answer token, the same as in training;
- ROUGE-1/2/L (F1, stemmed) of generated answers against the reference answers: for every
  conversation, the last trained assistant turn is generated from the turns before it.

Models are evaluated as they serve: one ``LanguageModel`` (the settings' base, quantized or not) with
each adapter switched in turn, so a gate decision holds for what the workers will run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.errors import InputError
from core.settings import Settings
from model import registry
from model.train import VALIDATION_FILE, batches, load_dataset, mean_loss, pack, read_jsonl

log = logging.getLogger(__name__)

BASE = "base"
ACTIVE = "active"


@dataclass(frozen=True)
class AnswerCase:
    prompt: list[dict[str, str]]
    reference: str


def answer_cases(path: Path, limit: int | None = None) -> list[AnswerCase]:
    """The last trained answer of every conversation, with the turns that led to it."""
    conversations, _, _ = read_jsonl(path)
    cases = []
    for messages in conversations:
        last = max(
            (i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) and i > 0),
            default=None,
        )
        if last is None:
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        cases.append(AnswerCase(prompt=prompt, reference=messages[last]["content"]))
    return cases[:limit] if limit else cases


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {k: round(v / n, 4) for k, v in totals.items()}


def resolve_models(*, session: Session, wanted: Sequence[str]) -> list[tuple[str, str | None]]:
    """(label, adapter path or None for the base) for names like base, active, candidates, or a version."""
    resolved: list[tuple[str, str | None]] = []
    for name in wanted:
        if name == BASE:
            resolved.append((BASE, None))
        elif name == ACTIVE:
            current = registry.active_adapter(session=session)
            if current is not None:
                resolved.append((current[1], current[0]))
        elif name == "candidates":
            for v in registry.list_versions(session=session):
                if v.status.value == "candidate" and v.adapter_path:
                    resolved.append((v.name, v.adapter_path))
        else:
            version = registry.get(session=session, name=name)
            resolved.append((version.name, version.adapter_path))
    seen: set[str] = set()
    return [(label, path) for label, path in resolved if not (label in seen or seen.add(label))]


def evaluate(
    *,
    settings: Settings,
    data: Path,
    models: Sequence[tuple[str, str | None]],
    generate: bool = True,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_seq_len: int = 1024,
    lm: Any = None,
) -> dict[str, Any]:
    """Validation loss (and ROUGE when ``generate``) of each (label, adapter path) on ``data``."""
    from model.runtime import LanguageModel

    if data.is_dir():
        data = data / VALIDATION_FILE
    if not data.is_file():
        raise InputError(f"{data} does not exist")
    # The validation loss runs transformers' own forward pass (with peft for adapters): a model the plain
    # reader loaded (model/llama.py, a worker's) has no forward pass of its own, so it is not reused.
    if lm is None or getattr(lm, "plain", False):
        lm = LanguageModel(settings.model_copy(update={"model_loader": "transformers"}))
    dataset = load_dataset(data, lm.tokenizer, max_seq_len)
    if limit:
        dataset.examples = dataset.examples[:limit]
    if not dataset.examples:
        raise InputError(f"{data} has no conversation with a trained answer to evaluate on")
    loss_batches = batches(pack(dataset.examples, 512), 4, lm.tokenizer.pad_token_id, 512)
    cases = answer_cases(data, limit) if generate else []
    report: dict[str, Any] = {
        "data": str(data),
        "conversations": len(dataset.examples),
        "target_tokens": dataset.target_tokens,
        "answers_generated": len(cases),
        "models": {},
    }
    for label, path in models:
        started = time.monotonic()
        lm.use_adapter(path, None if path is None else label)
        result: dict[str, Any] = {
            "adapter_path": path,
            "val_loss": round(mean_loss(lm.model, loss_batches), 4),
        }
        if cases:
            predictions: list[str] = []
            for i in range(0, len(cases), batch_size):
                chunk = cases[i : i + batch_size]
                outs = lm.generate([c.prompt for c in chunk], max_new_tokens=max_new_tokens)
                predictions += [o.text for o in outs]
            result.update(rouge(predictions, [c.reference for c in cases]))
            result["examples"] = [
                {"reference": c.reference[:300], "answer": p[:300]}
                for c, p in list(zip(cases, predictions))[:3]
            ]
        result["seconds"] = round(time.monotonic() - started, 1)
        report["models"][label] = result
        log.info("evaluated %s: %s", label, {k: v for k, v in result.items() if k != "examples"})
    lm.use_adapter(None)
    return report


def gate_candidate(
    *,
    settings: Settings,
    database: Any,
    name: str,
    gate: registry.Gate,
    data: Path | None = None,
    limit: int | None = None,
    lm: Any = None,
) -> dict[str, Any]:
    """Evaluate a candidate against the active adapter (or the base) and promote or refuse it."""
    with database.session() as session:
        candidate = registry.get(session=session, name=name)
        if candidate.status.value not in ("candidate", "refused", "retired"):
            raise InputError(f"{name} is {candidate.status.value}; only a candidate can be promoted")
        data = data or Path(candidate.config.get("data_dir", "")) / VALIDATION_FILE
        current = registry.active_adapter(session=session)
        reference = (current[1], current[0]) if current else (BASE, None)
        max_seq_len = int(candidate.config.get("max_seq_len", 1024))
    report = evaluate(
        settings=settings,
        data=data,
        models=[reference, (name, candidate.adapter_path)],
        generate=gate.metric.startswith("rouge"),
        limit=limit,
        max_seq_len=max_seq_len,
        lm=lm,
    )
    cand, ref = report["models"][name], report["models"][reference[0]]
    passed, why = gate.passes(cand.get(gate.metric), ref.get(gate.metric))
    verdict = {
        "passed": passed,
        "why": why,
        "metric": gate.metric,
        "margin": gate.margin,
        "reference": reference[0],
        "candidate_score": cand.get(gate.metric),
        "reference_score": ref.get(gate.metric),
        "data": str(data),
    }
    with database.session() as session:
        registry.record_gate(session=session, name=name, passed=passed, report=verdict)
    return verdict
