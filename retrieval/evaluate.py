"""Retrieval evaluation: recall@k and MRR of the full hybrid search, on a temporary store.

``recall@k`` here is the share of queries with at least one relevant ticket in the top k (with one
relevant ticket per query, as in most sets, this is plain recall@k). ``mrr`` uses the first
relevant ticket's rank, counted up to rank ``k`` (0 beyond).

``crossval`` measures what ``retrieval tune`` buys on question -> answer pairs without ever
testing on a pair it trained on: k folds, each tuned on the other folds.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from core.db import Database, upgrade
from core.errors import InputError
from core.settings import Settings
from retrieval.embedder import resolve_model_dir


def read_queries(path: Path) -> list[tuple[str, set[str]]]:
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    queries: list[tuple[str, set[str]]] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, relevant = row["query"], row["relevant"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(f"{path}:{line_no}: expected {{\"query\": ..., \"relevant\": [...]}} ({err})") from err
            if isinstance(relevant, str):
                relevant = [relevant]
            if not isinstance(query, str) or not query.strip() or not relevant:
                raise InputError(f"{path}:{line_no}: empty query or no relevant ticket ids")
            queries.append((query, {str(r) for r in relevant}))
    if not queries:
        raise InputError(f"{path} holds no queries")
    return queries


def score_rankings(rankings: list[list[str]], relevant: list[set[str]], k: int) -> dict[str, float]:
    cutoffs = sorted({1, 5, 10, k})
    hits = {c: 0 for c in cutoffs}
    reciprocal = 0.0
    for ranked, wanted in zip(rankings, relevant, strict=True):
        first = next((i for i, tid in enumerate(ranked[:k]) if tid in wanted), None)
        if first is None:
            continue
        reciprocal += 1.0 / (first + 1)
        for c in cutoffs:
            hits[c] += first < c
    n = len(rankings)
    scores: dict[str, float] = {f"recall@{c}": round(hits[c] / n, 4) for c in cutoffs}
    scores["mrr"] = round(reciprocal / n, 4)
    scores["n"] = n
    return scores


@contextmanager
def temporary_store(settings: Settings, *, model_dir: Path | None = None) -> Iterator[tuple[Settings, Database]]:
    """Settings and a migrated database in a throwaway data dir: an evaluation never touches the real store."""
    with tempfile.TemporaryDirectory(prefix="supportbot-eval-") as tmp:
        update: dict[str, Any] = {"data_dir": Path(tmp), "database_url": None}
        if model_dir is not None:
            update["embedding_model"] = str(model_dir)
        temp_settings = settings.model_copy(update=update)
        temp_settings.__dict__.pop("db_url", None)  # a cached_property computed for the real data_dir
        temp_settings.ensure_dirs()
        upgrade(temp_settings.db_url)
        db = Database(temp_settings.db_url)
        try:
            yield temp_settings, db
        finally:
            db.engine.dispose()


def evaluate(*, settings: Settings, tickets: Path, queries: Path, k: int = 10,
             mapping: Mapping[str, str] | None = None, model_dir: Path | None = None) -> dict[str, Any]:
    """Ingest ``tickets`` into a throwaway store with the configured (maybe tuned) model; score ``queries``."""
    from retrieval.ingest import ingest_file
    from retrieval.search import TicketIndex

    wanted = read_queries(queries)
    model = model_dir or resolve_model_dir(settings)
    with temporary_store(settings, model_dir=model) as (temp_settings, db):
        report = ingest_file(settings=temp_settings, db=db, path=tickets, mapping=mapping)
        if report.index_error:
            raise InputError(f"indexing {tickets} failed: {report.index_error}")
        index = TicketIndex.open(settings=temp_settings, db=db)
        started = time.perf_counter()
        rankings = [index.rank_ids(query, max(k, 10)) for query, _ in wanted]
        elapsed = time.perf_counter() - started
    scores = score_rankings(rankings, [rel for _, rel in wanted], max(k, 10))
    if k != 10:
        scores = {**score_rankings(rankings, [rel for _, rel in wanted], k), "n": len(wanted)}
    scores["skipped_tickets"] = len(report.skipped)
    scores["ms_per_query"] = round(1000 * elapsed / len(wanted), 2)
    scores["model"] = str(model)
    return scores


def json_objects(path: Path) -> list[dict[str, Any]]:
    """Every object of a JSONL file, in order; a line that is not a JSON object is an InputError."""
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
    return rows


def read_pairs(path: Path, *, question_field: str, answer_field: str, id_field: str = "id") -> list[dict[str, str]]:
    rows = []
    for n, row in enumerate(json_objects(path), 1):
        question, answer = row.get(question_field), row.get(answer_field)
        if isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip():
            rows.append({"id": str(row.get(id_field) or f"row-{n}"), "q": question, "a": answer})
    if not rows:
        raise InputError(f"{path} holds no {question_field!r} -> {answer_field!r} pairs")
    return rows


def crossval(*, settings: Settings, pairs_path: Path, question_field: str = "question",
             answer_field: str = "solution", folds: int = 5, k: int = 10, seed: int = 0,
             tune_config: Any = None, max_folds: int | None = None, baseline: bool = True,
             grid: list[Any] | None = None, inner_folds: int = 3) -> dict[str, Any]:
    """k-fold: tune on the other folds' pairs, evaluate the held-out fold's questions.

    The ticket corpus is every answer (as ``work_performed``; the question never enters a ticket),
    so each held-out question is searched among all answers, including the ones trained on.

    With ``grid`` (adapter settings to choose from) the estimate is nested: inside each outer fold, the
    setting is chosen by an inner ``inner_folds``-fold CV on that fold's training pairs alone
    (``choose_config``), then trained on all of them; the held-out fold never takes part in the choice.
    """
    from retrieval.tune import Pair, TuneConfig, base_vectors, fit

    config = tune_config or TuneConfig(method="adapter")  # one method per estimate: --method chooses
    if grid:  # the nested estimate chooses among the adapter's settings
        grid = [replace(g, method="adapter") for g in grid]
    rows = read_pairs(pairs_path, question_field=question_field, answer_field=answer_field)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    fold_of = {i: n % folds for n, i in enumerate(order)}
    results: dict[str, Any] = {"folds": [], "n_pairs": len(rows)}
    with tempfile.TemporaryDirectory(prefix="supportbot-cv-") as tmp:
        tickets_path = Path(tmp) / "tickets.jsonl"
        with open(tickets_path, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({"id": row["id"], "work_performed": row["a"]}) + "\n")
        all_queries = Path(tmp) / "queries_all.jsonl"
        _write_queries(all_queries, rows)
        if baseline:
            results["baseline_all"] = evaluate(settings=settings, tickets=tickets_path, queries=all_queries, k=k)
        base_dir = resolve_model_dir(settings)
        cache: dict[str, Any] = {}  # base embeddings, shared by the folds (the adapter method)
        for fold in range(folds if max_folds is None else min(folds, max_folds)):
            test = [r for i, r in enumerate(rows) if fold_of[i] == fold]
            train_rows = [r for i, r in enumerate(rows) if fold_of[i] != fold]
            queries_path = Path(tmp) / f"queries_{fold}.jsonl"
            _write_queries(queries_path, test)
            started = time.monotonic()
            fold_config, inner = config, None
            if grid:
                base_vectors(base_dir, [t for r in rows for t in (r["q"], r["a"])], cache=cache,
                             threads=settings.torch_threads)  # fmt: skip
                fold_config, inner = choose_config(train_rows, grid, cache=cache, folds=inner_folds, seed=seed)
            model_dir = fit(
                base_dir,
                [Pair(query=r["q"], positive=r["a"], group=r["id"]) for r in train_rows],
                config=fold_config,
                output=Path(tmp) / f"model_{fold}",
                threads=settings.torch_threads,
                cache=cache,
            )
            train_s = time.monotonic() - started
            tuned = evaluate(settings=settings, tickets=tickets_path, queries=queries_path, k=k, model_dir=model_dir)
            tuned["train_s"] = round(train_s, 1)
            if inner is not None:
                tuned["chosen"] = {k: getattr(fold_config, k) for k in GRID_KEYS}
                tuned["inner_recall@5"] = inner
            results["folds"].append(tuned)
    metrics = [key for key in results["folds"][0] if key.startswith(("recall@", "mrr"))]
    results["tuned_mean"] = {
        key: round(sum(f[key] for f in results["folds"]) / len(results["folds"]), 4) for key in metrics
    }
    results["tuned_mean"]["n"] = sum(f["n"] for f in results["folds"])
    return results


GRID_KEYS = ("adapter_epochs", "adapter_identity_weight", "adapter_learning_rate")


def adapter_grid(base: Any) -> list[Any]:
    """The adapter settings nested CV chooses from: how long to train and how hard to hold to the identity."""
    return [replace(base, adapter_epochs=epochs, adapter_identity_weight=pull)
            for epochs in (10, 30, 60) for pull in (1e-2, 3e-2, 1e-1)]  # fmt: skip


def choose_config(rows: list[dict[str, str]], grid: list[Any], *, cache: dict[str, Any], folds: int,
                  seed: int) -> tuple[Any, float]:
    """The grid entry with the best mean dense recall@5 over an inner k-fold of ``rows`` (and that recall).

    Inner scoring ranks by the adapted cosine alone, among the answers of ``rows`` only: cheap enough for
    a grid, and nothing outside ``rows`` is seen.
    """
    from retrieval.tune import Pair, learn_map

    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    fold_of = {i: n % folds for n, i in enumerate(order)}
    answers = np.stack([cache[r["a"]] for r in rows])
    best: tuple[float, int] = (-1.0, 0)
    for g, config in enumerate(grid):
        recalls = []
        for fold in range(folds):
            train = [Pair(query=r["q"], positive=r["a"], group=r["id"]) for i, r in enumerate(rows) if fold_of[i] != fold]
            test = [i for i in range(len(rows)) if fold_of[i] == fold]
            weight = learn_map(train, config=config, cache=cache)
            docs = _unit(answers @ weight)
            queries = _unit(np.stack([cache[rows[i]["q"]] for i in test]) @ weight)
            top = np.argsort(-(queries @ docs.T), axis=1)[:, :5]
            recalls += [any(rows[j]["id"] == rows[i]["id"] for j in top[n]) for n, i in enumerate(test)]
        recall = float(np.mean(recalls))
        if recall > best[0]:
            best = (recall, g)
    return grid[best[1]], round(best[0], 4)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _write_queries(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"query": row["q"], "relevant": [row["id"]]}) + "\n")
