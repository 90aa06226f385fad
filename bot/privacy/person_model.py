"""A learned second opinion on people's names, for the names the hand-written rules in ``names.py`` miss.

The rules are precise but miss names with no list entry and no cue ("hang out with the rza", "cudi got a
problem"). The model is the embedded MiniLM (all-MiniLM-L6-v2) fine-tuned as a token classifier: every
sub-word gets the probability that it is part of a person's name (``encoder.py`` runs it). A frozen MiniLM
under a logistic regression (the previous design) learned the celebrities of WNUT-17 train well and
unseen names badly; fine-tuning the transformer layers on names swapped for random ones from the name
lists teaches the contexts names stand in instead. It runs only on tokens the rules left alone, so it can
only add names.

What ships (``person_model.safetensors``, about 21 MB): the six transformer layers and the one-unit head in
fp16. The word embeddings stay those of the embedded MiniLM (frozen in training, not shipped), so the file
holds a fingerprint of them and refuses to run on any other base model. Trained by
``python -m bot.privacy.train_names`` on WNUT-17 train (plus name-swapped copies and support-text
negatives) only; the threshold is chosen by cross-validation there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bot.privacy.gazetteer import Gazetteer
from core.errors import PrivacyError

MODEL_FILE = "person_model.safetensors"
FORMAT = "supportbot-person-tagger/1"
URLISH = re.compile(r"^(?:https?://|www\.)|\.(?:com|org|net|ly|co)\b", re.I)


def shape(word: str) -> str:
    """Coarse spelling class: "Xx" (Title), "x" (lower), "X" (CAPS), "Xx!" (mIxEd), "d" (has digits)."""
    if any(c.isdigit() for c in word):
        return "d"
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return "p"
    if all(c.islower() for c in letters):
        return "x"
    if all(c.isupper() for c in letters):
        return "X" if len(letters) > 1 else "Xx"
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return "Xx"
    return "Xx!"


def is_candidate(token: Any, word: str, word_ok: Callable[[str], bool]) -> bool:
    """Tokens the model may call a name: words, not handles, hashtags, links or allowed product terms."""
    if not word_ok(word) or len(word) < 2 or shape(word) == "X":
        return False  # all-caps words in mixed-case text are acronyms far more often than people (GPU, ROM)
    if token.i > 0 and token.doc[token.i - 1].text in {"@", "#"}:
        return False  # handles are masked by their own recognizer; hashtags are topics
    return not (token.like_url or token.like_email or URLISH.search(word))


@dataclass(frozen=True)
class PersonModel:
    """Fine-tuned tensors (name -> fp16 array, keys as in transformers' ``BertModel`` plus ``head.*``),
    the decision threshold on the name probability, and the fingerprint of the base model they fit."""

    tensors: dict[str, np.ndarray] = field(repr=False)
    threshold: float
    base: str
    info: dict[str, Any] = field(default_factory=dict)

    def candidates(
        self, tokens: list[Any], originals: list[str], marked: dict[int, Any], word_ok: Callable[[str], bool]
    ) -> list[int]:
        return [
            i
            for i, token in enumerate(tokens)
            if i not in marked and is_candidate(token, originals[i], word_ok)
        ]

    def marks(
        self,
        tokens: list[Any],
        originals: list[str],
        marked: dict[int, tuple[float, str]],
        gaz: Gazetteer,
        shouting: bool,
        candidates: list[int],
        vectors: np.ndarray,
    ) -> dict[int, tuple[float, str]]:
        """Candidate tokens whose name probability (``vectors[:, 0]``, from the encoder) reaches the threshold.

        The score handed on maps the threshold to 0.5 and certainty to 1.0: the threshold may lie below
        Presidio's score_threshold, which would otherwise drop the mark.
        """
        found = {}
        t = self.threshold
        for i, row in zip(candidates, vectors):
            p = float(row[0])
            if p >= t:
                found[i] = (round(0.5 + 0.5 * (p - t) / max(1e-6, 1.0 - t), 3), "model")
        return found

    def with_threshold(self, threshold: float) -> PersonModel:
        return PersonModel(self.tensors, threshold, self.base, self.info)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "threshold": repr(self.threshold), "base": self.base}
        meta["info"] = json.dumps(self.info, sort_keys=True)
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float16) for k, v in self.tensors.items()}, str(path), meta
        )


def _read(path: Path | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    if path is None:
        with resources.as_file(resources.files("bot.privacy").joinpath(MODEL_FILE)) as shipped:
            return _read(shipped)
    with safe_open(str(path), framework="numpy") as handle:
        meta = handle.metadata() or {}
        return {k: handle.get_tensor(k) for k in handle.keys()}, meta  # noqa: SIM118 - not iterable


@cache
def load_person_model(path: Path | None = None) -> PersonModel:
    """The shipped model, or one at ``path`` (a file written by ``train_names``)."""
    try:
        tensors, meta = _read(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
        if "head.weight" not in tensors:
            raise ValueError("the classifier head is missing")
        info = json.loads(meta.get("info") or "{}")
        return PersonModel(tensors, float(meta["threshold"]), meta["base"], info)
    except PrivacyError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: the name model cannot run
        raise PrivacyError(f"the name model could not be loaded from {path or MODEL_FILE}: {err}") from err
