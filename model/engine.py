"""The decode engine: continuous batching over a slot KV cache, shared-prefix reuse, chunked prefill.

``transformers``' ``generate`` runs a batch from start to finish: a request that arrives one token
after a batch started waits for the whole batch, every row is padded to the longest prompt, and every
prompt is prefilled from scratch although all of them open with the same system prompt. This engine
runs its own loop instead, one step at a time:

- **Continuous batching**: each step decodes one token for every running request; a request joins
  between steps once its prompt is prefilled and leaves as soon as it is done (end of text, its own
  token limit, its own deadline), so nobody waits for the slowest member of a batch.
- **Slot KV cache**: running requests own rows ``0..n-1`` of preallocated key/value buffers, each with
  its own length (no padding, no per-step concatenation); a finished row is replaced by the last one.
- **Prefix reuse**: the keys and values of a prompt's opening that the previous prompt shared (the
  system prompt, or the same tickets) are kept, per model version, and copied instead of recomputed.
  ``reload`` (a new adapter) drops them: they are only valid for the weights that made them.
- **Chunked prefill**: a long prompt is prefilled ``prefill_chunk`` tokens per step, between decode
  steps, so one long prompt does not stall the answers already streaming.

The forward pass is written here for the Llama architecture (SmolLM2, Llama 3.x) on the model's own
weights. On CPU the dense fp32 projections are fused (q/k/v, gate/up) and kept in the form the
fastest kernel wants (``cpu_weights``: bf16 packed for oneDNN where the CPU computes bf16 natively,
else fp16 packed for fbgemm, or fp32 transposed; see ``_Dense``), and with bf16 a second, fp16 copy
for one-row steps (``row_weights``). Query and key rows are reordered so that the rotary embedding is
one complex product (``_pair_rotary_rows``). LoRA adapters are merged into those fused copies. Any
other layer (NF4 4-bit, or any device but the CPU) is called as the module it is, adapter included,
so the GPU path runs this same loop with the GPU's own kernels.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked, and what the small-model loop guards forbid."""

    temperature: float = 0.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


@dataclass(eq=False)
class Request:
    """One prompt in the engine. ``on_token`` is called with every new token id as it is made."""

    ids: list[int]
    max_new_tokens: int
    deadline: float
    min_new_tokens: int = 0
    on_token: Callable[[int], None] | None = None
    generated: list[int] = field(default_factory=list)
    # The model's own log-probability of each generated token, before penalties and bans: how sure it was.
    logprobs: list[float] = field(default_factory=list)
    timed_out: bool = False
    done: bool = False
    error: BaseException | None = None
    keep_prefix: int = 0  # this many opening tokens are worth keeping for later prompts (the system turn)
    reused_prefix: int = 0  # prompt tokens whose keys and values came from the prefix cache
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _prefilled: int = 0
    # The tokens already in the text, once each (the repetition penalty): as a set, and as the index
    # tensor the penalty gathers with, rebuilt only when a new token joins.
    _seen: set[int] = field(default_factory=set)
    _seen_index: torch.Tensor | None = None
    _ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    _tail: tuple[int, ...] = ()  # the last n-1 tokens: the start of the n-gram the next token completes


class _Dense:
    """A fused projection for the CPU: ``x @ W.T`` with the weight stored as the fastest kernel here
    wants it (``form``):

    - ``fp32``: transposed, so one-row products stream it (1.5x ``F.linear``'s layout); the exact
      numbers of transformers' forward.
    - ``fp16``: packed for fbgemm's fp16-weight, fp32-activation GEMM. Half the bytes: 1.8x (one row)
      to 3.3x (four rows) faster than fp32 on an AVX2 CPU.
    - ``bf16``: packed for oneDNN's bf16 GEMM, where the CPU computes bf16 natively (AVX512-BF16, AMX).
      The same bytes as fp16, and the products are computed in bf16 instead of converted to fp32: on
      an AVX512-BF16 EPYC 2.3x faster than fbgemm at 16 rows and 4x at a 128-token prefill chunk,
      0.8x at one row (``python -m bench.answer_latency``, ``bench.load``). Inputs are rounded to bf16
      for the product only; the residual stream stays fp32.

    With ``row_copy`` (bf16 only) the weight is also kept as plain fp16 for one-row products, where
    aten's fp16 matrix-vector kernel reads the weights 1.4x faster than oneDNN's bf16 block (at two and
    three rows aten is slower than oneDNN: 15.3 and 22.7 ms against 12.3 and 11.4 for a step's matrices).
    """

    def __init__(self, weight: torch.Tensor, *, form: str, row_copy: bool = False) -> None:
        self.out_features, self.in_features = weight.shape
        self.form = form
        self.row: torch.Tensor | None = None
        self.row_t: torch.Tensor | None = None  # a view of ``row``
        if form == "bf16" and row_copy:
            self.row = weight.to(torch.float16).contiguous()
            self.row_t = self.row.t()
        if form == "fp16":
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float().contiguous())
        elif form == "bf16":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 16)
        else:
            self.weight_t = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "fp32":
            return x @ self.weight_t
        if self.row is not None and x.numel() == self.in_features:
            # aten's fp16 matrix-vector product (fp32 sums, the result rounded to fp16): 1.4x oneDNN's
            # bf16 block on one row, near the read bound of these matrices on an AVX512 EPYC.
            # The result stays fp16 (the callers' sums promote it); F.linear takes the row in any shape.
            return F.linear(x.to(torch.float16), self.row)
        flat = x.reshape(-1, self.in_features)
        if self.form == "fp16":
            out = torch.fbgemm_linear_fp16_weight_fp32_activation(flat, self.packed, None)
        else:
            rows = flat.shape[0]
            flat = flat.to(torch.bfloat16)
            if rows < _BF16_MIN_ROWS:
                # oneDNN's one-row path is slower than its four-row block, and a row's result does not
                # depend on the rows beside it (tests/test_engine.py), so pad with zero rows.
                flat = F.pad(flat, (0, 0, 0, _BF16_MIN_ROWS - rows))
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")[:rows].float()
        return out.view(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` for one row, x [1, in_features]: with the fp16 copy, one conversion and one mm on
        the transposed view (F.linear adds four ops around the same kernel)."""
        if self.row_t is not None:
            return torch.mm(x.to(torch.float16), self.row_t)
        return self(x)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * (4 if self.form == "fp32" else 2)


_BF16_MIN_ROWS = 4


def fp16_kernels_available() -> bool:
    # PyTorch marks these ops deprecated; where a build lacks them the engine falls back to fp32.
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch, "fbgemm_linear_fp16_weight_fp32_activation"
    )


def native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (oneDNN: AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated and slower than fp16 or fp32. (The name model's encoder asks the same.)"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def bf16_kernels_available() -> bool:
    """bf16 is native here and this torch build has oneDNN's packed linear."""
    return native_bf16() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_weight_form(requested: str) -> str:
    """The CPU weight form to use for ``requested`` (``auto``, ``bf16``, ``fp16`` or ``fp32``): auto is
    bf16 where it is native, else fp16 where fbgemm is built in, else fp32; a form this machine cannot
    run falls back the same way."""
    if requested in ("auto", "bf16") and bf16_kernels_available():
        return "bf16"
    if requested in ("auto", "bf16", "fp16") and fp16_kernels_available():
        return "fp16"
    return "fp32"


class _Layer:
    """One decoder layer's weights in the form the forward pass uses."""

    def __init__(self, layer: Any, *, head_dim: int, fuse: bool, form: str = "fp32", row_copy: bool = False) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = layer.input_layernorm.weight
        self.norm2 = layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.qkv: _Dense | None = None
        self.gate_up: _Dense | None = None
        self.o: _Dense | None = None
        self.down: _Dense | None = None
        self.modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj)
        dense = [_dense_weight(m) for m in self.modules]
        if fuse and all(w is not None for w in dense):
            q, k, v, o, gate, up, down = dense
            q, k = _pair_rotary_rows(q, head_dim), _pair_rotary_rows(k, head_dim)  # type: ignore[arg-type]
            self.qkv = _Dense(torch.cat([q, k, v]), form=form, row_copy=row_copy)  # type: ignore[list-item]
            self.o = _Dense(o, form=form, row_copy=row_copy)  # type: ignore[arg-type]
            self.gate_up = _Dense(torch.cat([gate, up]), form=form, row_copy=row_copy)  # type: ignore[list-item]
            self.down = _Dense(down, form=form, row_copy=row_copy)  # type: ignore[arg-type]
        # transformers' SiLU module calls F.silu: called directly, a module call fewer per layer.
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn


def _memory_bytes() -> int:
    """This machine's memory, or the container's limit where one is set (cgroup v2 or v1); 0 where it
    cannot be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _pair_rotary_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Query or key rows reordered so that each head's rotary pairs sit side by side.

    transformers' Llama rotates dimension ``i`` of a head together with ``i + head_dim/2``
    (``rotate_half``); with the pairs adjacent, the rotation of every query and key head is one complex
    product (3 ops where rotate_half takes 14 per layer). Queries and keys get the same order, so their
    dot products, and the attention, do not change; only the cache holds keys in this order."""
    half = head_dim // 2
    order = torch.arange(head_dim).view(2, half).t().reshape(-1)  # 0, half, 1, half + 1, ...
    return weight.reshape(-1, head_dim, weight.shape[-1])[:, order].reshape(weight.shape)


def _dense_weight(module: Any) -> torch.Tensor | None:
    """The weight a projection really applies (base plus merged LoRA delta), or None when it is not a
    plain dense matrix (4-bit, or a layer type this code does not know)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        if type(module) is torch.nn.Linear and module.bias is None:
            return module.weight.detach()
        return None
    if type(base) is not torch.nn.Linear or base.bias is not None or getattr(module, "merged", False):
        return None
    weight = base.weight.detach()
    for name in module.active_adapters:
        if name in getattr(module, "lora_A", {}):
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


class Engine:
    """Continuous batching for one Llama model. Not thread-safe: one thread calls ``step``."""

    def __init__(
        self,
        model: Any,
        *,
        eos_ids: set[int],
        sampling: Sampling,
        max_batch: int = 16,
        cpu_weights: str = "auto",
        row_weights: str = "auto",
        prefill_chunk: int = 128,
        prefix_cache: int = 8,
        min_prefix: int = 16,
        compiled_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.sampling = sampling
        self.max_batch = max_batch
        self.cpu_weights = cpu_weights
        self.row_weights = row_weights
        self.prefill_chunk = prefill_chunk
        self.prefix_slots = prefix_cache
        self.min_prefix = min_prefix
        self.compiled_dir = compiled_dir  # where `model prepare` keeps the compiled one-row layer
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        self.steps = 0
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._last_ids: list[int] = []
        self.reload()

    # --- weights ----------------------------------------------------------------------------------
    def reload(self) -> None:
        """Take the model's current weights (call after an adapter change): fused copies are rebuilt
        and cached prefixes dropped, since their keys and values came from the old weights."""
        inner = self.model
        if hasattr(inner, "get_base_model"):  # a PeftModel
            inner = inner.get_base_model()
        self.causal = inner
        core = inner.model
        config = inner.config
        self.device = core.embed_tokens.weight.device
        self.dtype = core.embed_tokens.weight.dtype if core.embed_tokens.weight.is_floating_point() else torch.float32
        fuse = self.device.type == "cpu" and self.dtype == torch.float32
        # The CPU form the fused weights are kept in ("fp32", "fp16" or "bf16"); None: not fused.
        self.weight_form = cpu_weight_form(self.cpu_weights) if fuse else None
        form = self.weight_form or "fp32"
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.row_form = self._row_form(core, inner.lm_head, form)
        row_copy = self.row_form == "fp16"
        with torch.no_grad():
            self.layers = [_Layer(layer, head_dim=self.head_dim, fuse=fuse, form=form, row_copy=row_copy)
                           for layer in core.layers]
            # Fusing is decided per layer (a layer _dense_weight cannot read stays as its modules).
            self._any_fused = any(layer.qkv is not None for layer in self.layers)
            self._any_unfused = any(layer.qkv is None for layer in self.layers)
            self.embed = core.embed_tokens
            self.norm = core.norm.weight
            self.norm_eps = core.norm.variance_epsilon
            head = _dense_weight(inner.lm_head) if fuse else None
            self.head_t = _Dense(head, form=form, row_copy=row_copy) if head is not None else None
            self.head = inner.lm_head
        self.scaling = self.head_dim**-0.5
        rotary = core.rotary_emb
        self.inv_freq = rotary.inv_freq.to(self.device, torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self._cos = self._sin = self._turns = torch.empty(0)
        self._capacity = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._prefixes.clear()
        self._last_ids = []
        self._compiled = self._compiled_layer(config)

    def _compiled_layer(self, config: Any) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
        """The compiled one-row layer (model/compiled.py) where it applies: the fp16 copy serves one-row
        steps, every layer is fused, and ``model prepare`` built it for these layers."""
        if self.compiled_dir is None or self.row_form != "fp16" or self._any_unfused:
            return None
        from model import compiled

        shape = compiled.LayerShape.of(config)
        if shape is None or any(layer.act is not F.silu for layer in self.layers):
            return None
        return compiled.load(compiled.artifact(self.compiled_dir, shape))

    @property
    def step_form(self) -> str:
        """How a one-row decode step runs: "compiled", "eager" (the lean path) or "batch"."""
        if self._any_unfused:
            return "batch"
        return "compiled" if self._compiled is not None else "eager"

    def _row_form(self, core: Any, head: Any, form: str) -> str | None:
        """The form one-row steps use: "fp16" (a second copy of the weights, for aten's fp16
        matrix-vector product) or None (the batch form). Only the bf16 form needs the copy: oneDNN's bf16
        kernels win from four rows up (a prefill chunk, a busy batch), fp16 wins on one row (one user at
        a time, the usual case). ``auto`` keeps the copy where it takes at most 1/16 of the memory: with
        the mapped fp32 weights and the bf16 copy a model then holds half of it, and a reload builds the
        new model before it lets the old one go."""
        if form != "bf16" or self.row_weights == "off":
            return None
        if self.row_weights == "fp16":
            return "fp16"
        params = sum(p.numel() for p in core.layers.parameters()) + sum(p.numel() for p in head.parameters())
        return "fp16" if params * 2 <= _memory_bytes() // 16 else None

    # --- requests ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if not request.ids:
            raise ValueError("empty prompt")
        request._seen = set(request.ids)
        request._seen_index = None
        n = self.sampling.no_repeat_ngram_size
        if n > 0:
            for i in range(len(request.ids) - n + 1):
                gram = request.ids[i : i + n]
                request._ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])
            request._tail = tuple(request.ids[-(n - 1):]) if n > 1 else ()
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop a request between steps (its caller gave up); its slot is freed at once."""
        if request in self.waiting:
            self.waiting.remove(request)
            request.done = True
        elif request in self.running:
            self._finish(self.running.index(request))

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def run(self, requests: Sequence[Request]) -> None:
        """Add the requests and step until all of them are done (the synchronous path)."""
        for r in requests:
            self.add(r)
        while any(not r.done for r in requests):
            self.step()

    def score(self, prompt: list[int], continuations: Sequence[list[int]]) -> list[float]:
        """The log-probability of each continuation after ``prompt`` (summed over its tokens), with the
        weights the engine serves. The prompt is prefilled once, in its own cache row (reusing a cached
        prefix: usually the one its generation just left), and each continuation runs on top of it; the
        running requests' rows are not touched, so this may run between any two steps."""
        if not prompt:
            raise ValueError("empty prompt")
        row = self.max_batch + 1
        self._ensure_capacity(len(prompt) + max((len(c) for c in continuations), default=0))
        scores: list[float] = []
        with torch.inference_mode():
            start = self._reuse_prefix(prompt, row)
            while start < len(prompt):
                end = min(len(prompt), start + self.prefill_chunk)
                ids = torch.tensor([prompt[start:end]], device=self.device)
                last = self._forward(ids, rows=[row], starts=[start], last_only=True)
                start = end
            self._remember_prefix(prompt, 0, row)
            first = torch.log_softmax(last[0], -1)
            for tokens in continuations:
                if not tokens:
                    scores.append(0.0)
                    continue
                total = float(first[tokens[0]])
                if len(tokens) > 1:
                    ids = torch.tensor([tokens[:-1]], device=self.device)
                    logits = self._forward(ids, rows=[row], starts=[len(prompt)], last_only=False)[0]
                    following = torch.tensor(tokens[1:], device=self.device)[:, None]
                    total += float(torch.log_softmax(logits, -1).gather(1, following).sum())
                scores.append(total)
        return scores

    def step(self) -> list[Request]:
        """One prefill chunk (for the oldest waiting request, when a slot is free) and one decode step
        for every running request. Returns the requests that finished in this step."""
        finished: list[Request] = []
        with torch.inference_mode():
            now = time.monotonic()
            for r in list(self.waiting):
                if now >= r.deadline:  # never started: it timed out in the queue
                    self.waiting.remove(r)
                    r.timed_out = r.done = True
                    r.finished = now
                    finished.append(r)
            if self.waiting and len(self.running) < self.max_batch:
                r = self.waiting[0]
                try:
                    joined = self._prefill(r)
                except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                    self.waiting.remove(r)
                    r.error, r.done, r.finished = err, True, time.monotonic()
                    finished.append(r)
                else:
                    if joined:
                        self.waiting.remove(r)
                        finished.extend(self._after_token([r]))
            if self.running:
                before = list(self.running)
                try:
                    self._decode()
                except Exception as err:  # noqa: BLE001 - every running request gets the error; the engine goes on
                    now = time.monotonic()
                    for r in before:
                        r.error, r.done, r.finished = err, True, now
                    self.running.clear()
                    finished.extend(before)
                else:
                    finished.extend(self._after_token(before))
        self.steps += 1
        return finished

    # --- the loop's parts -------------------------------------------------------------------------
    def _after_token(self, rows: list[Request]) -> list[Request]:
        """Check stop conditions for requests that just got a token; drop the finished ones."""
        done = []
        now = time.monotonic()
        for r in rows:
            last = r.generated[-1]
            if last in self.eos_ids and len(r.generated) > r.min_new_tokens:
                r.generated.pop()  # the end of text is not part of the answer, nor streamed
                r.logprobs.pop()
                done.append(r)
                continue
            if r.on_token is not None:
                r.on_token(last)
            if len(r.generated) >= r.max_new_tokens:
                done.append(r)
            elif now >= r.deadline:
                r.timed_out = True
                done.append(r)
        for r in done:
            if r in self.running:
                self._finish(self.running.index(r))
            r.done, r.finished = True, now
        return done

    def _finish(self, row: int) -> None:
        """Free a running row: the last running row moves into its slot, so rows stay 0..n-1."""
        last = len(self.running) - 1
        r = self.running[row]
        if row != last:
            moved = self.running[last]
            n = self._length(moved)
            for keys, values in zip(self._keys, self._values):
                keys[row, :, :n] = keys[last, :, :n]
                values[row, :, :n] = values[last, :, :n]
            self.running[row] = moved
        self.running.pop()
        r.done = True

    @staticmethod
    def _length(r: Request) -> int:
        """Tokens of ``r`` in the cache: the prompt and every generated token but the last (its keys
        and values are written by the next decode step)."""
        return len(r.ids) + len(r.generated) - 1

    def _ensure_capacity(self, tokens: int) -> None:
        """Key/value buffers for ``max_batch`` rows plus a staging row (the prefill) and a scoring row
        (``score``, which may run while a long prompt is half prefilled), grown by doubling."""
        if tokens <= self._capacity:
            return
        capacity = max(256, 1 << math.ceil(math.log2(tokens)))
        shape = (self.max_batch + 2, self.kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for old, new in zip(self._keys + self._values, keys + values):
            new[:, :, : self._capacity] = old
        self._keys, self._values, self._capacity = keys, values, capacity
        positions = torch.arange(capacity, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._cos = (emb.cos() * self.rope_scale).to(self.dtype)
        self._sin = (emb.sin() * self.rope_scale).to(self.dtype)
        self._turns = torch.polar(torch.full_like(freqs, self.rope_scale), freqs)  # for the paired rows
        self._turn_pairs = torch.view_as_real(self._turns)  # [position, dim / 2, (cos, sin)]
        self._widths = torch.empty(capacity, dtype=torch.uint8)  # a row's length, as a slice's shape

    def _prefill(self, r: Request) -> bool:
        """Prefill the next chunk of ``r`` in the staging row; True once its first token is made and it
        has joined the running rows."""
        stage = self.max_batch
        self._ensure_capacity(len(r.ids) + r.max_new_tokens)
        if r._prefilled == 0:
            r.started = time.monotonic()
            reused = self._reuse_prefix(r.ids, stage)
            if reused:
                r.reused_prefix = r._prefilled = reused
        start = r._prefilled
        end = min(len(r.ids), start + self.prefill_chunk)
        ids = torch.tensor([r.ids[start:end]], device=self.device)
        logits = self._forward(ids, rows=[stage], starts=[start], last_only=True)
        r._prefilled = end
        if end < len(r.ids):
            return False
        self._remember_prefix(r.ids, r.keep_prefix, stage)
        row = len(self.running)
        n = len(r.ids)
        for keys, values in zip(self._keys, self._values):
            keys[row, :, :n] = keys[stage, :, :n]
            values[row, :, :n] = values[stage, :, :n]
        self.running.append(r)
        r.generated.append(self._pick(logits, [r])[0])
        return True

    def _reuse_prefix(self, ids: list[int], stage: int) -> int:
        """Copy the longest cached prefix of ``ids`` (leaving at least one token to prefill) into cache
        row ``stage``; returns its length."""
        best: tuple[int, ...] | None = None
        for prefix in self._prefixes:
            n = len(prefix)
            if n < len(ids) and (best is None or n > len(best)) and tuple(ids[:n]) == prefix:
                best = prefix
        if best is None:
            return 0
        self._prefixes.move_to_end(best)
        n = len(best)
        for (pk, pv), keys, values in zip(self._prefixes[best], self._keys, self._values):
            keys[stage, :, :n] = pk
            values[stage, :, :n] = pv
        self.prefix_hits += 1
        self.prefix_tokens_reused += n
        return n

    def _remember_prefix(self, ids: list[int], keep: int, stage: int) -> None:
        """Keep openings worth reusing, from cache row ``stage`` the prompt was just prefilled in: the one
        its caller marked (the system turn: instructions and tickets, which the same problem asked again
        will share) and the one it shares with the previous prompt (at least the instructions)."""
        previous, self._last_ids = self._last_ids, ids
        if self.prefix_slots <= 0:
            return
        shared = 0
        for a, b in zip(previous, ids):
            if a != b:
                break
            shared += 1
        for n in {shared, keep}:
            n = min(n, len(ids) - 1)
            key = tuple(ids[:n])
            if n < self.min_prefix or key in self._prefixes:
                continue
            self._prefixes[key] = [(k[stage, :, :n].clone(), v[stage, :, :n].clone())
                                   for k, v in zip(self._keys, self._values)]
            while len(self._prefixes) > self.prefix_slots:
                self._prefixes.popitem(last=False)

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (what its memory-bandwidth bound is made of)."""
        total = 0
        for layer in self.layers:
            if layer.qkv is not None:
                total += sum(d.nbytes for d in (layer.qkv, layer.o, layer.gate_up, layer.down))  # type: ignore[union-attr]
            else:
                total += sum(p.numel() * p.element_size() for m in layer.modules for p in m.parameters())
            total += (layer.norm1.numel() + layer.norm2.numel()) * 4
        if self.head_t is not None:
            total += self.head_t.nbytes
        else:
            total += sum(p.numel() * p.element_size() for p in self.head.parameters())
        return total

    def _decode(self) -> None:
        rows = self.running
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        starts = [self._length(r) for r in rows]
        logits = self._forward(ids, rows=list(range(len(rows))), starts=starts, last_only=True)
        for r, token in zip(rows, self._pick(logits, rows)):
            r.generated.append(token)

    # --- the forward pass -------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, *, rows: list[int], starts: list[int], last_only: bool) -> torch.Tensor:
        """Logits for ``ids`` ([batch, t]): row ``i`` continues cache row ``rows[i]`` at position
        ``starts[i]``. Either one row with t tokens (prefill) or many rows with one token (decode)."""
        batch, t = ids.shape
        if batch * t == 1 and not self._any_unfused:
            logits = self._row_step(ids, rows[0], starts[0])
            return logits if last_only else logits[None]
        hidden = self.embed(ids).to(self.dtype)
        if t > 1:
            positions = torch.arange(starts[0], starts[0] + t, device=self.device)[None]
        else:
            positions = torch.tensor(starts, device=self.device)[:, None]
        if self._any_fused:
            turns = self._turns[positions][:, :, None]  # [batch, t, 1, dim / 2]
        if self._any_unfused:
            cos = self._cos[positions][:, None]  # [batch, 1, t, dim]
            sin = self._sin[positions][:, None]
        width = max(starts) + t
        if t > 1:  # one row: causal within the chunk, everything before it visible
            mask = torch.ones(t, width, dtype=torch.bool, device=self.device).tril(diagonal=starts[0])[None, None]
        else:
            index = torch.tensor(starts, device=self.device)  # where each row's new key and value go
            # Each row's new key and value go to (row, head, index): one flat copy per buffer instead of
            # advanced indexing (index_put cost 5x as much per layer at 16 rows).
            heads_index = torch.arange(self.kv_heads, device=self.device)
            slots = (torch.tensor(rows, device=self.device)[:, None] * self.kv_heads + heads_index) * self._capacity
            slots = (slots + index[:, None]).reshape(-1)
            visible = torch.arange(width, device=self.device)[None] < (index + 1)[:, None]
            # Built once per step, not per layer: 0 where a row sees a position, -inf past its length.
            bias = torch.zeros(batch, 1, 1, width, dtype=self.dtype, device=self.device)
            bias.masked_fill_(~visible[:, None, None], -math.inf)
        contiguous = rows == list(range(rows[0], rows[0] + batch))
        select = slice(rows[0], rows[0] + batch) if contiguous else torch.tensor(rows, device=self.device)
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        for layer, keys, values in zip(self.layers, self._keys, self._values):
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm1, layer.eps)
            if layer.qkv is not None:  # fused: the rows come paired (_pair_rotary_rows), fp32
                qkv = layer.qkv(x).float()
                pairs = qkv[..., : q_size + kv_size].view(batch, t, self.heads + self.kv_heads, -1, 2)
                qk = torch.view_as_real(torch.view_as_complex(pairs) * turns).view(batch, t, -1, self.head_dim)
                q, k = qk[:, :, : self.heads].transpose(1, 2), qk[:, :, self.heads :].transpose(1, 2)
                v = qkv[..., q_size + kv_size :].view(batch, t, self.kv_heads, self.head_dim).transpose(1, 2)
            else:
                q, k, v = (m(x) for m in layer.modules[:3])
                q = q.view(batch, t, self.heads, self.head_dim).transpose(1, 2)
                k = k.view(batch, t, self.kv_heads, self.head_dim).transpose(1, 2)
                v = v.view(batch, t, self.kv_heads, self.head_dim).transpose(1, 2)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            if t > 1:
                keys[rows[0], :, starts[0] : starts[0] + t] = k[0]
                values[rows[0], :, starts[0] : starts[0] + t] = v[0]
            else:
                keys.view(-1, self.head_dim).index_copy_(0, slots, k.reshape(-1, self.head_dim))
                values.view(-1, self.head_dim).index_copy_(0, slots, v.reshape(-1, self.head_dim))
            if t > 1:
                attn = F.scaled_dot_product_attention(
                    q, keys[select, :, :width], values[select, :, :width], attn_mask=mask, scale=self.scaling,
                    enable_gqa=self.kv_heads != self.heads,
                )
                attn = attn.transpose(1, 2).reshape(batch, t, q_size)
            else:
                # One query per row; the query heads of a key head are its "positions". One row sees its
                # whole cache (no mask); a batch's rows each see their own length (``bias``). Against two
                # batched products and a masked softmax: a 16-row step at 450 positions 2-13 % shorter
                # (about the same at 200), and one row's attention 1.8x faster.
                grouped = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
                attn = F.scaled_dot_product_attention(
                    grouped, keys[select, :, :width], values[select, :, :width],
                    attn_mask=bias if batch > 1 else None, scale=self.scaling,
                ).reshape(batch, t, q_size)  # fmt: skip
            hidden = hidden + (layer.o(attn) if layer.o is not None else layer.modules[3](attn))
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm2, layer.eps)
            if layer.gate_up is not None:
                gate, up = layer.gate_up(x).chunk(2, dim=-1)
                hidden = hidden + layer.down(layer.act(gate) * up)  # type: ignore[misc]
            else:
                gate_proj, up_proj, down_proj = layer.modules[4:]
                hidden = hidden + down_proj(layer.act(gate_proj(x)) * up_proj(x))
        if last_only:
            hidden = hidden[:, -1]
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.norm_eps)
        logits = (self.head_t(hidden) if self.head_t is not None else self.head(hidden)).float()
        if batch * t == 1 and self._overflowed(logits):  # one row beside unfused layers: the copy served it
            return self._forward(ids, rows=rows, starts=starts, last_only=last_only)
        return logits

    def _row_step(self, ids: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """``_forward`` for one token of one row, every layer fused: one user decoding alone, the usual
        case. Logits [1, vocab], fp32."""
        embedded = self.embed(ids).to(self.dtype).view(1, -1)
        hidden = self._compiled_layers(embedded, row, start) if self._compiled is not None and start > 0 else None
        if hidden is None:
            hidden = self._row_layers(embedded, row, start)
        hidden = _rms_norm(hidden, self.norm, self.norm_eps)
        logits = (self.head_t.product(hidden) if self.head_t is not None else self.head(hidden)).float()
        if self._overflowed(logits):
            return self._row_step(ids, row, start)
        return logits

    def _compiled_layers(self, hidden: torch.Tensor, row: int, start: int) -> torch.Tensor | None:
        """The layers of ``_row_step`` through the compiled layer (model/compiled.py; built for rows of two
        tokens or more: a row's first token runs eagerly). None where it failed: it is dropped for good,
        and the caller runs the step eagerly (rewriting the same cache slots)."""
        turn, widths = self._turn_pairs[start], self._widths[: start + 1]
        try:
            for layer, keys, values in zip(self.layers, self._keys, self._values):
                hidden = self._compiled([  # type: ignore[misc]
                    hidden, turn, widths, layer.norm1, layer.norm2, layer.qkv.row_t, layer.o.row_t,  # type: ignore[union-attr]
                    layer.gate_up.row_t, layer.down.row_t, keys[row], values[row],  # type: ignore[union-attr]
                ])[0]  # fmt: skip
        except RuntimeError as err:  # what the runner raises for its own errors
            log.warning("the compiled one-row layer failed (%s): one-row steps run eagerly from now on", err)
            self._compiled = None
            return None
        return hidden

    def _row_layers(self, hidden: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """The layers of ``_row_step``, eagerly: the batch path's arithmetic in 2-D tensors, without
        index tensors, masks or reshapes (about 4,300 tensor ops a step where the batch path takes 5,900;
        SmolLM2-135M: a 16.3 ms step 15.2 ms on a 2-core EPYC). model/compiled.py compiles the same."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        turns = self._turns[start]  # [dim / 2]: every head's pairs turn alike
        width = start + 1
        for layer, keys, values in zip(self.layers, self._keys, self._values):
            qkv = layer.qkv.product(_rms_norm(hidden, layer.norm1, layer.eps)).float()  # type: ignore[union-attr]
            pairs = qkv[0, : q_size + kv_size].view(heads + kv_heads, -1, 2)
            qk = torch.view_as_real(torch.view_as_complex(pairs) * turns)
            keys[row, :, start] = qk[heads:].view(kv_heads, head_dim)
            values[row, :, start] = qkv[0, q_size + kv_size :].view(kv_heads, head_dim)
            attn = F.scaled_dot_product_attention(
                qk[:heads].view(1, kv_heads, heads // kv_heads, head_dim), keys[row : row + 1, :, :width],
                values[row : row + 1, :, :width], scale=self.scaling,
            )  # fmt: skip
            hidden = hidden + layer.o.product(attn.reshape(1, q_size))  # type: ignore[union-attr]
            gate_up = layer.gate_up.product(_rms_norm(hidden, layer.norm2, layer.eps))  # type: ignore[union-attr]
            half = gate_up.shape[-1] // 2
            hidden = hidden + layer.down.product(layer.act(gate_up[:, :half]) * gate_up[:, half:])  # type: ignore[union-attr]
        return hidden

    def _overflowed(self, logits: torch.Tensor) -> bool:
        """Whether a one-row step the fp16 copy served gave logits that are not finite: the copy's range
        (65,504) was too small for this model's activations. Then the copy is dropped for good, and the
        caller redoes the step in bf16 (it rewrites the same cache slots)."""
        # One sum in fp32 is not finite when any logit is not (a tenth of isfinite().all()'s time); fp16
        # logits are at most 65,504 each, so finite ones cannot sum past fp32's range.
        if self.row_form is None or math.isfinite(float(logits.sum())):
            return False
        log.warning("a one-row step overflowed fp16: the engine drops its fp16 copy and serves in bf16")
        self._drop_row_copy()
        return True

    def _drop_row_copy(self) -> None:
        for layer in self.layers:
            for dense in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if dense is not None:
                    dense.row = dense.row_t = None
        if self.head_t is not None:
            self.head_t.row = self.head_t.row_t = None
        self.row_form = None
        self._compiled = None  # it needs the copy

    # --- picking tokens ---------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """The next token per row: repetition penalty and banned n-grams as ``generate`` applies them,
        then greedy or temperature sampling."""
        s = self.sampling
        own = torch.log_softmax(logits, -1)  # the model's belief, before the loop guards change it
        if s.repetition_penalty != 1.0:
            # Only the tokens already in the text change (gather, scale, scatter back, as transformers'
            # RepetitionPenaltyLogitsProcessor does): a few hundred values, not the whole vocabulary.
            for i, r in enumerate(rows):
                if r._seen_index is None:
                    r._seen_index = torch.tensor(sorted(r._seen), dtype=torch.long, device=logits.device)
                values = logits[i].index_select(0, r._seen_index)
                penalized = torch.where(values < 0, values * s.repetition_penalty, values / s.repetition_penalty)
                logits[i].index_copy_(0, r._seen_index, penalized)
        n = s.no_repeat_ngram_size
        for i, r in enumerate(rows):
            if n > 0:
                banned = r._ngrams.get(r._tail)
                if banned:
                    logits[i, list(banned)] = -math.inf
            if len(r.generated) < r.min_new_tokens:
                logits[i, list(self.eos_ids)] = -math.inf
        if s.temperature > 0:
            scaled = logits / s.temperature
            if s.top_k > 0:
                kth = scaled.topk(min(s.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                scaled = scaled.masked_fill(scaled < kth, -math.inf)
            tokens = torch.multinomial(scaled.softmax(-1), 1)[:, 0].tolist()
        else:
            tokens = logits.argmax(-1).tolist()
        for i, (r, token) in enumerate(zip(rows, tokens)):
            r.logprobs.append(float(own[i, token]))
            self._note(r, token)
        return tokens

    def _note(self, r: Request, token: int) -> None:
        """Remember a new token for the penalty and the n-gram ban of the following steps."""
        if token not in r._seen:
            r._seen.add(token)
            r._seen_index = None
        n = self.sampling.no_repeat_ngram_size
        if n > 0:
            r._ngrams.setdefault(r._tail, set()).add(token)
            r._tail = (r._tail + (token,))[-(n - 1):] if n > 1 else ()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm in fp32: F.rms_norm's CPU kernel dispatches 10 tensor ops for it, this
    6, with the same result on one row."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
