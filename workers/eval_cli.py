"""``supportbot eval rag``: handlers are ``func(args, settings) -> int``; torch loads inside them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.commands import Groups, add
from core.settings import Settings


def register(groups: Groups) -> None:
    p = add(groups, "eval", "rag", _rag,
            "The real answer path (retrieve, generate, compose) on questions whose tickets are not indexed, "
            "scored by ROUGE against the real repair, beside the top-ticket and no-retrieval baselines")
    p.add_argument("--tickets", type=Path, required=True, help="the company's history (ticket JSONL)")
    p.add_argument("--questions", type=Path, default=None,
                   help="held-out questions (JSONL); default: hold out --holdout-percent of --tickets by id")
    p.add_argument("--holdout-percent", type=int, default=10)
    p.add_argument("--holdout-offset", type=int, default=0,
                   help="hold out the ids whose bucket is in [offset, offset + percent): another band than the "
                        "reported one (0) for developing rules")
    p.add_argument("--question-field", default="title")
    p.add_argument("--reference-field", default="work_performed")
    p.add_argument("--limit", type=int, default=50, help="at most this many questions (0: all)")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder, or 'active' for the registry's active one; default: the base model")
    p.add_argument("--cases-out", type=Path, default=None,
                   help="write every question with its answer, model text and notes here (JSONL)")
    p.add_argument("--skip-model-baseline", action="store_true",
                   help="leave out the base model without retrieval (the same for every adapter on the same "
                        "questions), e.g. when comparing adapters")
    p.add_argument("--json", action="store_true")


def _rag(args: argparse.Namespace, settings: Settings) -> int:
    from workers.eval_rag import evaluate_rag

    adapter = args.adapter
    if adapter == "active":
        from core.db import Database
        from model import registry

        with Database.from_settings(settings).session() as session:
            active = registry.active_adapter(session=session)
        adapter = active[0] if active else None
    report = evaluate_rag(
        settings=settings, tickets=args.tickets, questions=args.questions, holdout_percent=args.holdout_percent,
        holdout_offset=args.holdout_offset, question_field=args.question_field,
        reference_field=args.reference_field, limit=args.limit or None, adapter=adapter,
        cases_out=args.cases_out, model_baseline=not args.skip_model_baseline,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['questions']} questions, {report['indexed_tickets']} tickets indexed, model {report['model']}")
    print(f"{'':24}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}")
    rows = [("delivered answer", report["delivered"]),
            ("top ticket's repair", report["baselines"]["top_ticket"]),
            ("model, no retrieval", report["baselines"]["no_retrieval"])]
    for label, scores in rows:
        if scores is None:
            continue
        print(f"{label:24}{scores['rouge1']:9.3f}{scores['rouge2']:9.3f}{scores['rougeL']:9.3f}")
    lat = report["latency_ms"]
    print(f"model text dropped {report['model_text_dropped']:.0%}, not sure {report['not_sure']:.0%}, "
          f"answers with loops {report['answers_with_loops']}, latency p50 {lat['p50']} ms / p95 {lat['p95']} ms")
    print(f"fix ranking {report['rank_fixes']}: the model moved another ticket's fix first in "
          f"{report['lead_moved']} answers")
    return 0
