"""``retrieval tune`` on the real MiniLM: the adapter method end to end, and the refusal paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from core.errors import TrainingError
from retrieval.cli import SEED_FILE
from retrieval.embedder import Embedder, active_pointer, embedded_model_dir, plain_layout, resolve_model_dir
from retrieval.evaluate import crossval
from retrieval.ingest import ingest_file
from retrieval.search import TicketIndex
from retrieval.tune import Pair, TuneConfig, pairs_from_store, split_pairs, train, tune

FIXTURES = Path(__file__).parent / "fixtures"


def test_split_keeps_groups_together():
    pairs = [Pair(query=f"q{i}", positive=f"p{i // 2}", group=f"g{i // 2}") for i in range(40)]
    train_pairs, heldout = split_pairs(pairs, holdout=0.25, seed=0)
    assert not {p.group for p in train_pairs} & {p.group for p in heldout}
    assert len(heldout) == 10


def test_too_few_pairs_is_refused(env):
    settings, db = env
    ingest_file(settings=settings, db=db, path=FIXTURES / "retrieval_tickets.jsonl")
    with pytest.raises(TrainingError, match="at least 20"):
        tune(settings=settings, db=db)


@pytest.mark.slow
def test_tune_adapter_keeps_a_better_model_and_the_index_follows(env):
    settings, db = env
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    pairs = pairs_from_store(db=db)
    assert len(pairs) == 42 and all(p.query and p.positive for p in pairs)
    # min_gain below zero: keep whatever comes out, so the activation path is always exercised.
    report = tune(settings=settings, db=db, config=TuneConfig(method="adapter", min_gain=-1.0, adapter_epochs=5))
    assert report.kept and report.heldout_pairs > 0 and report.method == "adapter" and set(report.tried) == {"adapter"}
    assert {"recall@5", "mrr"} <= set(report.before) and {"recall@5", "mrr"} <= set(report.after)
    tuned_dir = Path(active_pointer(settings).read_text().strip())
    assert resolve_model_dir(settings) == tuned_dir
    assert json.loads((tuned_dir / "tune_report.json").read_text())["kept"] is True
    tuned = Embedder(tuned_dir)
    base = Embedder(embedded_model_dir())
    text = ["printer jams with error E-502"]
    assert not np.allclose(tuned.encode(text), base.encode(text))
    assert np.linalg.norm(tuned.encode(text)) == pytest.approx(1.0, abs=1e-4)
    index = TicketIndex.open(settings=settings, db=db)
    assert index.status()["model"] == str(tuned_dir)
    assert index.search("label printer prints blank labels", k=3).hits[0].id == "SB-0020"
    # Served without importing sentence-transformers (cold start), yet the very vectors it would give.
    assert tuned.plain is not None and base.plain is not None
    texts = ["  printer jams with error E-502 ", "x", "the VPN drops every hour " * 60, *[p.query for p in pairs[:20]]]
    for embedder, folder in ((tuned, tuned_dir), (base, embedded_model_dir())):
        reference = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        reference.max_seq_length = 256
        expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        assert np.abs(embedder.encode(texts) - expected).max() < 1e-5


def test_other_module_layouts_load_with_sentence_transformers(tmp_path):
    """CLS pooling is not what PlainPipeline computes: such a folder is left to the library."""
    folder = tmp_path / "cls"
    shutil.copytree(embedded_model_dir(), folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert plain_layout(embedded_model_dir()) is not None and plain_layout(folder) is None
    embedder = Embedder(folder)
    assert embedder.plain is None and embedder.model is not None
    assert embedder.encode(["printer jams"]).shape == (1, 384)


@pytest.mark.slow
def test_full_fine_tune_changes_weights(tmp_path):
    pairs = [Pair(query="printer error E-502", positive="replaced fuser", group="a"),
             Pair(query="vpn error 809", positive="set NAT-T registry key", group="b")]
    out = train(embedded_model_dir(), pairs, config=TuneConfig(method="full", epochs=1), output=tmp_path / "m")
    before = Embedder(embedded_model_dir()).encode(["replaced fuser"])
    after = Embedder(out).encode(["replaced fuser"])
    assert not np.allclose(before, after)


def test_nested_cv_chooses_adapter_settings_inside_the_training_folds(env, tmp_path):
    settings, db = env
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(
        "".join(json.dumps({"id": f"p{n}", "question": p.query, "solution": p.positive}) + "\n"
                for n, p in enumerate(pairs_from_store(db=db)))  # fmt: skip
    )
    grid = [TuneConfig(adapter_epochs=1), TuneConfig(adapter_epochs=5)]
    result = crossval(settings=settings, pairs_path=pairs_file, folds=2, max_folds=1, baseline=False,
                      grid=grid, inner_folds=2)  # fmt: skip
    (fold,) = result["folds"]
    assert fold["chosen"]["adapter_epochs"] in (1, 5) and 0.0 <= fold["inner_recall@5"] <= 1.0
    assert {"recall@5", "mrr"} <= set(result["tuned_mean"]) and result["tuned_mean"]["n"] == 21


@pytest.mark.slow
def test_tune_auto_tries_both_methods_and_keeps_the_better(env):
    settings, db = env
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    report = tune(settings=settings, db=db, config=TuneConfig(min_gain=-1.0, adapter_epochs=5))
    assert report.config["method"] == "auto" and set(report.tried) == {"adapter", "full"}
    assert report.method == max(("adapter", "full"), key=lambda m: (report.tried[m]["recall@5"], report.tried[m]["mrr"]))
    assert report.after == report.tried[report.method] and report.kept
    tuned_dir = Path(active_pointer(settings).read_text().strip())
    assert json.loads((tuned_dir / "tune_report.json").read_text())["method"] == report.method
    # Only the kept model stays on disk; the other method's folder is gone.
    assert [p.name for p in tuned_dir.parent.iterdir() if p.name.startswith("embedder-")] == [tuned_dir.name]
    index = TicketIndex.open(settings=settings, db=db)
    assert index.status()["model"] == str(tuned_dir)
