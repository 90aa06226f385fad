"""Contextual word vectors from the embedded MiniLM, the world knowledge the name model stands on.

Name lists and spelling cannot tell that "trump" or "Shaq" is a person, or that "hang out with X" makes
X one; a pretrained transformer can. all-MiniLM-L6-v2 already ships for retrieval (so nothing new is
downloaded or installed), is small (22M parameters) and runs a chat message in a few milliseconds on a
CPU. Its hidden states are frozen: only the logistic regression on top is trained (``train_names.py``).
The base model is always the embedded one, never a retrieval-tuned copy: the weights on top were trained
against these vectors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import PrivacyError

# Last layer (context) and a middle one (word form): what the classifier sees per sub-word.
LAYERS = (-1, 3)
WINDOW = 254  # sub-words per forward pass, plus [CLS] and [SEP]: MiniLM is trained at 256 and below
# Sub-words encoded per text. Every sub-word covers at least one character, so this covers all of one of
# the engine's 2,000-character chunks (prose is about 500 sub-words, random bytes 1,500): no name goes
# unencoded, and time per chunk stays bounded. Longer texts (callers other than the engine) are cut here.
MAX_SUBWORDS = 8 * WINDOW


class TokenEncoder:
    """``vectors(text, spans)``: one vector per character span, the mean over its sub-words."""

    def __init__(self, model_dir: Path | None = None, threads: int = 0, cache_size: int = 0) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a chat adapter's terminal is not the place for one

            if model_dir is None:
                from retrieval.embedder import embedded_model_dir

                model_dir = embedded_model_dir()
            self._torch = torch
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        except Exception as err:  # noqa: BLE001 - whatever stops the model loading, names can't be found
            raise PrivacyError(f"the name encoder could not be loaded from {model_dir}: {err}") from err
        if threads:
            torch.set_num_threads(threads)
        self.width = self.model.config.hidden_size * len(LAYERS)
        self._cache: OrderedDict[str, tuple[list[tuple[int, int]], np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _states(self, text: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Sub-word character offsets and their hidden states (n_subwords x width)."""
        with self._lock:
            found = self._cache.get(text)
            if found is not None:
                return found
            # Under the lock: the fast tokenizer's settings change on its first call, which is not
            # thread-safe. Long text is run in windows below, so its length warning does not apply.
            encoded = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        ids: list[int] = encoded["input_ids"][:MAX_SUBWORDS]
        offsets = [tuple(o) for o in encoded["offset_mapping"][:MAX_SUBWORDS]]
        states = np.zeros((len(ids), self.width), dtype=np.float32)
        torch = self._torch
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        with self._lock, torch.inference_mode():
            for start in range(0, len(ids), WINDOW):
                window = [cls, *ids[start : start + WINDOW], sep]
                hidden = self.model(
                    input_ids=torch.tensor([window]), output_hidden_states=True
                ).hidden_states
                layers = torch.cat([hidden[k][0, 1:-1] for k in LAYERS], dim=-1)
                states[start : start + len(window) - 2] = layers.float().numpy()
        result = (offsets, states)  # type: ignore[assignment]
        if self._cache_size:  # training re-reads each row once per fold and threshold
            with self._lock:
                self._cache[text] = result  # type: ignore[assignment]
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result  # type: ignore[return-value]

    def vectors(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """One vector per span, and whether the span was encoded (see ``MAX_SUBWORDS``)."""
        out = np.zeros((len(spans), self.width), dtype=np.float32)
        covered = np.zeros(len(spans), dtype=bool)
        if not spans:
            return out, covered
        offsets, states = self._states(text)
        if not offsets:
            return out, covered
        # Sub-word offsets are in reading order: the ones inside [start, end) are a slice, found by bisection.
        starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
        for row, (start, end) in enumerate(spans):
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(starts, end, side="left"))
            if last > first:
                out[row] = states[first:last].mean(axis=0)
                covered[row] = end <= ends[-1]
        return out, covered


_shared: dict[Any, TokenEncoder] = {}
_shared_lock = threading.Lock()


def shared_encoder(model_dir: Path | None = None, threads: int = 0) -> TokenEncoder:
    """One encoder per process and model folder."""
    with _shared_lock:
        encoder = _shared.get((model_dir, threads))
        if encoder is None:
            encoder = _shared[(model_dir, threads)] = TokenEncoder(model_dir, threads)
        return encoder
