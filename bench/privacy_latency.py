"""Anonymization time per chat-sized message: the path before issue 10's speed work (name model in
fp32, run after spaCy) against the shipped path (bf16 where the CPU has it natively, run beside spaCy),
in the same run, and what the change does to the masks.

  python -m bench.privacy_latency [--messages 400] [--json]

Messages are training text only (nothing the evaluation reports): WNUT-17 train rows and the even rows of
the DellQA questions, at most 1,000 characters (``evaluate.CHAT_SIZED``), sampled with a fixed seed. Both
anonymizers live in one process and take turns per message (which goes first alternates), so both see
the same load; each is warmed up first. Reported: p50 and p95 of each in ms, their ratio (shipped /
before), and how many messages get exactly the same masks in both (type and span), with the differing
examples. The absolute times move with the machine's load (printed); the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parent.parent / ".." / "shared" / "data"


def training_messages(data: Path, count: int, seed: int = 10) -> list[str]:
    from bot.privacy.evaluate import CHAT_SIZED, read_conll

    texts = [text for text, _ in read_conll(data / "pii" / "wnut17" / "wnut17train.conll")]
    dellqa = data / "tickets" / "dellqa_dev.jsonl"
    for number, line in enumerate(dellqa.read_text(encoding="utf-8").splitlines()):
        if number % 2 == 0:  # even rows: the name model's training half; the odd ones are evaluated
            question = json.loads(line).get("question")
            if isinstance(question, str) and question.strip():
                texts.append(question)
    texts = [t for t in texts if 0 < len(t) <= CHAT_SIZED]
    rng = random.Random(seed)
    # Half short chat rows, half support questions (longer): the p95 lives in the long ones.
    wnut = [t for t in texts if len(t) < 200]
    longer = [t for t in texts if len(t) >= 200]
    return rng.sample(wnut, min(count // 2, len(wnut))) + rng.sample(
        longer, min(count - count // 2, len(longer))
    )


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from bot.privacy import Anonymizer
    from bot.privacy.config import PrivacyConfig
    from core.settings import load_settings

    messages = training_messages(args.data_dir.resolve(), args.messages)
    shipped = PrivacyConfig.from_settings(load_settings())
    before = Anonymizer(replace(shipped, name_model_int8=False, name_model_bf16=False))
    before.engine.overlap = False
    paths = {"before": before, "shipped": Anonymizer(shipped)}

    def described(anonymizer: Anonymizer) -> str:  # what the engine actually runs, not what was asked
        engine = anonymizer.engine
        encoder = engine.name_finder.encoder
        if encoder is None:
            return "rules only"
        precision = "int8" if encoder.int8 else "bf16" if encoder.bf16 else "fp32"
        return f"{precision}, name model {'beside' if engine.overlap else 'after'} spaCy"

    settings = {name: described(anonymizer) for name, anonymizer in paths.items()}
    for anonymizer in paths.values():  # first calls build caches and torch kernels
        for text in messages[:5]:
            anonymizer.anonymize(text, scope=None)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in paths}
    same, differing = 0, []
    for number, text in enumerate(messages):
        order = list(paths) if number % 2 == 0 else list(reversed(paths))
        masks = {}
        for name in order:
            started = time.perf_counter()
            result = paths[name].anonymize(text, scope=None)
            times[name].append((time.perf_counter() - started) * 1000)
            masks[name] = [(e.type, e.start, e.end) for e in result.entities]
        if masks["before"] == masks["shipped"]:
            same += 1
        elif len(differing) < 8:
            only = set(masks["before"]) ^ set(masks["shipped"])
            differing.append(
                {
                    "before_only": [text[s:e] for t, s, e in masks["before"] if (t, s, e) in only],
                    "shipped_only": [text[s:e] for t, s, e in masks["shipped"] if (t, s, e) in only],
                }
            )
    report = {
        "messages": len(messages),
        "data": "WNUT-17 train rows and DellQA even-row questions (training text), <= 1,000 chars",
        "load_average_start_end": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "paths": settings,
        "before": percentiles(times["before"]),
        "shipped": percentiles(times["shipped"]),
    }
    report["ratio_shipped_over_before"] = {
        key: round(report["shipped"][key] / report["before"][key], 3)
        for key in ("p50_ms", "p95_ms", "mean_ms")
    }
    report["messages_with_same_masks"] = round(same / len(messages), 4)
    report["differing_examples"] = differing
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    print(
        f"{report['messages']} chat-sized training messages, load average {report['load_average_start_end']}"
    )
    for name in ("before", "shipped"):
        row = report[name]
        print(
            f"  {name:<8} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  mean {row['mean_ms']:7.2f} ms"
            f"  ({settings[name]})"
        )
    ratio = report["ratio_shipped_over_before"]
    print(f"  shipped / before: p50 {ratio['p50_ms']}, p95 {ratio['p95_ms']}, mean {ratio['mean_ms']}")
    print(f"  messages with the same masks in both: {report['messages_with_same_masks']:.4f}")
    for row in differing:
        print(f"    before only {row['before_only']}  shipped only {row['shipped_only']}")


if __name__ == "__main__":
    main()
