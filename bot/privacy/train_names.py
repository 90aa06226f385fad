"""Train the name model (``person_model.py``) on WNUT-17 train, with cross-validated recall and masks.

    python -m bot.privacy.train_names ../shared/data/pii/wnut17/wnut17train.conll \\
        --negatives ../shared/data/tickets/dellqa_dev.jsonl --out bot/privacy/person_model.json

Takes about 4 minutes on 2 CPU cores. Every WNUT row with names also goes in ``--copies`` times with its
names swapped for random ones from the name lists (see ``swap_names``). ``--negatives``: JSONL of real
support text, every token taught as "not a name", so technical words stay unmasked; only its even rows
are read, the odd ones are left for ``supportbot eval privacy``. The evaluation sets (WNUT dev, the
synthetic set, MaintNet) are never read. The threshold is the lowest whose cross-validated share of
masked support rows stays within ``--max-extra-masked`` of the rules' own share.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot.privacy import structured
from bot.privacy.config import PrivacyConfig
from bot.privacy.engine import DetectionEngine, chunks
from bot.privacy.evaluate import read_conll
from bot.privacy.gazetteer import Gazetteer
from bot.privacy.names import NameFinder, is_all_caps, truecase
from bot.privacy.person_model import PersonModel, is_candidate, token_features

NAME_LIKE_MAX_ZIPF = 3.5
SWAP_LOWER_SHARE = 0.35  # chat writes names in lower case about this often in WNUT-17 train


@dataclass
class Sentence:
    text: str
    gold: list[tuple[int, int]]
    doc: Any
    negative: bool = False
    group: int = 0  # the source row: a row and its name-swapped copies stay in one fold
    copy: bool = False


def swap_names(
    text: str, gold: list[tuple[int, int]], names: tuple[list[str], list[str]], rng: random.Random
) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with every labelled name replaced by a random one from the name lists, sometimes lower-cased.

    WNUT-17's 660 names are mostly celebrities; swapping them teaches the context a name stands in
    ("hang out with X", "X is so funny") and lower-case chat spelling rather than the celebrities.
    """
    firsts, lasts = names
    pieces, spans, cursor = [], [], 0
    for start, end in sorted(gold):
        roll = rng.random()
        if roll < 0.4:
            name = rng.choice(firsts)
        elif roll < 0.7:
            name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        else:
            name = rng.choice(lasts)
        name = name.lower() if rng.random() < SWAP_LOWER_SHARE else name.title()
        pieces.append(text[cursor:start])
        begin = sum(len(piece) for piece in pieces)
        pieces.append(name)
        spans.append((begin, begin + len(name)))
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces), spans


def name_lists(gazetteer: Gazetteer) -> tuple[list[str], list[str]]:
    """First and last names that are not also common words ("will", "kit"): a swapped-in name reads as one."""

    def name_like(names: frozenset[str]) -> list[str]:
        return sorted(n for n in names if gazetteer.zipf(n) < NAME_LIKE_MAX_ZIPF and n.isalpha())

    return name_like(gazetteer.first_names), name_like(gazetteer.last_names)


def load_sentences(
    engine: DetectionEngine, conll: Path, negatives: Path | None, copies: int = 0
) -> list[Sentence]:
    nlp = engine.nlp_engine.nlp["en"]
    rng = random.Random(0)
    names = name_lists(engine.gazetteer)
    rows = []
    for group, (text, gold) in enumerate(read_conll(conll)):
        rows.append(Sentence(text, gold, None, group=group))
        if gold and not is_all_caps(text):
            for _ in range(copies):
                swapped, spans = swap_names(text, gold, names, rng)
                rows.append(Sentence(swapped, spans, None, group=group, copy=True))
    if negatives is not None:
        for number, line in enumerate(negatives.read_text(encoding="utf-8").splitlines()):
            if number % 2:
                continue  # odd rows are left for `supportbot eval privacy` (over-masking of support text)
            row = json.loads(line)
            text = " ".join(str(row.get(k) or "") for k in ("question", "title", "work_performed"))
            group = len(rows)
            rows += [
                Sentence(piece, [], None, negative=True, group=group)
                for _, piece in chunks(" ".join(text.split()), 400)
            ]
    docs = nlp.pipe((truecase(row.text, engine.gazetteer) for row in rows), batch_size=64)
    for row, doc in zip(rows, docs):
        row.doc = doc
    return rows


Example = tuple[list[str], Any, int]


def examples(finder: NameFinder, sentence: Sentence) -> list[Example]:
    """(features, MiniLM vector, is-a-name) for every candidate token of a row."""
    text, doc = sentence.text, sentence.doc
    shouting = is_all_caps(text)
    if shouting or finder.encoder is None:
        return []  # the model does not run on all-caps text (see NameFinder.find)
    tokens = list(doc)
    originals = [text[t.idx : t.idx + len(t.text)] for t in tokens]
    marked = finder.rule_marks(doc, originals, text, shouting)
    finder._extend(tokens, originals, shouting, marked)
    # Tokens the rules marked teach too: what a name looks like is the same, and the rules' few hundred
    # misses alone are too few examples. At run time the model only sees the unmarked ones.
    chosen = [i for i, t in enumerate(tokens) if is_candidate(t, originals[i], finder._word_ok)]
    spans = [(tokens[i].idx, tokens[i].idx + len(tokens[i].text)) for i in chosen]
    vectors, covered = finder.encoder.vectors(text, spans)
    rows: list[Example] = []
    for i, (start, end), vector, ok in zip(chosen, spans, vectors, covered):
        if not ok:
            continue
        label = int(any(start < e and s < end for s, e in sentence.gold))
        rows.append((token_features(tokens, originals, i, marked, finder.gazetteer, shouting), vector, label))
    return rows


def fit(rows: list[Example], c: float) -> PersonModel:
    import numpy as np
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = DictVectorizer()
    sparse = vectorizer.fit_transform([dict.fromkeys(features, 1) for features, _, _ in rows])
    x = hstack([sparse, csr_matrix(np.stack([vector for _, vector, _ in rows]))]).tocsr()
    y = [label for _, _, label in rows]
    # Balanced: names are 2% of the tokens, and a missed name costs more than a masked word.
    classifier = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
    classifier.fit(x, y)
    names = vectorizer.get_feature_names_out()
    coef = classifier.coef_[0]
    weights = {name: round(float(w), 4) for name, w in zip(names, coef[: len(names)]) if abs(w) >= 1e-3}
    dense = tuple(round(float(w), 5) for w in coef[len(names) :])
    return PersonModel(weights, round(float(classifier.intercept_[0]), 4), 0.5, dense)


def score(finder: NameFinder, sentences: list[Sentence]) -> dict[str, float]:
    """Covered recall of gold names (handles count: the handle recognizer masks them), and the share of
    negative rows (support text) with any name mask."""
    total = caught = negative_rows_masked = negatives = 0
    for sentence in sentences:
        spans = [(s.start, s.end) for s in finder.find(sentence.doc, sentence.text)]
        spans += [m.span(1) for m in structured.HANDLE.finditer(sentence.text)]
        masked = {i for s, e in spans for i in range(s, e)}
        for s, e in sentence.gold:
            total += 1
            caught += all(i in masked for i in range(s, e) if not sentence.text[i].isspace())
        if sentence.negative:
            negatives += 1
            negative_rows_masked += bool(spans)
    return {
        "recall": caught / total if total else 0.0,
        "negative_rows_masked": negative_rows_masked / negatives if negatives else 0.0,
    }


def cross_validate(
    finder: NameFinder, sentences: list[Sentence], c: float, thresholds: list[float], folds: int
) -> dict[float, dict[str, float]]:
    """Folds by source row (a row and its name-swapped copies together); copies are never tested."""
    groups = sorted({s.group for s in sentences})
    random.Random(0).shuffle(groups)
    fold_of = {group: k % folds for k, group in enumerate(groups)}
    results: dict[float, list[dict[str, float]]] = {t: [] for t in thresholds}
    for fold in range(folds):
        train = [row for s in sentences if fold_of[s.group] != fold for row in examples(finder, s)]
        model = fit(train, c)
        test = [s for s in sentences if fold_of[s.group] == fold and not s.copy]
        for t in thresholds:
            tested = NameFinder(finder.gazetteer, finder.allow_terms, replace(model, threshold=t), finder.encoder)
            results[t].append(score(tested, test))
    return {t: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for t, rows in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("conll", type=Path, help="WNUT-17 train (CoNLL: token<TAB>label)")
    parser.add_argument("--negatives", type=Path, default=None, help="JSONL of support text without names")
    parser.add_argument("--out", type=Path, default=None, help="where to write the model JSON")
    parser.add_argument("--c", type=float, default=0.3, help="inverse L2 strength")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=3, help="name-swapped copies of each row with names")
    parser.add_argument(
        "--max-extra-masked",
        type=float,
        default=0.02,
        help="share of support-text rows the model may newly mask (cross-validated) when picking the threshold",
    )
    args = parser.parse_args(argv)

    from bot.privacy.encoder import TokenEncoder

    engine = DetectionEngine(PrivacyConfig(name_model=False))
    sentences = load_sentences(engine, args.conll, args.negatives, args.copies)
    rules = NameFinder(engine.gazetteer, engine.config.allow_terms)
    originals = [s for s in sentences if not s.copy]
    alone = score(rules, originals)
    print(f"{len(sentences)} rows; rules alone: {alone}", file=sys.stderr)
    encoder = TokenEncoder(cache_size=len(sentences))
    finder = NameFinder(engine.gazetteer, engine.config.allow_terms, None, encoder)
    # Not below the engine's score_threshold: Presidio drops lower scores, so recall there is not real.
    thresholds = [t for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if t >= engine.config.score_threshold]
    curve = cross_validate(finder, sentences, args.c, thresholds, args.folds)
    for t, row in curve.items():
        print(f"threshold {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), file=sys.stderr)
    budget = alone["negative_rows_masked"] + args.max_extra_masked
    within = [t for t, row in curve.items() if row["negative_rows_masked"] <= budget]
    threshold = min(within) if within else max(thresholds)
    model = replace(fit([row for s in sentences for row in examples(finder, s)], args.c), threshold=threshold)
    print(f"threshold {threshold}, {len(model.weights)} weights", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(model.to_json(), sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
