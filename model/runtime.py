"""Loading the base Llama and generating answers.

One ``LanguageModel`` per worker process: the base model (optionally NF4 4-bit, double quant) plus an
optional LoRA adapter that can be swapped without a restart. ``generate`` takes a batch of chat
prompts so a worker can serve concurrent conversations in one forward pass per token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from core.errors import GenerationTimeout, ModelError
from core.settings import Settings
from model.embedded import resolve_base

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    timed_out: bool = False


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(device: str) -> BitsAndBytesConfig:
    """NF4 with double quantization; bf16 compute where the hardware supports it."""
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def load_base(
    path: Path, *, device: str, load_in_4bit: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and tokenizer from a local folder; never touches a hub."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device)
        kwargs["dtype"] = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    else:
        # fp32 on CPU: bf16 matmuls are slower than fp32 on CPUs without AMX.
        kwargs["dtype"] = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise ModelError(f"could not load the base model from {path}: {err}") from err
    if not load_in_4bit:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return model, tokenizer


class _Deadline(StoppingCriteria):
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = time.monotonic() >= self.deadline
        self.hit = self.hit or done
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class LanguageModel:
    """The base model, the current adapter, and thread-safe generation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.base_path = resolve_base(settings)
        self.model, self.tokenizer = load_base(
            self.base_path, device=self.device, load_in_4bit=settings.load_in_4bit
        )
        self.base_name = self.base_path.name
        self.adapter_name: str | None = None
        self.adapter_path: str | None = None
        self._lock = threading.Lock()  # one forward pass at a time; batching happens above
        if settings.adapter:
            self.use_adapter(settings.adapter)

    @property
    def version(self) -> str:
        return f"{self.base_name}+{self.adapter_name}" if self.adapter_name else self.base_name

    def use_adapter(self, path: str | None, name: str | None = None) -> None:
        """Switch to another LoRA adapter (or none) without reloading the base weights."""
        from peft import PeftModel

        with self._lock:
            if path == self.adapter_path:
                return
            if isinstance(self.model, PeftModel):
                self.model = self.model.unload()  # drops LoRA layers, base weights untouched
            if path:
                adapter_dir = Path(path)
                if not (adapter_dir / "adapter_config.json").is_file():
                    raise ModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
                self.model = PeftModel.from_pretrained(self.model, adapter_dir, is_trainable=False)
                self.model.eval()
            self.adapter_path = path
            self.adapter_name = name or (Path(path).name if path else None)
            log.info("model version is now %s", self.version)

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat prompt, trimmed from the oldest turns to fit the prompt budget."""
        msgs = list(messages)
        while True:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = list(ids)
            if len(ids) <= self.settings.max_prompt_tokens or len(msgs) <= 2:
                break
            del msgs[1]  # oldest history turn after the system prompt
        if len(ids) > self.settings.max_prompt_tokens:
            # The system prompt plus the question alone are too long: keep the head (instructions,
            # tickets) and the tail (the question and the generation prompt).
            keep = self.settings.max_prompt_tokens
            ids = ids[: keep // 2] + ids[-(keep - keep // 2) :]
        return ids

    def generate(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        *,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[Generation]:
        """Answer a batch of chat prompts. ``on_text`` streams the first prompt's text as it is made."""
        if not prompts:
            return []
        max_new = max_new_tokens or self.settings.max_new_tokens
        timeout = timeout_s or self.settings.generation_timeout_s
        rows = [self.render(p) for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        attention = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device
        )
        deadline = _Deadline(time.monotonic() + timeout)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new,
            stopping_criteria=StoppingCriteriaList([deadline]),
            pad_token_id=pad,
            do_sample=self.settings.temperature > 0,
            # Small models loop ("The machine is malfunctioning." eight times); these two stop it at the source.
            repetition_penalty=self.settings.repetition_penalty,
            no_repeat_ngram_size=self.settings.no_repeat_ngram_size,
        )
        if self.settings.temperature > 0:
            kwargs["temperature"] = self.settings.temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        started = time.monotonic()
        with self._lock, torch.inference_mode():
            try:
                if on_text is not None and len(rows) == 1:
                    output = self._generate_streaming(kwargs, on_text)
                else:
                    output = self.model.generate(**kwargs)
            except (RuntimeError, ValueError) as err:
                raise ModelError(f"generation failed: {err}") from err
        seconds = time.monotonic() - started
        results = []
        for row, out in zip(rows, output):
            new = out[width:]
            eos = self._eos_ids()
            n = len(new)
            for i, tok in enumerate(new.tolist()):
                if tok in eos:
                    n = i
                    break
            text = self.tokenizer.decode(new[:n], skip_special_tokens=True).strip()
            results.append(Generation(text, len(row), n, seconds, deadline.hit))
        if deadline.hit and len(results) == 1 and not results[0].text:
            raise GenerationTimeout(f"no answer within {timeout:g} s")
        return results

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _generate_streaming(self, kwargs: dict[str, Any], on_text: Callable[[str], None]) -> torch.Tensor:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as err:  # surfaced in the calling thread below
                result["err"] = err
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                on_text(piece)
        thread.join()
        if "err" in result:
            raise result["err"]
        return result["out"]
