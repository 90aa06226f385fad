"""`supportbot anonymize` and `supportbot eval privacy`."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from core.commands import Groups, add
from core.settings import Settings


def register(groups: Groups) -> None:
    parser = add(
        groups,
        "root",
        "anonymize",
        anonymize_command,
        "Read messages from stdin (one per line) and write them anonymized, one per line",
    )
    parser.add_argument("--json", action="store_true", help='one {"text", "entities"} object per line')
    parser.add_argument(
        "--scope",
        default="cli",
        help="conversation scope: the same value gets the same placeholder on every line",
    )

    parser = add(
        groups,
        "eval",
        "privacy",
        eval_privacy_command,
        "Recall on labelled PII (synthetic, WNUT-17), secrets, names in other scripts, over-masking, latency",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="shared data folder (default ../shared/data)"
    )
    parser.add_argument(
        "--synth", type=Path, default=None, help="default DATA_DIR/pii/presidio_synth_v2.json"
    )
    parser.add_argument("--wnut-dir", type=Path, default=None, help="default DATA_DIR/pii/wnut17")
    parser.add_argument(
        "--tickets", type=Path, default=None, help="default DATA_DIR/tickets/maintnet_dev.jsonl"
    )
    parser.add_argument(
        "--support", type=Path, default=None, help="default DATA_DIR/tickets/dellqa_dev.jsonl (odd rows)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows of each file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--name-model",
        type=Path,
        default=None,
        help="evaluate these name-model weights instead of the shipped ones",
    )
    which.add_argument("--rules-only", action="store_true", help="without the learned name model")
    parser.add_argument(
        "--tune-threshold",
        action="store_true",
        help="only choose the Presidio score threshold on the even (training) rows of the synthetic set",
    )
    parser.add_argument(
        "--retrieval",
        action="store_true",
        help="also measure retrieval of the support questions raw against anonymized (loads the embedder)",
    )


def anonymize_command(args: argparse.Namespace, settings: Settings) -> int:
    from bot.privacy import Anonymizer
    from core.errors import PrivacyError

    anonymizer = Anonymizer.from_settings(settings)
    # Binary or badly encoded input must not stop the run: undecodable bytes become U+FFFD.
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline=None)
    failed = 0
    for line in stream:
        line = line.rstrip("\n")
        try:
            result = anonymizer.anonymize(line, scope=args.scope)
        except PrivacyError as err:
            # Never echo the raw line: an empty output line keeps line numbers aligned.
            print(f"line could not be anonymized: {err}", file=sys.stderr)
            failed += 1
            print(json.dumps({"text": None, "entities": [], "error": str(err)}) if args.json else "")
            continue
        if args.json:
            entities = [{"type": e.type, "start": e.start, "end": e.end} for e in result.entities]
            print(json.dumps({"text": result.text, "entities": entities}, ensure_ascii=False))
        else:
            print(result.text)
        sys.stdout.flush()
    return 1 if failed else 0


def eval_privacy_command(args: argparse.Namespace, settings: Settings) -> int:
    from bot.privacy import Anonymizer
    from bot.privacy.evaluate import DEFAULT_DATA_DIR, evaluate, render

    data_dir = (args.data_dir or DEFAULT_DATA_DIR).resolve()
    synth = args.synth or data_dir / "pii" / "presidio_synth_v2.json"
    wnut_dir = args.wnut_dir or data_dir / "pii" / "wnut17"
    tickets = args.tickets or data_dir / "tickets" / "maintnet_dev.jsonl"
    support = args.support or data_dir / "tickets" / "dellqa_dev.jsonl"
    if not any(p.exists() for p in (synth, wnut_dir, tickets, support)):
        print(f"no evaluation data under {data_dir}: skipped (pass --data-dir)", file=sys.stderr)
        return 0
    if args.tune_threshold:
        from bot.privacy.evaluate import tune_threshold

        if not synth.exists():
            print(f"{synth} not found", file=sys.stderr)
            return 1
        tuned = tune_threshold(synth)
        print(json.dumps(tuned, indent=2))
        return 0
    updates: dict = {}
    if args.name_model is not None:
        updates["privacy_name_model"] = args.name_model
    if args.rules_only:
        updates["privacy_name_model_enabled"] = False
    anonymizer = Anonymizer.from_settings(settings.model_copy(update=updates))
    report = evaluate(
        anonymizer,
        synth=synth,
        wnut_dir=wnut_dir,
        tickets=tickets,
        support=support,
        limit=args.limit,
        retrieval_settings=settings if args.retrieval else None,
        generated=args.limit,
    )
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render(report))
    return 0
