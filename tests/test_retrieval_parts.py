"""Retrieval building blocks without the embedding model: tokenizer, BM25, FAISS index, file parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from retrieval.dense import FLAT, IVF, DenseIndex
from retrieval.evaluate import score_rankings
from retrieval.ingest import apply_mapping, parse_file, parse_mapping
from retrieval.lexical import LexicalIndex, code_tokens, tokenize
from retrieval.store import validate_ticket

FIXTURES = Path(__file__).parent / "fixtures"


def test_tokenizer_keeps_error_codes_whole():
    assert "e502" in tokenize("Printer shows E-502")
    assert "502" in tokenize("Printer shows E-502")
    assert "lic017" in tokenize("error LIC017!")
    assert code_tokens("E-502 on the M607 printer") == ["e502", "m607"]
    assert "the" not in tokenize("the printer")


def test_lexical_index_add_remove_and_persist(tmp_path):
    index = LexicalIndex()
    index.add([0, 4, 8], ["printer jams E-502", "vpn error 809", "printer toner low"])
    keys, scores = index.search("E-502 jam", 3)
    assert keys[0] == 0 and scores[0] > 0
    assert index.has_terms(0, ["e502"]) and not index.has_terms(4, ["e502"])
    index.remove([0])
    assert 0 not in index.search("E-502", 3)[0].tolist()
    index.add([4], ["vpn error 812 after update"])  # an update replaces the row
    assert index.search("809", 3)[0].tolist() == []
    index.save(tmp_path)
    loaded = LexicalIndex.load(tmp_path)
    assert loaded.search("812", 3)[0].tolist() == [4]
    assert len(loaded) == 2


def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_dense_index_switches_to_ivf_above_threshold(tmp_path):
    vectors = _clustered(6000)
    keys = np.arange(6000, dtype=np.int64) * 4
    small = DenseIndex.build(keys[:500], vectors[:500], ann_threshold=1000)
    assert small.kind == FLAT
    big = DenseIndex.build(keys, vectors, ann_threshold=1000)
    assert big.kind == IVF
    _, found = big.search(vectors[:20], 1)
    assert (found[:, 0] == keys[:20]).mean() >= 0.9
    big.remove(keys[:1])
    assert len(big) == 5999
    big.add(np.asarray([1], np.int64), vectors[:1])
    _, found = big.search(vectors[:1], 1)
    assert found[0, 0] == 1
    got_keys, got_vectors = big.vectors()
    assert len(got_keys) == len(big) and got_vectors.shape == (len(big), 32)
    big.save(tmp_path / "d.faiss")
    assert DenseIndex.load(tmp_path / "d.faiss").kind == IVF
    assert big.wants_rebuild(100_000) and not small.wants_rebuild(1000)


def test_bad_rows_are_reported_with_line_numbers_and_skipped():
    tickets, report = parse_file(FIXTURES / "retrieval_bad.jsonl", mapping=None, max_chars=1000)
    assert sorted(t.id for t in tickets) == ["B-1", "B-8"]
    assert "\x00" not in next(t for t in tickets if t.id == "B-8").title
    lines = {e.line: e.reason for e in report.skipped}
    assert set(lines) == {2, 3, 4, 5, 6, 9, 10}
    assert "invalid JSON" in lines[2]
    assert "'id'" in lines[4]
    assert "no text" in lines[5]
    assert "hours" in lines[6] and "hours" in lines[9]


def test_csv_with_column_mapping():
    mapping = parse_mapping(["ref=id", "question=title", "answer=work_performed", "time=hours"])
    tickets, report = parse_file(FIXTURES / "retrieval_other.csv", mapping=mapping, max_chars=1000)
    assert [t.id for t in tickets] == ["Q-1", "Q-2"]
    assert tickets[0].hours == 0.25 and tickets[0].work_performed.startswith("Set scanner")
    assert [e.line for e in report.skipped] == [4]


def test_mapping_errors_and_precedence():
    with pytest.raises(InputError):
        parse_mapping(["question"])
    with pytest.raises(InputError):
        parse_mapping(["question=nonsense"])
    row = apply_mapping({"ticket_id": "7", "title": "old", "question": "new"}, {"question": "title"})
    assert row == {"id": "7", "title": "new"}


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary"])
def test_empty_or_binary_files_are_refused(tmp_path, content):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError):
        parse_file(path, mapping=None, max_chars=1000)


def test_validation_cuts_oversized_text():
    ticket = validate_ticket({"id": "X", "title": "a" * 5000}, max_chars=100)
    assert len(ticket.title) == 100
    with pytest.raises(InputError):
        validate_ticket({"id": "x" * 200, "title": "t"})


def test_score_rankings():
    scores = score_rankings([["a", "b"], ["c", "d"], ["e"]], [{"b"}, {"c"}, {"z"}], 10)
    assert scores["recall@1"] == pytest.approx(1 / 3, abs=1e-3)
    assert scores["recall@5"] == pytest.approx(2 / 3, abs=1e-3)
    assert scores["mrr"] == pytest.approx((0.5 + 1) / 3, abs=1e-3)


def test_hard_negatives_are_bm25_neighbours_from_other_groups():
    import torch

    from retrieval.tune import Pair, _mnrl, hard_negatives

    pairs = [
        Pair("printer jams in the paper tray", "clear the paper tray of the printer", "a"),
        Pair("printer toner is low", "replace the printer toner cartridge", "b"),
        Pair("vpn disconnects at home", "reinstall the vpn client", "c"),
        Pair("printer jams again", "clear the paper tray of the printer", "d"),  # same fix, another ticket
    ]
    chosen = hard_negatives(pairs, depth=3, seed=0)
    assert chosen[0] == "replace the printer toner cartridge"  # shares "printer", is not its fix
    assert chosen[2] is None  # no other fix shares a word with it: no negative rather than a random one
    for pair, negative in zip(pairs, chosen):
        assert negative != pair.positive
    assert hard_negatives(pairs, depth=3, seed=0) == chosen  # seeded
    # A hard negative that is a question's own fix after all is masked out of its softmax.
    sims = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    extra = torch.tensor([[9.0], [0.0]])
    masked = _mnrl(sims, ["a", "b"], extra, torch.tensor([[True], [False]]))
    assert torch.isclose(masked, _mnrl(sims, ["a", "b"], torch.tensor([[-1e9], [0.0]]), torch.tensor([[False], [False]])))
    assert _mnrl(sims, ["a", "b"], extra, torch.tensor([[False], [False]])) > masked  # a close wrong fix costs
