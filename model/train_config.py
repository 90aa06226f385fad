"""The training configuration: every knob of a fine-tuning run, with help text (the CLI's flags).

Kept apart from model/train.py so building the command line does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from core.errors import InputError


@dataclass
class TrainConfig:
    """How one adapter is trained. Defaults follow QLoRA (Dettmers et al. 2023) scaled to small data."""

    # LoRA
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the studies used 16)."})
    lora_alpha: int = field(
        default=32,
        metadata={
            "help": "LoRA scale numerator; the update is scaled by alpha/r. 2*r learns faster on a few "
            "hundred steps than the studies' alpha=8 (scale 0.5)."
        },
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={
            "help": "Comma-separated module names that get LoRA. All linear layers of the blocks, as QLoRA "
            "recommends; the studies' set is q_proj,k_proj,v_proj,o_proj,lm_head."
        },
    )
    # Model
    load_in_4bit: bool = field(
        default=True, metadata={"help": "Load the frozen base in NF4 with double quantization (QLoRA)."}
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass: less memory, ~30%% slower."},
    )
    # Data
    max_seq_len: int = field(
        default=1024,
        metadata={"help": "Longest conversation in tokens; longer ones lose their oldest turns first."},
    )
    pack_len: int = field(
        default=512,
        metadata={
            "help": "Packed rows are filled up to this many tokens. Attention inside a row is computed "
            "densely, so on CPU shorter rows waste less; longer rows waste less padding."
        },
    )
    batch_rows: int = field(default=4, metadata={"help": "Packed rows per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    # Schedule
    epochs: int = field(default=1, metadata={"help": "Passes over the training data (when max_steps < 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps; -1: epochs."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    seed: int = field(default=0, metadata={"help": "Seeds data order, LoRA init and dropout."})
    # Bookkeeping
    eval_every: int = field(default=0, metadata={"help": "Validation loss every N steps; 0: start and end."})
    eval_limit: int = field(
        default=0, metadata={"help": "Validation loss on the first N validation conversations; 0: all."}
    )
    save_every: int = field(default=50, metadata={"help": "Resumable checkpoint every N steps; 0: never."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar on stderr."})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)

    def validate(self) -> None:
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise InputError("lora_r and lora_alpha must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise InputError("lora_dropout must be in [0, 1)")
        if not self.targets():
            raise InputError("lora_targets names no module")
        if self.max_seq_len < 16 or self.pack_len < 16:
            raise InputError("max_seq_len and pack_len must be at least 16 tokens")
        if self.batch_rows < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise InputError("batch_rows, grad_accum and epochs must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise InputError("max_steps is -1 (use epochs) or a positive number")
        if not self.learning_rate > 0:
            raise InputError("learning_rate must be positive")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]
