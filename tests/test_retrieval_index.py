"""TicketIndex with the real embedded MiniLM, real SQLite and real FAISS files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import Database
from core.schema import Ticket
from retrieval.cli import SEED_FILE
from retrieval.evaluate import evaluate
from retrieval.ingest import ingest_file
from retrieval.search import TicketIndex
from tests.helpers import retrieval_cli

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def loaded(env):
    settings, db = env
    report = ingest_file(settings=settings, db=db, path=FIXTURES / "retrieval_tickets.jsonl")
    assert report.indexed and len(report.added) == 10
    return settings, db


def test_search_finds_the_ticket_and_is_confident(loaded):
    settings, db = loaded
    index = TicketIndex.open(settings=settings, db=db)
    result = index.search("the printer jams and shows E-502", k=3)
    assert result.hits[0].id == "T-1"
    assert result.hits[0].hours == 1.5 and "fuser" in result.hits[0].work_performed
    assert result.confidence >= settings.min_confidence
    assert index.search("LIC017", k=3).hits[0].id == "T-4"
    unrelated = index.search("what is the recipe for a chocolate cake", k=3)
    assert unrelated.confidence < settings.min_confidence
    assert index.search("   ", k=3).hits == []


def test_ingest_is_idempotent_and_updates(loaded, tmp_path):
    settings, db = loaded
    again = ingest_file(settings=settings, db=db, path=FIXTURES / "retrieval_tickets.jsonl")
    assert again.added == [] and again.updated == [] and again.unchanged == 10
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"id": "T-3", "title": "Coffee machine error C-77", "work_performed": "Descaled"}))
    report = ingest_file(settings=settings, db=db, path=changed)
    assert report.updated == ["T-3"]
    index = TicketIndex.open(settings=settings, db=db)
    assert index.search("coffee machine C-77", k=1).hits[0].id == "T-3"
    assert len(index) == 10


def test_incremental_upsert_and_delete_seen_by_another_process(loaded):
    settings, db = loaded
    worker = TicketIndex.open(settings=settings, db=db)
    cli = TicketIndex.open(settings=settings, db=Database(settings.db_url))  # stands for the CLI process
    before = worker.status()["snapshot"]
    cli.upsert(tickets=[{"id": "T-99", "title": "Espresso machine leaks water, error EM-12",
                         "work_performed": "Replaced boiler gasket", "hours": 1}])
    hit = worker.search("espresso machine EM-12 leaking", k=1).hits[0]
    assert hit.id == "T-99" and worker.status()["snapshot"] != before
    cli.delete(ids=["T-99"])
    assert all(h.id != "T-99" for h in worker.search("espresso machine EM-12 leaking", k=3).hits)


def test_index_that_does_not_match_sql_is_repaired(loaded):
    settings, db = loaded
    # A writer that never touched the index (e.g. an older tool) adds a ticket straight to SQL.
    with db.session() as session:
        session.add(Ticket(id="T-50", title="Paint booth fan error PB-3", work_performed="Reset fan VFD"))
    index = TicketIndex.open(settings=settings, db=db)
    assert index.search("paint booth PB-3", k=1).hits[0].id == "T-50"
    # A damaged snapshot is rebuilt from SQL.
    current = (settings.index_dir / "CURRENT").read_text().strip()
    (settings.index_dir / current / "dense.faiss").write_bytes(b"garbage")
    index = TicketIndex.open(settings=settings, db=db)
    assert len(index) == 11 and index.search("paint booth PB-3", k=1).hits[0].id == "T-50"
    # A STALE mark (the index missed a change) triggers a check on the next search.
    with db.session() as session:
        session.get(Ticket, "T-50").work_performed = "Replaced fan bearing"
        session.get(Ticket, "T-50").content_hash = ""
    index.mark_stale()
    index.search("paint booth", k=1)
    assert not (settings.index_dir / "STALE").exists()
    # Losing the whole index folder is fine too.
    shutil.rmtree(settings.index_dir)
    assert len(TicketIndex.open(settings=settings, db=db)) == 11


def test_bad_file_stores_nothing_from_bad_rows(env):
    settings, db = env
    report = ingest_file(settings=settings, db=db, path=FIXTURES / "retrieval_bad.jsonl")
    assert len(report.skipped) == 7 and sorted(report.added) == ["B-1", "B-8"]
    with db.session() as session:
        assert sorted(session.scalars(select(Ticket.id))) == ["B-1", "B-8"]


def test_ann_index_above_threshold(env):
    settings, db = env
    settings = settings.model_copy(update={"ann_threshold": 20})
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    index = TicketIndex.open(settings=settings, db=db)
    assert index.status()["kind"] == "ivf"
    assert index.search("label printer prints blank labels", k=3).hits[0].id == "SB-0020"


def test_cli_seed_reindex_and_eval(env, capsys):
    settings, db = env
    run = retrieval_cli(settings)

    assert run("tickets", "seed") == 0
    assert run("tickets", "seed") == 0  # not twice
    assert "already holds 42" in capsys.readouterr().out
    assert run("tickets", "reindex") == 0
    assert json.loads(capsys.readouterr().out)["tickets"] == 42
    assert run("tickets", "delete", "SB-0001", "nope") == 0
    assert "not found: nope" in capsys.readouterr().out
    code = run("eval", "retrieval", "--tickets", str(FIXTURES / "retrieval_tickets.jsonl"),
               "--queries", str(FIXTURES / "retrieval_queries.jsonl"))
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 6 and scores["recall@5"] >= 0.8
    assert run("tickets", "ingest", str(FIXTURES / "retrieval_bad.jsonl")) == 0
    assert "retrieval_bad.jsonl:2: rejected: invalid JSON" in capsys.readouterr().err


def test_evaluate_uses_a_temporary_store(env):
    settings, db = env
    scores = evaluate(settings=settings, tickets=FIXTURES / "retrieval_tickets.jsonl",
                      queries=FIXTURES / "retrieval_queries.jsonl", k=5)
    assert scores["recall@1"] >= 0.5 and 0 < scores["mrr"] <= 1
    with db.session() as session:
        assert session.scalars(select(Ticket.id)).first() is None  # the real store is untouched
