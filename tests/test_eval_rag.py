"""`supportbot eval rag`: the held-out bands, and one real run (index, retrieve, generate, compose, score)."""

import json
from pathlib import Path

from workers.eval_rag import evaluate_rag, held_out, split_tickets

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_the_development_band_never_holds_a_reported_question():
    ids = [f"MN-{n}" for n in range(2000)]
    reported = {i for i in ids if held_out(i, 10)}
    development = {i for i in ids if held_out(i, 10, offset=10)}
    assert reported and development and not reported & development
    rows = [{"id": i} for i in ids]
    index, asked = split_tickets(rows, 10, 10)
    assert {r["id"] for r in asked} == development and len(index) + len(asked) == len(ids)


def test_a_run_reports_scores_and_writes_every_case(settings, tmp_path):
    cases = tmp_path / "cases.jsonl"
    settings = settings.model_copy(update={"rank_fixes": "always"})  # the model ranks the fixes even untuned
    report = evaluate_rag(settings=settings, tickets=FIXTURES / "retrieval_tickets.jsonl", holdout_percent=30,
                          limit=2, cases_out=cases, model_baseline=False)  # fmt: skip
    assert report["questions"] == len(cases.read_text().splitlines()) >= 1
    assert report["baselines"]["no_retrieval"] is None
    assert 0 <= report["delivered"]["rougeL"] <= 1 and report["model"] == settings.base_model
    assert report["rank_fixes"] == settings.rank_fixes and report["lead_moved"] >= 0
    for line in cases.read_text().splitlines():
        case = json.loads(line)
        assert case["question"] and case["reference"] and case["answer"]
        assert case["id"] not in case["hits"]  # a held-out question's own ticket is never in the index
        assert case["lead"] is None or case["lead"] in case["hits"]  # the quoted fix is a retrieved ticket's
