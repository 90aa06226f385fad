"""Training throughput: our packed QLoRA loop against TRL's packed ``SFTTrainer`` and a plain ``Trainer``.

    python -m bench.train                       # MaintNet Q/A from ../shared/data, 64 conversations
    python -m bench.train --data EXPORT_DIR     # an export folder (train.jsonl)
    python -m bench.train --examples 128 --json

Variants:
- ``trl``: what a practitioner would use today, TRL's ``SFTTrainer`` with packing (best-fit decreasing,
  overflow split, padding-free rows with position ids, fp32 like the others) into rows of ``pack_len`` tokens, ``batch_rows`` rows per step;
- ``hf``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq``, every example its own padded row;
- ``ours``: ``model/train.py``'s packing and loss (block-diagonal attention, logits only at targets).

All load the same base (NF4 + double quant), get the same LoRA layers, see the same conversations once
(one epoch) with the same labels (assistant turns only, given to TRL and the Trainer pre-tokenized, so
no chat-template differences), the same learning rate and gradient-checkpointing setting and thread
count. Each runs in its own process so peak memory (max RSS) is its own. Tokens/s counts real tokens
(no padding) over the training loop only. The validation loss is the same function (``mean_loss``) on
the same held-out conversations (the ``--examples`` after the training ones) for every variant.
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
VALIDATION = 32  # held-out conversations for the validation loss


def conversations(data: Path | None, n: int) -> list[list[dict[str, Any]]]:
    from collections import defaultdict

    from model.export import records_from_tickets
    from model.train import read_jsonl

    if data is not None:
        convs, _, _ = read_jsonl(data / "train.jsonl" if data.is_dir() else data)
        return convs[:n]
    records = records_from_tickets(SHARED_TICKETS, defaultdict(int))
    return [r.messages for _, r in zip(range(n), records, strict=False)]


VARIANTS = ("trl", "hf", "ours")


def trainer_arguments(config: Any) -> dict[str, Any]:
    """What TRL's and the plain Trainer's arguments share: one epoch, our learning rate and clipping, no
    schedule, logging or saving, on the CPU, with our gradient-checkpointing setting."""
    return dict(
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
    )


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
        mean_loss,
        pack,
        tokenize,
    )

    torch.manual_seed(0)
    config = TrainConfig(progress_bar=False, **config_overrides)
    base = resolve_base(load_settings())
    model, tokenizer = load_model(base, config, "cpu")
    convs = conversations(data, n + VALIDATION)
    examples = [e for c in convs[:n] if (e := tokenize(tokenizer, c, config.max_seq_len)) is not None]
    held_out = [e for c in convs[n:] if (e := tokenize(tokenizer, c, config.max_seq_len)) is not None]
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
    elif variant == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = Dataset.from_list([{"input_ids": e.ids, "labels": [IGNORE, *e.targets[:-1]]} for e in examples])
        args = SFTConfig(
            output_dir=str(RESULTS / "trl-tmp"),
            packing=True,
            packing_strategy="bfd_split",  # overflow goes to the next row instead of being cut off
            # TRL turns bf16 on by default; this CPU has no bf16 units (and ours and the Trainer compute in
            # fp32), so bf16 would make TRL 10x slower for no reason a practitioner would accept.
            bf16=False,
            padding_free=True,
            max_length=config.pack_len,
            per_device_train_batch_size=config.batch_rows,
            dataset_num_proc=None,
            **trainer_arguments(config),
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        started = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - started
        steps = out.global_step
        trained = int(float(out.metrics.get("num_tokens", real_tokens)))
        if trained < real_tokens:  # what TRL cut off did not train: count only what it saw
            real_tokens = trained
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
            remove_unused_columns=False,
            **trainer_arguments(config),
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
    validation = mean_loss(
        model, batches(pack(held_out, config.pack_len), config.batch_rows, tokenizer.pad_token_id, config.pack_len)
    )
    return {
        "variant": variant,
        "examples": len(examples),
        "real_tokens": real_tokens,
        "optimizer_steps": steps,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(real_tokens / seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024),
        "validation_loss": round(validation, 4),
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
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which to run, comma-separated")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
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
    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    for variant in chosen:
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
    by = dict(zip(chosen, results))
    report: dict[str, Any] = {"data": str(args.data or SHARED_TICKETS), "settings": overrides, "examples": args.examples}
    report.update({{"trl": "trl_packed", "hf": "hf_trainer", "ours": "ours"}[v]: r for v, r in by.items()})
    if "ours" in by and "trl" in by:
        report["ours_over_trl_tokens_per_s"] = round(by["ours"]["tokens_per_s"] / by["trl"]["tokens_per_s"], 2)
        report["ours_over_trl_peak_rss"] = round(by["ours"]["peak_rss_mib"] / by["trl"]["peak_rss_mib"], 2)
    if "ours" in by and "hf" in by:
        report["ours_over_hf_tokens_per_s"] = round(by["ours"]["tokens_per_s"] / by["hf"]["tokens_per_s"], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            print(
                f"{r['variant']:>5}: {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:7.1f} s  "
                f"{r['optimizer_steps']:3d} steps  peak RSS {r['peak_rss_mib']} MiB  "
                f"validation loss {r['validation_loss']:.4f}"
            )
        for key in ("ours_over_trl_tokens_per_s", "ours_over_trl_peak_rss", "ours_over_hf_tokens_per_s"):
            if key in report:
                print(f"{key}: {report[key]}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
