"""A learned second opinion on people's names, for the names the hand-written rules in ``names.py`` miss.

The rules are precise but miss names with no list entry and no cue ("hang out with the Rza", "Cudi got a
problem"). This is a logistic regression over the features of one token and its neighbours (spelling and
shape, name lists and word frequency, spaCy's tags on the truecased text, what the rules said) and over
MiniLM's contextual vector of the token (``encoder.py``). It runs only on tokens the rules left alone, so
it can only add names.

The weights ship as ``person_model.json`` (feature -> weight, a few hundred kB), trained by
``python -m bot.privacy.train_names`` on the WNUT-17 train split only; the dev split stays for evaluation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bot.privacy.gazetteer import Gazetteer
from core.errors import PrivacyError

MODEL_FILE = "person_model.json"
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


def _word_features(prefix: str, token: Any, word: str, gaz: Gazetteer, shouting: bool) -> list[str]:
    lower = word.lower()
    zipf = gaz.zipf(word)
    spelled = "X!" if shouting else shape(word)
    return [
        f"{prefix}w={lower}",
        f"{prefix}shape={spelled}",
        f"{prefix}zipf={min(int(zipf), 7)}",
        f"{prefix}zipf×shape={min(int(zipf), 7)}{spelled}",
        f"{prefix}first={gaz.is_first_name(word)}{gaz.is_census_first_name(word)}",
        f"{prefix}last={gaz.is_last_name(word)}",
        f"{prefix}pos={token.pos_}",
        f"{prefix}ent={token.ent_type_ or 'O'}",
        f"{prefix}stop={token.is_stop}",
    ]


def token_features(
    tokens: list[Any],
    originals: list[str],
    i: int,
    marked: dict[int, tuple[float, str]],
    gaz: Gazetteer,
    shouting: bool,
) -> list[str]:
    """Feature names of token ``i``: its own word features, its neighbours' and the rules' verdicts."""
    token, word = tokens[i], originals[i]
    lower = word.lower()
    zipf = gaz.zipf(word)
    spelled = shape(word)
    names = gaz.is_first_name(word) or gaz.is_last_name(word)
    feats = ["bias", f"len={min(len(word), 8)}", f"shout={shouting}"]
    # Spelling of names ("-mba", "-son", "Mc-") generalises to names no list holds.
    feats += [f"suffix{n}={lower[-n:]}" for n in (2, 3, 4) if len(lower) > n]
    feats += [f"prefix3={lower[:3]}"] if len(lower) > 3 else []
    feats += [f for f in _word_features("", token, word, gaz, shouting) if not f.startswith("w=")]
    feats += [
        f"tag={token.tag_}",
        f"ent×shape={token.ent_type_ or 'O'}{spelled}",
        f"names×shape×zipf={names}{spelled}{min(int(zipf), 7)}",
        f"sent_start={bool(token.is_sent_start)}",
    ]
    # Neighbours skip spaCy's whitespace tokens ("\n"): the training rows are single lines.
    before = [j for j in range(i - 1, -1, -1) if not tokens[j].is_space][:2]
    after = [j for j in range(i + 1, len(tokens)) if not tokens[j].is_space][:2]
    neighbours = {-1: before[:1], -2: before[1:2], 1: after[:1], 2: after[1:2]}
    for offset, prefix in ((-2, "p2"), (-1, "p1"), (1, "n1"), (2, "n2")):
        if not neighbours[offset]:
            feats.append(f"{prefix}=edge")
            continue
        j = neighbours[offset][0]
        if abs(offset) == 1:
            feats += _word_features(prefix, tokens[j], originals[j], gaz, shouting)
            feats.append(f"{prefix}rule={marked[j][1] if j in marked else '-'}")
        else:
            feats.append(f"{prefix}w={originals[j].lower()}")
    return feats


@dataclass(frozen=True)
class PersonModel:
    weights: dict[str, float]
    bias: float
    threshold: float
    dense: tuple[float, ...] = ()

    @cached_property
    def _dense_array(self) -> np.ndarray:
        return np.asarray(self.dense, dtype=np.float32)

    def probability(self, features: list[str], dense: np.ndarray | None = None) -> float:
        weights = self.weights
        z = self.bias + sum(weights.get(f, 0.0) for f in features)
        if self.dense and dense is not None and len(dense) == len(self.dense):
            z += float(np.dot(self._dense_array, dense))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def candidates(
        self, tokens: list[Any], originals: list[str], marked: dict[int, Any], word_ok: Callable[[str], bool]
    ) -> list[int]:
        return [
            i for i, token in enumerate(tokens) if i not in marked and is_candidate(token, originals[i], word_ok)
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
        """Candidate tokens the model calls names, with its probability as the score."""
        found = {}
        for i, vector in zip(candidates, vectors):
            p = self.probability(token_features(tokens, originals, i, marked, gaz, shouting), vector)
            if p >= self.threshold:
                found[i] = (round(p, 3), "model")
        return found

    def to_json(self) -> dict[str, Any]:
        return {"bias": self.bias, "threshold": self.threshold, "weights": self.weights, "dense": list(self.dense)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PersonModel:
        dense = tuple(float(w) for w in data.get("dense", ()))
        return cls(dict(data["weights"]), float(data["bias"]), float(data["threshold"]), dense)


@cache
def load_person_model(path: Path | None = None) -> PersonModel:
    """The shipped model, or one at ``path``."""
    try:
        if path is None:
            text = resources.files("bot.privacy").joinpath(MODEL_FILE).read_text(encoding="utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        return PersonModel.from_json(json.loads(text))
    except (OSError, ValueError, KeyError) as err:
        raise PrivacyError(f"the name model could not be loaded: {err}") from err
