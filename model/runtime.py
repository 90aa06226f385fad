"""Loading the base Llama and generating answers.

One ``LanguageModel`` per worker process: the base model (optionally NF4 4-bit, double quant) plus an
optional LoRA adapter that can be swapped without a restart. Generation runs on ``model.engine``
(continuous batching, prefix reuse): ``generate`` takes a batch of chat prompts and runs them to the
end; the worker's batcher feeds the same engine request by request.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.errors import GenerationTimeout, ModelError
from core.settings import Settings
from model.embedded import resolve_base
from model.engine import Engine, Request, Sampling
from model.llama import PlainLlama, Unsupported
from model.tokens import ChatTokenizer

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    timed_out: bool = False
    # The mean of the model's log-probability of each token it wrote (None: nothing written).
    certainty: float | None = None


def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(device: str) -> BitsAndBytesConfig:
    """NF4 with double quantization; bf16 compute where the hardware supports it."""
    from transformers import BitsAndBytesConfig

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
    """The base model and tokenizer from a local folder, with transformers; never touches a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def load_plain(path: Path) -> tuple[PlainLlama, ChatTokenizer]:
    """The base model's weights and tokenizer for the engine, without transformers (a CPU worker's
    start is 2.8 s shorter); ``Unsupported`` when the folder needs transformers."""
    tokenizer = ChatTokenizer(path)
    return PlainLlama(path), tokenizer


class LanguageModel:
    """The base model, the current adapter, and thread-safe generation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.base_path = resolve_base(settings)
        self.base_name = self.base_path.name
        self.adapter_name: str | None = None
        self.adapter_path: str | None = None
        self._lock = threading.Lock()  # one engine step at a time; batching happens in the engine
        plain = settings.model_loader == "auto" and self.device == "cpu" and not settings.load_in_4bit
        self._load(plain=plain)
        if settings.adapter:
            self.use_adapter(settings.adapter)

    def _load(self, *, plain: bool) -> None:
        """The base weights, tokenizer and engine: read directly (``model.llama``) where that reader
        knows the folder, else with transformers (4-bit, GPU, other architectures)."""
        loaded = None
        if plain:
            try:
                loaded = load_plain(self.base_path)
            except Unsupported as err:
                log.info("loading with transformers: %s", err)
        model, tokenizer = loaded or load_base(
            self.base_path, device=self.device, load_in_4bit=self.settings.load_in_4bit
        )
        settings = self.settings
        sampling, eos = _sampling(settings, model), _eos_ids(model, tokenizer)
        try:
            engine = Engine(
                model, eos_ids=eos, sampling=sampling, max_batch=settings.batch_max, cpu_weights=settings.cpu_weights,
                row_weights=settings.cpu_row_weights,
                prefill_chunk=settings.prefill_chunk, prefix_cache=settings.prefix_cache,
                compiled_dir=settings.compiled_dir if settings.cpu_compiled_step == "auto" else None,
            )  # fmt: skip
        except (AttributeError, TypeError) as err:
            raise ModelError(f"{self.base_path} is not a Llama-architecture model this engine can run: {err}") from err
        # All or nothing: a failed reload leaves the model that was serving as it was.
        self.model, self.tokenizer, self.engine, self.plain = model, tokenizer, engine, loaded is not None
        self._can_sanitize = "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters

    @property
    def version(self) -> str:
        return f"{self.base_name}+{self.adapter_name}" if self.adapter_name else self.base_name

    def use_adapter(self, path: str | None, name: str | None = None) -> None:
        """Switch to another LoRA adapter (or none) without reloading the base weights."""
        with self._lock:
            if path == self.adapter_path:
                return
            adapter_dir = Path(path) if path else None
            if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
                raise ModelError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
            if self.plain:
                try:
                    self.model.use_adapter(adapter_dir)  # merged into the projections
                except Unsupported as err:  # DoRA, extra modules, ...: peft knows them
                    log.warning("%s; reloading the base model with transformers and peft", err)
                    self._load(plain=False)
            if not self.plain:
                from peft import PeftModel

                if isinstance(self.model, PeftModel):
                    self.model = self.model.unload()  # drops LoRA layers, base weights untouched
                if adapter_dir is not None:
                    self.model = PeftModel.from_pretrained(self.model, adapter_dir, is_trainable=False)
                    self.model.eval()
            self.engine.model = self.model
            self.engine.reload()  # new weights: fused copies rebuilt, cached prefixes dropped
            self.adapter_path = path
            self.adapter_name = name or (Path(path).name if path else None)
            log.info("model version is now %s", self.version)

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat prompt, trimmed from the oldest turns to fit the prompt budget."""
        msgs = list(messages)
        while True:
            ids = self._chat_ids(msgs, add_generation_prompt=True)
            if len(ids) <= self.settings.max_prompt_tokens or len(msgs) <= 2:
                break
            del msgs[1]  # oldest history turn after the system prompt
        if len(ids) > self.settings.max_prompt_tokens:
            # The system prompt plus the question alone are too long: keep the head (instructions,
            # tickets) and the tail (the question and the generation prompt).
            keep = self.settings.max_prompt_tokens
            ids = ids[: keep // 2] + ids[-(keep - keep // 2) :]
        return ids

    def _chat_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
        """The chat's token ids; control tokens typed inside a message are encoded as text on both loaders
        (``ChatTokenizer`` always; transformers from 5.x, with ``sanitize_control_tokens``)."""
        kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "tokenize": True}
        if not self.plain and self._can_sanitize:
            kwargs["sanitize_control_tokens"] = True
        try:
            ids = self.tokenizer.apply_chat_template(messages, **kwargs)
        except ValueError as err:  # transformers: a control token its tokenizer also makes from plain text
            raise ModelError(f"the prompt cannot be encoded safely: {err}") from err
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def sampling(self) -> Sampling:
        return _sampling(self.settings, self.model)

    def request(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Request:
        """An engine request for one chat prompt; its deadline is ``generation_timeout_s`` from now."""
        ids = self.render(messages)
        return Request(
            ids=ids,
            keep_prefix=self._system_turn_length(messages, ids),
            max_new_tokens=max_new_tokens or self.settings.max_new_tokens,
            min_new_tokens=min_new_tokens,
            deadline=time.monotonic() + self.settings.generation_timeout_s,
            on_token=self._streamer(on_text) if on_text is not None else None,
        )

    def _system_turn_length(self, messages: Sequence[dict[str, str]], ids: list[int]) -> int:
        """Tokens of the rendered system turn (instructions and tickets) when the prompt opens with it:
        the part the same problem asked again shares, so the engine keeps its keys and values."""
        if len(messages) < 2 or messages[0].get("role") != "system":
            return 0
        system = self._chat_ids(list(messages[:1]), add_generation_prompt=False)
        return len(system) if ids[: len(system)] == system else 0

    def result(self, request: Request) -> Generation:
        """What a finished request made; a failure or a deadline with nothing said is an error."""
        if request.error is not None:
            raise ModelError(f"generation failed: {request.error}") from request.error
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True).strip()
        seconds = (request.finished or time.monotonic()) - request.started
        if request.timed_out and not text:
            raise GenerationTimeout(f"no answer within {self.settings.generation_timeout_s:g} s")
        certainty = sum(request.logprobs) / len(request.logprobs) if request.logprobs else None
        return Generation(text, len(request.ids), len(request.generated), seconds, request.timed_out, certainty)

    def generate(
        self,
        prompts: Sequence[Sequence[dict[str, str]]],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        timeout_s: float | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[Generation]:
        """Answer a batch of chat prompts. ``on_text`` streams the first prompt's text as it is made."""
        if not prompts:
            return []
        requests = [
            self.request(p, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                         on_text=on_text if i == 0 else None)
            for i, p in enumerate(prompts)
        ]
        if timeout_s:
            for r in requests:
                r.deadline = time.monotonic() + timeout_s
        with self._lock:
            self.engine.run(requests)
        results = []
        for r in requests:
            try:
                results.append(self.result(r))
            except GenerationTimeout:
                if len(requests) == 1:
                    raise
                results.append(Generation("", len(r.ids), 0, 0.0, True))  # the batch caller sees timed_out
        return results

    def score(self, messages: Sequence[dict[str, str]], answers: Sequence[str]) -> list[float]:
        """How likely the served model is to answer ``messages`` with each of ``answers``: the summed
        log-probability of its tokens (at most ``max_new_tokens``, what the model could write at all)."""
        ids = self.render(messages)
        limit = self.settings.max_new_tokens
        tokens = [list(self.tokenizer.encode(a, add_special_tokens=False))[:limit] for a in answers]
        with self._lock:
            try:
                return self.engine.score(ids, tokens)
            except (RuntimeError, ValueError) as err:
                raise ModelError(f"scoring failed: {err}") from err

    def _streamer(self, on_text: Callable[[str], None]) -> Callable[[int], None]:
        """Token ids in, text pieces out: a piece is passed on once it decodes to whole characters."""
        tokens: list[int] = []
        sent = 0

        def on_token(token: int) -> None:
            nonlocal sent
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd") or len(text) <= sent:
                return  # a multi-byte character is still incomplete
            on_text(text[sent:])
            sent = len(text)

        return on_token

    def _eos_ids(self) -> set[int]:
        return _eos_ids(self.model, self.tokenizer)


def _sampling(st: Settings, model: Any) -> Sampling:
    return Sampling(
        temperature=st.temperature,
        top_k=int(getattr(model.generation_config, "top_k", None) or 50),
        # Small models loop ("The machine is malfunctioning." eight times); these two stop it at the source.
        repetition_penalty=st.repetition_penalty,
        no_repeat_ngram_size=st.no_repeat_ngram_size,
    )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
