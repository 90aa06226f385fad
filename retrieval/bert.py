"""A BERT encoder (all-MiniLM-L6-v2 and its tuned copies) without transformers: tokenizer and forward pass.

A worker embeds every question, so it loads the embedder at start. Through transformers' ``AutoModel``
that import alone costs about as much as the rest of the worker's start (see ``model/llama.py`` for
the same reasoning on the language model). The forward pass of a post-LayerNorm BERT is short; it is
written here and checked against transformers' in ``tests/test_retrieval_parts.py``. What it does not
know (another architecture, relative positions, another activation, no ``tokenizer.json``) raises
``Unsupported`` and the caller keeps transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import RetrievalError


class Unsupported(RetrievalError):
    """The folder needs transformers to load."""


class _Layer:
    def __init__(self, take, prefix: str) -> None:  # type: ignore[no-untyped-def]
        attention = f"{prefix}.attention"
        self.qkv_w = torch.cat([take(f"{attention}.self.{n}.weight") for n in ("query", "key", "value")])
        self.qkv_b = torch.cat([take(f"{attention}.self.{n}.bias") for n in ("query", "key", "value")])
        self.out = (take(f"{attention}.output.dense.weight"), take(f"{attention}.output.dense.bias"))
        self.norm1 = (take(f"{attention}.output.LayerNorm.weight"), take(f"{attention}.output.LayerNorm.bias"))
        self.up = (take(f"{prefix}.intermediate.dense.weight"), take(f"{prefix}.intermediate.dense.bias"))
        self.down = (take(f"{prefix}.output.dense.weight"), take(f"{prefix}.output.dense.bias"))
        self.norm2 = (take(f"{prefix}.output.LayerNorm.weight"), take(f"{prefix}.output.LayerNorm.bias"))


class PlainBert:
    """Token ids and attention mask in, the last hidden states out, as ``BertModel`` computes them.

    ``max_length``: the tokenizer truncates there and pads batches to their longest text (the embedder);
    None: neither (the name encoder windows long text itself). ``replace`` swaps in trained weights of
    some layers, ``cast`` changes the precision, as ``module.to(dtype)`` would."""

    def __init__(self, folder: Path, max_length: int | None = None) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise Unsupported(f"{folder}: config.json cannot be read: {err}") from err
        if (
            config.get("model_type") != "bert"
            or config.get("hidden_act") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
            or not (folder / "model.safetensors").is_file()
            or not (folder / "tokenizer.json").is_file()
        ):
            raise Unsupported(f"{folder}: not a BERT folder this reader knows")
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tensors = load_file(str(folder / "model.safetensors"))
        except Exception as err:  # tokenizers raises a bare Exception subclass
            raise RetrievalError(f"{folder}: cannot read the embedder: {err}") from err
        if max_length is None:
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
        else:
            self.tokenizer.enable_truncation(max_length=max_length)
            pad = self.tokenizer.padding or {}
            self.tokenizer.enable_padding(pad_id=int(pad.get("pad_id", config.get("pad_token_id") or 0)),
                                          pad_token=str(pad.get("pad_token", "[PAD]")))  # fmt: skip
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
        # Named as transformers' BertModel names its parameters.
        self.tensors = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        self.folder = folder
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.num_layers = int(config["num_hidden_layers"])
        self.vocab_size = int(config["vocab_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self._build(torch.float32)

    def _build(self, dtype: torch.dtype) -> None:
        def take(name: str) -> torch.Tensor:
            try:
                return self.tensors[name].to(dtype)
            except KeyError:
                raise RetrievalError(f"{self.folder}: the weights lack {name}") from None

        self.dtype = dtype
        self.words = take("embeddings.word_embeddings.weight")
        self.positions = take("embeddings.position_embeddings.weight")
        self.types = take("embeddings.token_type_embeddings.weight")
        self.norm = (take("embeddings.LayerNorm.weight"), take("embeddings.LayerNorm.bias"))
        self.layers = [_Layer(take, f"encoder.layer.{i}") for i in range(self.num_layers)]

    def replace(self, tensors: dict[str, torch.Tensor]) -> None:
        """Swap in weights by their BertModel names (shapes checked by the caller)."""
        self.tensors.update({k: v.float() for k, v in tensors.items()})
        self._build(self.dtype)

    def cast(self, dtype: torch.dtype) -> None:
        self._build(dtype)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        x = self.words[ids] + self.positions[:length] + self.types[0]  # one segment: type 0
        x = F.layer_norm(x, (self.hidden,), *self.norm, eps=self.eps)
        visible = mask.bool()[:, None, None, :]  # padding is never attended to
        head_dim = self.hidden // self.heads
        for layer in self.layers:
            q, k, v = F.linear(x, layer.qkv_w, layer.qkv_b).split(self.hidden, dim=-1)
            q, k, v = (t.view(batch, length, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
            context = context.transpose(1, 2).reshape(batch, length, self.hidden)
            x = F.layer_norm(F.linear(context, *layer.out) + x, (self.hidden,), *layer.norm1, eps=self.eps)
            inner = F.gelu(F.linear(x, *layer.up))
            x = F.layer_norm(F.linear(inner, *layer.down) + x, (self.hidden,), *layer.norm2, eps=self.eps)
        return x
