"""Fine-tune the name tagger (``person_model.py``) on WNUT-17 train; pick its threshold by grouped CV.

    python -m bot.privacy.train_names ../shared/data/pii/wnut17/wnut17train.conll \\
        --negatives ../shared/data/tickets/dellqa_dev.jsonl --out bot/privacy/person_model.safetensors

(or in two processes: ``--cv-only --cv-out cv.json``, then ``--folds 0 --cv-from cv.json --out ...``;
or ``--relabel bot/privacy/person_model.safetensors --cv-from cv.json`` to write a CV's threshold into
the model already trained with the same recipe, without training it again).

What it learns from:
- every WNUT-17 train row (person spans as labels on every sub-word they cover);
- ``--copies`` copies of each row with names, the names swapped for random ones from one half of the
  name lists, often lower-cased (``swap_names``): context and chat spelling rather than celebrities;
- ``--negatives``: JSONL of real support text, every sub-word "not a name", so IT words stay unmasked;
  only its even rows are read, the odd ones are left for ``supportbot eval privacy``.
The evaluation sets (WNUT dev, the synthetic set, MaintNet) are never read.

Only MiniLM's top ``6 - FROZEN_LAYERS`` layers and a one-unit head are trained; the frozen part runs once
per row (``LowerStates``), which keeps a run within minutes on 2 CPU cores.

Cross-validation (``--folds``, grouped by source row: a row and its copies share a fold) trains one model
per fold and scores the held-out rows with the rules and the model together, at every threshold of
``THRESHOLDS``: recall on the held-out WNUT rows, recall on "probe" copies of them whose names come from
the other half of the name lists (names no training row holds, like the novel names of the test split),
and the share of held-out support rows with any name mask. The threshold shipped is the lowest whose share
of masked support rows stays within ``--max-extra-masked`` of the rules' own share. The shipped model is
then trained on everything.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.privacy import structured
from bot.privacy.config import PrivacyConfig
from bot.privacy.engine import DetectionEngine, chunks
from bot.privacy.evaluate import read_conll
from bot.privacy.gazetteer import Gazetteer
from bot.privacy.names import NameFinder, is_all_caps, truecase
from bot.privacy.person_model import PersonModel

NAME_LIKE_MAX_ZIPF = 3.5
SWAP_LOWER_SHARE = 0.35  # chat writes names in lower case about this often in WNUT-17 train
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FROZEN_LAYERS = 4  # of MiniLM's 6 transformer layers, the lowest stay frozen (see fine_tune)
MAX_SUBWORDS = 254  # per training row: WNUT rows are far shorter, support chunks (400 chars) too


@dataclass
class Sentence:
    text: str
    gold: list[tuple[int, int]]
    doc: Any = None
    negative: bool = False
    group: int = 0  # the source row: a row and its name-swapped copies stay in one fold
    copy: bool = False  # trains, never scored
    probe: bool = False  # scored, never trains: names from the half of the lists no copy draws from


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


def name_lists(gazetteer: Gazetteer, half: int | None = None) -> tuple[list[str], list[str]]:
    """First and last names that are not also common words ("will", "kit"): a swapped-in name reads as one.
    ``half`` 0 or 1: a fixed half of each list (by hash), so that probes hold names training never saw."""

    def name_like(names: frozenset[str]) -> list[str]:
        return sorted(
            n
            for n in names
            if gazetteer.zipf(n) < NAME_LIKE_MAX_ZIPF
            and n.isalpha()
            and (half is None or zlib.crc32(n.lower().encode()) % 2 == half)
        )

    return name_like(gazetteer.first_names), name_like(gazetteer.last_names)


def load_sentences(
    engine: DetectionEngine, conll: Path, negatives: Path | None, copies: int = 0
) -> list[Sentence]:
    """Training rows, copies, probes and negatives; spaCy docs (on truecased text) for the scored ones."""
    nlp = engine.nlp_engine.nlp["en"]
    rng = random.Random(0)
    train_names, probe_names = name_lists(engine.gazetteer, 0), name_lists(engine.gazetteer, 1)
    rows = []
    for group, (text, gold) in enumerate(read_conll(conll)):
        rows.append(Sentence(text, gold, group=group))
        if gold and not is_all_caps(text):
            for _ in range(copies):
                swapped, spans = swap_names(text, gold, train_names, rng)
                rows.append(Sentence(swapped, spans, group=group, copy=True))
            swapped, spans = swap_names(text, gold, probe_names, rng)
            rows.append(Sentence(swapped, spans, group=group, probe=True))
    if negatives is not None:
        for number, line in enumerate(negatives.read_text(encoding="utf-8").splitlines()):
            if number % 2:
                continue  # odd rows are left for `supportbot eval privacy` (over-masking of support text)
            row = json.loads(line)
            text = " ".join(str(row.get(k) or "") for k in ("question", "title", "work_performed"))
            group = len(rows) + 1_000_000
            rows += [
                Sentence(piece, [], negative=True, group=group)
                for _, piece in chunks(" ".join(text.split()), 400)
            ]
    scored = [row for row in rows if not row.copy]
    docs = nlp.pipe((truecase(row.text, engine.gazetteer) for row in scored), batch_size=64)
    for row, doc in zip(scored, docs):
        row.doc = doc
    return rows


def encode(tokenizer: Any, sentence: Sentence) -> tuple[list[int], list[float]]:
    """Sub-word ids and labels: 1 for every sub-word inside a labelled name."""
    encoded = tokenizer(sentence.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = encoded["input_ids"][:MAX_SUBWORDS]
    labels = [
        float(any(s < gold_end and gold_start < e for gold_start, gold_end in sentence.gold))
        for s, e in encoded["offset_mapping"][:MAX_SUBWORDS]
    ]
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id], [0.0, *labels, 0.0]


class LowerStates:
    """The frozen part of MiniLM (embeddings and the lowest ``FROZEN_LAYERS`` layers) run once per row.

    Its output never changes in training, so every fold and epoch reuses it and only the upper layers run
    forward and backward: about half the work per step (the CPU is shared)."""

    def __init__(self, rows: list[Sentence]) -> None:
        import torch

        from bot.privacy.encoder import load_base

        self.tokenizer, self.bert = load_base()
        self.bert.eval()
        self.data: dict[int, tuple[Any, list[float]]] = {}
        encoded = {id(row): encode(self.tokenizer, row) for row in rows if not row.probe}
        order = sorted(encoded, key=lambda key: len(encoded[key][0]))
        with torch.inference_mode():
            for k in range(0, len(order), 64):
                keys = order[k : k + 64]
                ids, mask = pad([encoded[key][0] for key in keys])
                hidden = self.bert.embeddings(input_ids=ids)
                for layer in self.bert.encoder.layer[:FROZEN_LAYERS]:
                    hidden = layer(hidden, attention_mask(self.bert, hidden, mask))
                for row, key in enumerate(keys):
                    n = len(encoded[key][0])
                    self.data[key] = (hidden[row, :n].to(torch.float16).clone(), encoded[key][1])


def pad(rows: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def attention_mask(bert: Any, hidden: Any, mask: Any) -> Any:
    """The mask in the form the installed transformers' BERT layers take (as ``BertModel`` builds it)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)


def fine_tune(
    rows: list[Sentence],
    lower: LowerStates,
    *,
    epochs: float,
    lr: float,
    batch_size: int = 32,
    pos_weight: float = 2.0,
    seed: int = 0,
    max_steps: int = 0,
    log: bool = True,
) -> PersonModel:
    """Fine-tune MiniLM's upper transformer layers and a head on ``rows``; threshold 0.5.

    The embeddings and the lower layers stay frozen: unseen names keep their pretrained word vectors
    (less to overfit to WNUT's celebrities), each step costs less, and neither is shipped."""
    import copy

    import torch

    from bot.privacy.encoder import TokenTagger, fingerprint

    torch.manual_seed(seed)
    bert = copy.deepcopy(lower.bert)
    tagger = TokenTagger(bert)
    upper = bert.encoder.layer[FROZEN_LAYERS:]
    for parameter in bert.parameters():
        parameter.requires_grad_(False)
    trained = [p for p in upper.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    data = [lower.data[id(row)] for row in rows if not row.probe]
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, int(steps_per_epoch * epochs))
    if max_steps:
        total = min(total, max_steps)
    optimizer = torch.optim.AdamW(
        [{"params": trained, "lr": lr}, {"params": tagger.head.parameters(), "lr": lr * 10}],
        weight_decay=0.01,
    )
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight), reduction="none")
    upper.train()
    step, started = 0, time.time()
    while step < total:
        # Batches of similar length (less padding), in random order.
        order = list(range(len(data)))
        rng.shuffle(order)
        pool_size = batch_size * 20
        pools = [
            sorted(order[k : k + pool_size], key=lambda i: len(data[i][1]))
            for k in range(0, len(order), pool_size)
        ]
        batches = [pool[k : k + batch_size] for pool in pools for k in range(0, len(pool), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            if step >= total:
                break
            width = max(len(data[i][1]) for i in batch)
            hidden = torch.zeros((len(batch), width, bert.config.hidden_size))
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.zeros((len(batch), width))
            for row, i in enumerate(batch):
                n = len(data[i][1])
                hidden[row, :n] = data[i][0].float()
                mask[row, :n] = 1
                labels[row, :n] = torch.tensor(data[i][1])
            extended = attention_mask(bert, hidden, mask)
            for layer in upper:
                hidden = layer(hidden, extended)
            logits = tagger.head(hidden)[..., 0]
            weights = mask.float()
            weights[:, 0] = 0.0  # [CLS]
            loss = (loss_fn(logits, labels) * weights).sum() / weights.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if log and (step % 25 == 0 or step == total):
                print(
                    f"  step {step}/{total} loss {loss.item():.4f} {time.time() - started:.0f}s",
                    file=sys.stderr,
                )
    bert.eval()
    info = {"rows": len(data), "steps": total, "epochs": epochs, "lr": lr, "pos_weight": pos_weight}
    info["frozen_layers"] = FROZEN_LAYERS
    return PersonModel(tagger.trained_tensors(skip_layers=FROZEN_LAYERS), 0.5, fingerprint(bert), info)


def score(
    finder: NameFinder, sentences: list[Sentence], masks: list[list[tuple[int, int]]] | None = None
) -> dict[str, float]:
    """Covered recall of gold names (handles count: the handle recognizer masks them), on WNUT rows and on
    probes, and the share of negative rows (support text) with any name mask. ``masks`` collects each
    row's name spans (to compare two inference paths)."""
    counts = {"recall": [0, 0], "probe_recall": [0, 0], "negative_rows_masked": [0, 0]}
    for sentence in sentences:
        spans = [(s.start, s.end) for s in finder.find(sentence.doc, sentence.text)]
        if masks is not None:
            masks.append(spans)
        spans += [m.span(1) for m in structured.HANDLE.finditer(sentence.text)]
        masked = {i for s, e in spans for i in range(s, e)}
        key = "probe_recall" if sentence.probe else "recall"
        for s, e in sentence.gold:
            counts[key][1] += 1
            counts[key][0] += all(i in masked for i in range(s, e) if not sentence.text[i].isspace())
        if sentence.negative:
            counts["negative_rows_masked"][1] += 1
            counts["negative_rows_masked"][0] += bool(spans)
    return {k: hit / n if n else 0.0 for k, (hit, n) in counts.items()}


def folds_of(sentences: list[Sentence], folds: int) -> dict[int, int]:
    groups = sorted({s.group for s in sentences})
    random.Random(0).shuffle(groups)
    return {group: k % folds for k, group in enumerate(groups)}


def cross_validate(
    engine: DetectionEngine,
    sentences: list[Sentence],
    lower: LowerStates,
    folds: int,
    train_args: dict[str, Any],
    int8: bool = True,
    compare_fp32: bool = False,
) -> tuple[dict[str, float], dict[float, dict[str, float]], dict[str, Any]]:
    """Rules alone and rules + model per threshold, pooled over folds (one model per fold).

    ``int8``: each fold's model is scored the way it ships (``encoder.quantize``), so the threshold
    fits the probabilities the shipped path computes. ``compare_fp32`` (with ``int8``): the same fold
    models are also scored in fp32, and the third value holds that curve and, per threshold, the share
    of held-out rows whose name masks are identical in both (what int8 changes, on training data only)."""
    from bot.privacy.encoder import TokenEncoder

    fold_of = folds_of(sentences, folds)
    tested_rows = [s for s in sentences if not s.copy]
    rules = NameFinder(engine.gazetteer, engine.config.allow_terms)
    alone = score(rules, tested_rows)
    compare = compare_fp32 and int8
    hits: dict[float, list[tuple[dict[str, float], int]]] = {t: [] for t in THRESHOLDS}
    hits32: dict[float, list[tuple[dict[str, float], int]]] = {t: [] for t in THRESHOLDS}
    same: dict[float, list[int]] = {t: [0, 0] for t in THRESHOLDS}
    for fold in range(folds):
        started = time.time()
        model = fine_tune([s for s in sentences if fold_of[s.group] != fold], lower, **train_args)
        encoder = TokenEncoder(model, cache_size=100_000, int8=int8)
        encoder32 = TokenEncoder(model, cache_size=100_000) if compare else None
        test = [s for s in tested_rows if fold_of[s.group] == fold]
        for t in THRESHOLDS:
            allow = engine.config.allow_terms
            masks: list[list[tuple[int, int]]] = []
            finder = NameFinder(engine.gazetteer, allow, model.with_threshold(t), encoder)
            hits[t].append((score(finder, test, masks), len(test)))
            if encoder32 is not None:
                masks32: list[list[tuple[int, int]]] = []
                finder32 = NameFinder(engine.gazetteer, allow, model.with_threshold(t), encoder32)
                hits32[t].append((score(finder32, test, masks32), len(test)))
                same[t][0] += sum(a == b for a, b in zip(masks, masks32))
                same[t][1] += len(test)
        row = hits[0.5][-1][0]
        print(f"fold {fold}: {time.time() - started:.0f}s, at 0.5: {row}", file=sys.stderr)

    # Folds are near equal in size: the mean over folds stands for the pooled share.
    def pooled(table: dict[float, list[tuple[dict[str, float], int]]]) -> dict[float, dict[str, float]]:
        return {
            t: {k: sum(r[k] for r, _ in rows) / len(rows) for k in rows[0][0]} for t, rows in table.items()
        }

    extra: dict[str, Any] = {}
    if compare:
        extra["fp32_curve"] = pooled(hits32)
        extra["rows_with_same_masks"] = {t: n / max(1, total) for t, (n, total) in same.items()}
    return alone, pooled(hits), extra


def relabel(model_path: Path, cv_path: Path | None, out: Path, parser: argparse.ArgumentParser) -> int:
    """The threshold a CV run chose, written into an already trained model (same recipe, no retraining)."""
    from bot.privacy.person_model import load_person_model

    if cv_path is None:
        parser.error("--relabel needs --cv-from")
    cv = json.loads(cv_path.read_text(encoding="utf-8"))
    model = load_person_model(model_path)
    summary = {k: v for k, v in cv.items() if not k.endswith("curve")}
    info = {k: v for k, v in model.info.items() if k != "threshold_note"}
    PersonModel(model.tensors, float(cv["threshold"]), model.base, {**info, "cv": summary}).save(out)
    print(f"threshold {cv['threshold']} written into {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("conll", type=Path, help="WNUT-17 train (CoNLL: token<TAB>label)")
    parser.add_argument("--negatives", type=Path, default=None, help="JSONL of support text without names")
    parser.add_argument("--out", type=Path, default=None, help="where to write the model (.safetensors)")
    parser.add_argument("--folds", type=int, default=2, help="grouped CV folds; 0: no CV, use --threshold")
    parser.add_argument("--threshold", type=float, default=None, help="ship this threshold instead of CV's")
    parser.add_argument("--copies", type=int, default=3, help="name-swapped copies of each row with names")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of the transformer layers")
    parser.add_argument("--pos-weight", type=float, default=2.0, help="loss weight of name sub-words")
    parser.add_argument(
        "--max-steps", type=int, default=0, help="stop each training run after this many steps"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="score the CV folds in fp32 (default: int8, as privacy_name_model_int8 ships)",
    )
    parser.add_argument(
        "--compare-fp32",
        action="store_true",
        help="also score the CV folds in fp32 and report how many held-out rows int8 masks differently",
    )
    parser.add_argument(
        "--cv-only", action="store_true", help="print the CV curve and threshold, train nothing else"
    )
    parser.add_argument(
        "--cv-out", type=Path, default=None, help="write the CV summary (threshold, curve) as JSON"
    )
    parser.add_argument(
        "--cv-from",
        type=Path,
        default=None,
        help="take threshold and CV summary from a --cv-out file (no CV here)",
    )
    parser.add_argument(
        "--relabel",
        type=Path,
        default=None,
        help="write the threshold and CV summary of --cv-from into this trained model file (to --out, "
        "default the same file) without training: the CV recipe is the one the model was trained with",
    )
    parser.add_argument(
        "--max-extra-masked",
        type=float,
        default=0.02,
        help="share of support-text rows the model may newly mask (cross-validated) when picking the threshold",
    )
    args = parser.parse_args(argv)
    if args.relabel is not None:
        return relabel(args.relabel, args.cv_from, args.out or args.relabel, parser)

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    engine = DetectionEngine(PrivacyConfig(name_model=False))
    sentences = load_sentences(engine, args.conll, args.negatives, args.copies)
    kinds = {k: sum(getattr(s, k) for s in sentences) for k in ("copy", "probe", "negative")}
    print(f"{len(sentences)} rows ({kinds})", file=sys.stderr)
    train_args = {
        "epochs": args.epochs,
        "lr": args.lr,
        "pos_weight": args.pos_weight,
        "max_steps": args.max_steps,
    }
    lower = LowerStates(sentences)
    print(f"frozen layers run: {time.time() - started:.0f}s", file=sys.stderr)
    threshold = args.threshold
    cv: dict[str, Any] = {}
    if args.folds >= 2:
        alone, curve, extra = cross_validate(
            engine,
            sentences,
            lower,
            args.folds,
            train_args,
            int8=not args.fp32,
            compare_fp32=args.compare_fp32,
        )
        print(f"CV, rules alone: {alone}", file=sys.stderr)
        for t, row in curve.items():
            print(f"CV, threshold {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), file=sys.stderr)
        budget = alone["negative_rows_masked"] + args.max_extra_masked
        within = [t for t, row in curve.items() if row["negative_rows_masked"] <= budget]
        chosen = min(within) if within else max(THRESHOLDS)
        cv = {"folds": args.folds, "rules_alone": alone, "at_threshold": curve[chosen], "threshold": chosen}
        cv["scored_in"] = "fp32" if args.fp32 else "int8"
        cv["rule"] = f"lowest threshold whose support rows masked <= rules alone + {args.max_extra_masked}"
        cv["curve"] = {str(t): row for t, row in curve.items()}
        if extra:
            cv["fp32_at_threshold"] = extra["fp32_curve"][chosen]
            cv["rows_with_same_masks_int8_fp32"] = extra["rows_with_same_masks"][chosen]
            cv["fp32_curve"] = {str(t): row for t, row in extra["fp32_curve"].items()}
            cv["rows_with_same_masks_curve"] = {str(t): v for t, v in extra["rows_with_same_masks"].items()}
            print(
                f"CV, int8 against fp32 at {chosen}: {extra['fp32_curve'][chosen]}, rows with the same "
                f"masks {extra['rows_with_same_masks'][chosen]:.4f}",
                file=sys.stderr,
            )
        threshold = chosen if threshold is None else threshold
        if args.cv_out is not None:
            args.cv_out.write_text(json.dumps(cv, indent=1) + "\n", encoding="utf-8")
    elif args.cv_from is not None:
        cv = json.loads(args.cv_from.read_text(encoding="utf-8"))
        threshold = float(cv["threshold"]) if threshold is None else threshold
    if args.cv_only:
        print(f"threshold {threshold}; {time.time() - started:.0f}s in all", file=sys.stderr)
        return 0
    if threshold is None:
        parser.error("without cross-validation (--folds 0), give --threshold or --cv-from")
    model = fine_tune(sentences, lower, **train_args)
    summary = {k: v for k, v in cv.items() if not k.endswith("curve")}
    model = PersonModel(model.tensors, threshold, model.base, {**model.info, "cv": summary})
    print(f"threshold {threshold}; {time.time() - started:.0f}s in all", file=sys.stderr)
    if args.out is not None:
        model.save(args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
