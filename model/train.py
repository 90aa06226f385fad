"""QLoRA fine-tuning of the base model on exported conversations. Reads top to bottom:

1. ``TrainConfig``: every knob, with help text (the CLI turns the fields into flags).
2. Data: chat JSONL -> token ids with targets on assistant turns only -> packed rows.
3. Model: the base loaded frozen (NF4, double quant) and LoRA added, in one place each.
4. The loop: padding-free packed micro-batches, gradient accumulation, resumable checkpoints.
5. Output: the adapter folder, ``training.json`` and ``loss.png``.

We write our own loop instead of ``transformers.Trainer``: packed rows with restarting position ids
need no padding, and the output layer (49k-token vocabulary) runs only on the positions that carry a
target. ``python -m bench.train`` measures the difference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import InputError, TrainingError
from model.train_config import TrainConfig

log = logging.getLogger(__name__)

IGNORE = -100
TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
CHECKPOINT_DIR = "checkpoint"


# 1. Configuration: ``TrainConfig`` lives in model/train_config.py so the CLI can build its flags
#    without importing torch.

# 2. Data ----------------------------------------------------------------------------------------


@dataclass
class Example:
    """One conversation as token ids; ``targets[t]`` is the id to predict after ``ids[t]`` or IGNORE."""

    ids: list[int]
    targets: list[int]
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class Dataset:
    examples: list[Example]
    rows_read: int = 0
    skipped_malformed: int = 0
    skipped_too_long: int = 0
    skipped_no_target: int = 0
    truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def target_tokens(self) -> int:
        return sum(e.n_targets for e in self.examples)

    def stats(self) -> dict[str, int]:
        return {
            "rows": self.rows_read,
            "examples": len(self.examples),
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "skipped_malformed": self.skipped_malformed,
            "skipped_too_long": self.skipped_too_long,
            "skipped_no_target": self.skipped_no_target,
            "truncated": self.truncated,
        }


ROLES = {"system", "user", "assistant"}


def check_messages(row: Any) -> list[dict[str, Any]]:
    """The ``messages`` of one JSONL row, or InputError saying what is wrong with it."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise InputError('a row must be an object with a non-empty "messages" list')
    messages = row["messages"]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError('each message needs a "role" (system, user or assistant) and a "content" string')
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise InputError('"weight" is 0 (context only) or 1 (trained)')
    return messages


def read_jsonl(path: Path) -> tuple[list[list[dict[str, Any]]], int, int]:
    """The conversations of a chat JSONL file: (conversations, rows read, malformed rows skipped)."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    conversations: list[list[dict[str, Any]]] = []
    rows = bad = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            rows += 1
            try:
                conversations.append(check_messages(json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, InputError) as err:
                bad += 1
                if bad <= 5:
                    log.warning("%s line %d skipped: %s", path.name, number, err)
    return conversations, rows, bad


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], prompt: bool = False) -> str:
    if not messages:
        return ""
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt))


def _encode(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a per-token flag: 1 where an assistant turn is trained."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, clean)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0 or i == 0:
            continue
        before = _render(tokenizer, clean[:i], prompt=True)
        upto = _render(tokenizer, clean[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise InputError("the chat template does not render conversations prefix by prefix")
        # The span runs to the end of the turn, so the model also learns to stop (<|im_end|>/<|eot_id|>).
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def tokenize(tokenizer: Any, messages: list[dict[str, Any]], max_len: int) -> Example | None:
    """One conversation as an Example; too long ones lose their oldest turns, then their tail.

    None when no trained assistant token is left.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    truncated = False
    while True:
        ids, trained = _encode(tokenizer, system + turns)
        if len(ids) <= max_len:
            break
        # Drop the oldest exchange, but keep at least one trained answer and start on a user turn.
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
        rest = turns[cut:] if cut else []
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in rest):
            ids, trained = ids[:max_len], trained[:max_len]  # keep instructions, question, answer head
            truncated = True
            break
        turns = rest
        truncated = True
    targets = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    if not any(t != IGNORE for t in targets):
        return None
    return Example(ids=ids, targets=targets, truncated=truncated)


def load_dataset(path: Path, tokenizer: Any, max_len: int) -> Dataset:
    conversations, rows, bad = read_jsonl(path)
    data = Dataset(examples=[], rows_read=rows, skipped_malformed=bad)
    for messages in conversations:
        example = tokenize(tokenizer, messages, max_len)
        if example is None:
            data.skipped_no_target += 1
            continue
        data.truncated += example.truncated
        data.examples.append(example)
    return data


def pack(examples: Sequence[Example], pack_len: int) -> list[list[Example]]:
    """First-fit-decreasing bins of at most ``pack_len`` tokens (a longer example gets its own row)."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.ids), reverse=True):
        n = len(example.ids)
        for i, room in enumerate(free):
            if n <= room:
                rows[i].append(example)
                free[i] -= n
                break
        else:
            rows.append([example])
            free.append(pack_len - n)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # restart at 0 for every packed conversation
    targets: torch.Tensor  # IGNORE where no loss
    real_tokens: int

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """Rows of packed conversations as tensors. Position ids restarting at 0 tell transformers where a
    conversation starts, and it builds a block-diagonal mask: packed conversations never see each other.
    """
    width = max(sum(len(e.ids) for e in row) for row in rows)
    ids, pos, tgt = [], [], []
    real = 0
    for row in rows:
        r_ids: list[int] = []
        r_pos: list[int] = []
        r_tgt: list[int] = []
        for e in row:
            r_ids += e.ids
            r_pos += range(len(e.ids))
            r_tgt += e.targets
        real += len(r_ids)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))  # the filler is one more "conversation", never a target
        tgt.append(r_tgt + [IGNORE] * pad)
    return Batch(torch.tensor(ids), torch.tensor(pos), torch.tensor(tgt), real)


def batches(rows: list[list[Example]], batch_rows: int, pad_id: int, pack_len: int) -> list[Batch]:
    """Micro-batches of at most ``batch_rows * pack_len`` tokens, padding included.

    Rows are padded to the widest one in their batch, so a row longer than ``pack_len`` (one long
    conversation) travels with fewer or no other rows instead of making them all that wide.
    """
    budget = batch_rows * pack_len
    out: list[Batch] = []
    current: list[list[Example]] = []
    width = 0
    for row in rows:
        n = sum(len(e.ids) for e in row)
        if current and (len(current) + 1) * max(width, n) > budget:
            out.append(collate(current, pad_id))
            current, width = [], 0
        current.append(row)
        width = max(width, n)
    if current:
        out.append(collate(current, pad_id))
    return out


def epoch_rows(examples: list[Example], config: TrainConfig, epoch: int) -> list[list[Example]]:
    """The packed rows of one epoch, in a seeded order (the same order again after a resume)."""
    rng = random.Random(config.seed * 1000 + epoch)
    rows = pack(examples, config.pack_len)
    rng.shuffle(rows)
    return rows


# 3. Model ---------------------------------------------------------------------------------------


def load_model(base_path: Path, config: TrainConfig, device: str) -> tuple[Any, Any]:
    """The frozen base (NF4 + double quant when asked) with fresh LoRA layers on top."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from model.runtime import load_base

    model, tokenizer = load_base(base_path, device=device, load_in_4bit=config.load_in_4bit)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # In eval mode bitsandbytes repacks NF4 weights for a CPU kernel that has no backward pass;
            # after a validation pass, gradients would silently stop flowing through the frozen layers.
            module.support_avx512bf16_for_cpu = False
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: no need to make the inputs require grad
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.targets() if t not in names]
    if missing:
        raise InputError(f"the base model has no modules named {', '.join(missing)}")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.targets(),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(config.seed)
    model = get_peft_model(model, lora)
    tokenizer.padding_side = "right"
    return model, tokenizer


def loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the target positions only.

    The decoder runs on every token, but the output layer only where a target is: for a 49k vocabulary
    that skips most of the largest matmul and the biggest activation of the step.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    hidden = causal_lm.get_decoder()(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    ).last_hidden_state
    targets = batch.targets.to(device)
    where = targets != IGNORE
    logits = causal_lm.get_output_embeddings()(hidden[where])
    return F.cross_entropy(logits.float(), targets[where], reduction="sum")


@torch.no_grad()
def mean_loss(model: Any, batches_: Iterable[Batch]) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches_:
        total += float(loss_sum(model, batch))
        count += batch.n_targets
    model.train(was_training)
    return total / count if count else float("nan")


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# 4. The loop ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    model: Any = field(default=None, repr=False)  # the trained PeftModel, for callers that inspect it


ProgressFn = Callable[[int, int, dict[str, Any]], None]


def train(
    config: TrainConfig,
    *,
    base_path: Path,
    data_dir: Path,
    output_dir: Path,
    device: str = "cpu",
    on_progress: ProgressFn | None = None,
) -> TrainResult:
    """Train one adapter from ``data_dir/train.jsonl`` into ``output_dir``; resumes a checkpoint there."""
    config.validate()
    started = time.monotonic()

    model, tokenizer = load_model(base_path, config, device)
    pad_id = tokenizer.pad_token_id

    train_data = load_dataset(data_dir / TRAIN_FILE, tokenizer, config.max_seq_len)
    if not train_data.examples:
        raise InputError(
            f"{data_dir / TRAIN_FILE} has no usable conversation "
            f"({train_data.rows_read} rows, {train_data.skipped_malformed} malformed, "
            f"{train_data.skipped_no_target} without a trained answer)"
        )
    validation_path = data_dir / VALIDATION_FILE
    val_data = (
        load_dataset(validation_path, tokenizer, config.max_seq_len) if validation_path.is_file() else None
    )
    if val_data and config.eval_limit:
        val_data.examples = val_data.examples[: config.eval_limit]
    val_batches = (
        batches(pack(val_data.examples, config.pack_len), config.batch_rows, pad_id, config.pack_len)
        if val_data
        else []
    )
    micro_per_epoch = len(
        batches(pack(train_data.examples, config.pack_len), config.batch_rows, pad_id, config.pack_len)
    )
    total_steps = (
        config.max_steps
        if config.max_steps > 0
        else max(1, math.ceil(micro_per_epoch * config.epochs / config.grad_accum))
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(total_steps * config.warmup_ratio)

    def schedule(step: int) -> float:  # linear warm-up, then cosine down to 10% of the peak
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    output_dir.mkdir(parents=True, exist_ok=True)
    step, history = _resume(output_dir, model, optimizer, scheduler)
    if step:
        log.info("resuming from step %d in %s", step, output_dir)
    elif val_batches:
        history.append({"step": 0, "val_loss": mean_loss(model, val_batches)})  # LoRA starts as a no-op

    def micro_batches() -> Iterable[Batch]:
        epoch = 0
        while True:  # as many epochs as max_steps needs
            rows = epoch_rows(train_data.examples, config, epoch)
            yield from batches(rows, config.batch_rows, pad_id, config.pack_len)
            epoch += 1

    stream = iter(micro_batches())
    for _ in range(step * config.grad_accum):  # skip what the checkpoint already saw
        next(stream)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not config.progress_bar)
    model.train()
    tokens_seen = 0
    loop_started = time.monotonic()
    while step < total_steps:
        group = [next(stream) for _ in range(config.grad_accum)]
        n_targets = sum(b.n_targets for b in group)
        step_loss = 0.0
        for batch in group:
            loss = loss_sum(model, batch) / n_targets  # mean over every target of the optimizer step
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {float(loss)} at step {step + 1}; try a lower learning rate"
                )
            loss.backward()
            step_loss += float(loss.detach())
            tokens_seen += batch.real_tokens
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record: dict[str, float] = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]}
        if val_batches and (step == total_steps or (config.eval_every and step % config.eval_every == 0)):
            record["val_loss"] = mean_loss(model, val_batches)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            _save_checkpoint(output_dir, model, optimizer, scheduler, step, history)
        if on_progress is not None:
            on_progress(step, total_steps, record)
    bar.close()
    loop_seconds = time.monotonic() - loop_started

    # 5. Output ------------------------------------------------------------------------------------
    model.save_pretrained(output_dir)
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": step,
        "train_loss": sum(train_losses[-10:]) / len(train_losses[-10:]) if train_losses else None,
        "val_loss": val_losses[-1] if val_losses else None,
        "base_val_loss": history[0].get("val_loss") if history and history[0]["step"] == 0 else None,
        "tokens_per_s": round(tokens_seen / loop_seconds, 1) if loop_seconds > 0 else None,
        "seconds": round(time.monotonic() - started, 1),
        "train_data": train_data.stats(),
        "validation_data": val_data.stats() if val_data else None,
    }
    (output_dir / "training.json").write_text(
        json.dumps({"config": asdict(config), "metrics": metrics, "history": history}, indent=2)
    )
    plot_loss(history, output_dir / "loss.png")
    shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(output_dir=output_dir, steps=step, metrics=metrics, history=history, model=model)


def _save_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, step: int, history: list) -> None:
    """Adapter, optimizer and RNG state, swapped in whole: a crash mid-save keeps the previous one."""
    final = out / CHECKPOINT_DIR
    tmp = out / f"{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": history,
        },
        tmp / "trainer_state.pt",
    )
    old = out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _resume(out: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, list[dict[str, float]]]:
    ckpt = out / CHECKPOINT_DIR
    if not (ckpt / "trainer_state.pt").is_file():
        return 0, []
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["history"])


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "loss" in h]
    if steps:
        ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss", lw=1)
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# 6. Registration: a training run recorded in SQL, its adapter registered as a candidate -------------


def new_run(*, session: Any, settings: Any, data_dir: Path, config: TrainConfig) -> Any:
    """A queued TrainingRun for ``data_dir``; its adapter folder is fixed now so a retry resumes there."""
    from core.schema import TrainingRun

    config.validate()
    data_dir = data_dir.expanduser().resolve()
    if not (data_dir / TRAIN_FILE).is_file():
        raise InputError(
            f"{data_dir} has no {TRAIN_FILE}; create it with `supportbot export --out {data_dir}`"
        )
    if (data_dir / TRAIN_FILE).stat().st_size == 0:
        raise InputError(f"{data_dir / TRAIN_FILE} is empty: nothing to train on")
    run = TrainingRun(data_dir=str(data_dir), config=asdict(config))
    session.add(run)
    session.flush()
    name = f"lora-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-r{run.id}"
    run.output_dir = str(settings.adapters_dir / name)
    session.flush()
    return run


def run_training(
    *, settings: Any, database: Any, run_id: int, progress_bar: bool | None = None
) -> dict[str, Any]:
    """Run (or resume) one queued TrainingRun and register its adapter as a candidate.

    Idempotent: a finished run is returned as is; a run left ``running`` by a dead worker resumes from
    its last checkpoint. A failure marks the run failed and never touches the active adapter.
    """
    from core.schema import RunStatus, TrainingRun, utcnow
    from model import registry
    from model.embedded import resolve_base
    from model.export import dataset_hash
    from model.runtime import pick_device

    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise InputError(f"there is no training run {run_id}")
        if run.status in (RunStatus.succeeded, RunStatus.failed):
            return {"run": run_id, "status": run.status.value, "metrics": run.metrics, "error": run.error}
        run.status = RunStatus.running
        run.started_at = run.started_at or utcnow()
        config = TrainConfig.from_dict(run.config)
        data_dir, output_dir = Path(run.data_dir), Path(run.output_dir or "")
    if progress_bar is not None:
        config.progress_bar = progress_bar
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    last_write = [0.0]

    def progress(step: int, total: int, record: dict[str, Any]) -> None:
        if time.monotonic() - last_write[0] < 2 and step < total:
            return
        last_write[0] = time.monotonic()
        with database.session() as session:
            row = session.get(TrainingRun, run_id)
            row.metrics = {**(row.metrics or {}), "step": step, "total_steps": total, **record}

    try:
        base_path = resolve_base(settings)
        result = train(
            config,
            base_path=base_path,
            data_dir=data_dir,
            output_dir=output_dir,
            device=pick_device(settings.device),
            on_progress=progress,
        )
        with database.session() as session:
            version = registry.register_candidate(
                session=session,
                name=output_dir.name,
                base_model=base_path.name,
                adapter_path=output_dir,
                dataset_hash=dataset_hash(data_dir),
                config={**asdict(config), "data_dir": str(data_dir)},
                metrics=result.metrics,
            )
            run = session.get(TrainingRun, run_id)
            run.status = RunStatus.succeeded
            run.model_version_id = version.id
            run.metrics = {
                **result.metrics,
                "step": result.steps,
                "total_steps": result.steps,
                "version": version.name,
            }
            run.finished_at = utcnow()
            return {"run": run_id, "status": "succeeded", "version": version.name, "metrics": result.metrics}
    except Exception as err:
        log.exception("training run %s failed", run_id)
        with database.session() as session:
            run = session.get(TrainingRun, run_id)
            run.status = RunStatus.failed
            run.error = f"{type(err).__name__}: {err}"[:4000]
            run.finished_at = utcnow()
        if isinstance(err, (InputError, TrainingError)):
            raise
        raise TrainingError(f"training run {run_id} failed: {err}") from err
