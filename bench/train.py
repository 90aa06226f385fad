"""Training throughput: our packed QLoRA loop against a plain ``transformers.Trainer`` on the same data.

    python -m bench.train                       # MaintNet Q/A from ../shared/data, 64 conversations
    python -m bench.train --data EXPORT_DIR     # an export folder (train.jsonl)
    python -m bench.train --examples 128 --json

Both variants load the same base (NF4 + double quant), get the same LoRA layers, see the same
conversations once (one epoch) with the same loss mask (assistant turns only), and run with the same
gradient-checkpointing setting and thread count. Each runs in its own process so peak memory (max
RSS) is its own. Tokens/s counts real tokens (no padding) over the training loop only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED_TICKETS = ROOT.parent / "shared" / "data" / "tickets" / "maintnet_dev.jsonl"
RESULTS = ROOT / "bench" / "results"


def conversations(data: Path | None, n: int) -> list[list[dict[str, Any]]]:
    from collections import defaultdict

    from model.export import records_from_tickets
    from model.train import read_jsonl

    if data is not None:
        convs, _, _ = read_jsonl(data / "train.jsonl" if data.is_dir() else data)
        return convs[:n]
    records = records_from_tickets(SHARED_TICKETS, defaultdict(int))
    return [r.messages for _, r in zip(range(n), records, strict=False)]


def run_variant(variant: str, data: Path | None, n: int, config_overrides: dict[str, Any]) -> dict[str, Any]:
    import torch

    from core.settings import load_settings
    from model.embedded import resolve_base
    from model.train import (
        IGNORE,
        TrainConfig,
        batches,
        load_model,
        loss_sum,
        pack,
        tokenize,
    )

    torch.manual_seed(0)
    config = TrainConfig(progress_bar=False, **config_overrides)
    base = resolve_base(load_settings())
    model, tokenizer = load_model(base, config, "cpu")
    examples = [
        e for c in conversations(data, n) if (e := tokenize(tokenizer, c, config.max_seq_len)) is not None
    ]
    real_tokens = sum(len(e.ids) for e in examples)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    if variant == "ours":
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        micro = batches(
            pack(examples, config.pack_len), config.batch_rows, tokenizer.pad_token_id, config.pack_len
        )
        started = time.perf_counter()
        for batch in micro:
            loss = loss_sum(model, batch) / batch.n_targets
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        steps = len(micro)
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        # The plain recipe: one example per row, padded to the longest in the batch, labels shifted by
        # the model, logits for every position.
        rows = [
            {"input_ids": e.ids, "labels": [IGNORE, *e.targets[:-1]]}  # the model shifts labels itself
            for e in examples
        ]
        args = TrainingArguments(
            output_dir=str(RESULTS / "hf-trainer-tmp"),
            per_device_train_batch_size=8,
            num_train_epochs=1,
            learning_rate=config.learning_rate,
            max_grad_norm=config.max_grad_norm,
            lr_scheduler_type="constant",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
        )
        started = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - started
        steps = out.global_step
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "examples": len(examples),
        "real_tokens": real_tokens,
        "optimizer_steps": steps,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(real_tokens / seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="export folder or chat JSONL (default: MaintNet)"
    )
    parser.add_argument("--examples", type=int, default=64, help="conversations each variant trains on")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=["ours", "hf"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    overrides = {
        "gradient_checkpointing": args.gradient_checkpointing,
        "load_in_4bit": args.load_in_4bit,
        # ~1k tokens per step, like the baseline's 8 padded rows of ~130 tokens.
        "pack_len": 256,
        "batch_rows": 4,
    }

    if args.variant:
        print(json.dumps(run_variant(args.variant, args.data, args.examples, overrides)))
        return 0
    if args.data is None and not SHARED_TICKETS.is_file():
        print(f"skipped: {SHARED_TICKETS} is absent (pass --data EXPORT_DIR)", file=sys.stderr)
        return 0

    results = []
    for variant in ("hf", "ours"):
        cmd = [sys.executable, "-m", "bench.train", "--variant", variant, "--examples", str(args.examples)]
        cmd += ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
        cmd += ["--load-in-4bit" if args.load_in_4bit else "--no-load-in-4bit"]
        if args.data:
            cmd += ["--data", str(args.data)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    hf, ours = results
    report = {
        "data": str(args.data or SHARED_TICKETS),
        "settings": overrides,
        "hf_trainer": hf,
        "ours": ours,
        "speedup_tokens_per_s": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2),
        "peak_rss_ratio": round(ours["peak_rss_mib"] / hf["peak_rss_mib"], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in (hf, ours):
            print(
                f"{r['variant']:>5}: {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:7.1f} s  "
                f"{r['optimizer_steps']:3d} steps  peak RSS {r['peak_rss_mib']} MiB"
            )
        print(f"speed-up {report['speedup_tokens_per_s']}x, peak memory ratio {report['peak_rss_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
