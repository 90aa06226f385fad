"""A Llama checkpoint loaded for serving without transformers: config, weights, rotary frequencies, LoRA.

The engine (``model/engine.py``) runs its own forward pass and only reads a model's weights and shape.
Importing transformers' model classes to hold them costs a worker about 2.8 s of its cold start (they
pull in ``torch._dynamo``, ``torch.distributed``, accelerate and SciPy), more than the rest of its
start-up together. So a plain Llama folder (``config.json`` plus safetensors) is read here into the same
attribute layout transformers uses (``model.layers[i].self_attn.q_proj.weight`` …), which is all the
engine touches. ``tests/test_llama.py`` checks logits, rotary frequencies and LoRA merges against
transformers and peft.

What this reader does not know (another architecture, 4-bit weights, dynamic or YaRN rotary scaling,
DoRA and other adapter kinds) raises ``Unsupported``; the caller then loads with transformers, which
serves everything it can load.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Unsupported(ModelError):
    """The folder or adapter needs transformers (or peft) to load."""


@dataclass(frozen=True)
class LlamaConfig:
    """The shape the engine reads as ``model.config``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    eos_token_id: int | list[int] | None = None


@dataclass
class GenerationConfig:
    eos_token_id: int | list[int] | None = None
    top_k: int | None = None


def read_config(folder: Path) -> LlamaConfig:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}: config.json cannot be read: {err}") from err
    if raw.get("model_type") != "llama":
        raise Unsupported(f"{folder}: model_type {raw.get('model_type')!r} is not llama")
    if raw.get("quantization_config"):
        raise Unsupported(f"{folder}: quantized checkpoint")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise Unsupported(f"{folder}: activation or biases this reader does not implement")
    if raw.get("pretraining_tp", 1) != 1:
        raise Unsupported(f"{folder}: pretraining_tp > 1")
    # transformers 5 writes ``rope_parameters``; checkpoints of 4.x and the hub write rope_theta/rope_scaling.
    rope = dict(raw.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or rope or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise Unsupported(f"{folder}: rotary scaling {kind!r}")
        if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            raise Unsupported(f"{folder}: partial rotary embeddings")
        scaling = {**scaling, "rope_type": kind}
    try:
        heads = int(raw["num_attention_heads"])
        return LlamaConfig(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            eos_token_id=raw.get("eos_token_id"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{folder}: config.json lacks {err}") from err


def inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies, as transformers computes them for the default, linear and llama3 kinds."""
    dim = config.head_dim
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_context / low, freq / factor, freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled)
    return freq


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise Unsupported(f"{folder}: no safetensors weights")


def _frozen(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    with torch.device("meta"):  # no random initialization of weights that are replaced at once
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = _frozen(weight)
    return layer


class _Norm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.variance_epsilon = eps


class _Rotary(torch.nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq(config), persistent=False)
        self.attention_scaling = 1.0  # 1 for every kind this reader accepts


class _Attention(torch.nn.Module):
    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(w) for w in (q, k, v, o))


class _MLP(torch.nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(w) for w in (gate, up, down))
        self.act_fn = torch.nn.functional.silu


class _Layer(torch.nn.Module):
    def __init__(self, take: Any, prefix: str, eps: float) -> None:
        super().__init__()
        self.self_attn = _Attention(*(take(f"{prefix}.self_attn.{n}.weight") for n in PROJECTIONS[:4]))
        self.mlp = _MLP(*(take(f"{prefix}.mlp.{n}.weight") for n in PROJECTIONS[4:]))
        self.input_layernorm = _Norm(take(f"{prefix}.input_layernorm.weight"), eps)
        self.post_attention_layernorm = _Norm(take(f"{prefix}.post_attention_layernorm.weight"), eps)


class _Core(torch.nn.Module):
    def __init__(self, config: LlamaConfig, take: Any) -> None:
        super().__init__()
        # from_pretrained: no random initialization (on the meta device, normal_ imports torch._dynamo: 1 s)
        self.embed_tokens = torch.nn.Embedding.from_pretrained(take("model.embed_tokens.weight"), freeze=True)
        eps = config.rms_norm_eps
        self.layers = torch.nn.ModuleList(
            _Layer(take, f"model.layers.{i}", eps) for i in range(config.num_hidden_layers)
        )
        self.norm = _Norm(take("model.norm.weight"), eps)
        self.rotary_emb = _Rotary(config)


class PlainLlama(torch.nn.Module):
    """A Llama checkpoint's weights in transformers' attribute layout, for ``model.engine.Engine``.

    It has no forward pass of its own: the engine computes it. LoRA adapters are merged into the
    projection weights (``use_adapter``); the base weights are kept to switch back.
    """

    def __init__(self, folder: Path, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from safetensors.torch import load_file

        self.config = read_config(folder)
        self.generation_config = _generation_config(folder, self.config)
        tensors: dict[str, torch.Tensor] = {}
        for path in _weight_files(folder):
            try:
                tensors.update(load_file(str(path)))  # CPU, memory-mapped
            except (OSError, RuntimeError, ValueError) as err:
                raise ModelError(f"{path}: cannot read the weights: {err}") from err

        def take(name: str) -> torch.Tensor:
            try:
                tensor = tensors.pop(name)
            except KeyError:
                raise ModelError(f"{folder}: the weights lack {name}") from None
            return tensor.to(dtype)

        self.model = _Core(self.config, take)
        if self.config.tie_word_embeddings:  # as transformers ties: a stored lm_head.weight is ignored
            self.lm_head = _linear(self.model.embed_tokens.weight)
        else:
            self.lm_head = _linear(take("lm_head.weight"))
        self._base: dict[str, torch.Tensor] = {}  # projection name -> its weight before an adapter merge

    def projections(self) -> dict[str, torch.nn.Linear]:
        """Every LoRA-able projection by its module name (``model.layers.3.self_attn.q_proj``)."""
        found = {}
        for i, layer in enumerate(self.model.layers):
            for part, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
                for name in names:
                    found[f"model.layers.{i}.{part}.{name}"] = getattr(getattr(layer, part), name)
        return found

    @torch.no_grad()
    def use_adapter(self, folder: Path | None) -> None:
        """Merge a LoRA adapter's deltas into the projections, or (None) restore the base weights."""
        deltas = lora_deltas(folder, self) if folder is not None else {}
        modules = self.projections()
        for name, base in self._base.items():
            modules[name].weight = _frozen(base)
        self._base = {}
        for name, delta in deltas.items():
            module = modules[name]
            self._base[name] = module.weight.data
            module.weight = _frozen(module.weight.data + delta.to(module.weight.dtype))


def _generation_config(folder: Path, config: LlamaConfig) -> GenerationConfig:
    try:
        raw = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    return GenerationConfig(eos_token_id=raw.get("eos_token_id", config.eos_token_id), top_k=raw.get("top_k"))


# peft saves "base_model.model.<module name>.lora_A.weight" (adapter name dropped).
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def lora_deltas(folder: Path, model: PlainLlama) -> dict[str, torch.Tensor]:
    """``scale * B @ A`` per adapted projection, as peft's ``get_delta_weight`` computes it."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder} is not a LoRA adapter folder: {err}") from err
    plain = (
        config.get("peft_type") == "LORA"
        and not config.get("use_dora")
        and config.get("bias", "none") == "none"
        and not config.get("fan_in_fan_out")
        and not config.get("modules_to_save")
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and not config.get("trainable_token_indices")
    )
    if not plain:
        raise Unsupported(f"{folder}: an adapter kind this reader does not merge")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise Unsupported(f"{folder}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights))
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"{weights}: cannot read: {err}") from err
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise Unsupported(f"{folder}: adapter tensor {key} is not a LoRA pair")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    known = model.projections()
    deltas = {}
    for name, pair in pairs.items():
        if name not in known or set(pair) != {"A", "B"}:
            raise Unsupported(f"{folder}: adapts {name}, which this reader does not merge")
        a, b = pair["A"], pair["B"]
        shape = tuple(known[name].weight.shape)
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != shape or b.shape[1] != a.shape[0]:
            raise ModelError(f"{folder} was trained for another base model: {name} is {shape}, the adapter "
                             f"gives {(b.shape[0], a.shape[1])}")  # fmt: skip
        deltas[name] = (b.float() @ a.float()) * scale
    return deltas
