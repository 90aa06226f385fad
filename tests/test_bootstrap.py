"""A new company's first adapter: the stored tickets become question -> fix conversations, a QLoRA run
trains on them, and the gate decides, all from one command (`supportbot train --from-tickets`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.schema import ModelVersion
from model.export import export_store
from retrieval.cli import SEED_FILE
from retrieval.ingest import ingest_file
from retrieval.search import TicketIndex
from tests.conftest import ROOT, settings_env


def test_stored_tickets_become_grounded_conversations(env, tmp_path):
    settings, db = env
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    index = TicketIndex.open(settings=settings, db=db)
    out = tmp_path / "export"
    with db.session() as session:
        summary = export_store(session=session, index=index, out_dir=out, scrub=None, validation_percent=20)
    rows = [json.loads(line) for name in ("train.jsonl", "validation.jsonl")
            for line in (out / name).read_text().splitlines() if line.strip()]
    assert rows and summary.counts["rows_read"] == len(index)
    for row in rows:
        system, user, answer = row["messages"]
        assert system["role"] == "system" and "<tickets>" in system["content"]
        assert user["role"] == "user" and answer["role"] == "assistant"
        # The ticket whose fix is the target is never quoted in its own prompt: no copying.
        assert answer["content"] not in system["content"]


@pytest.mark.slow
def test_train_from_tickets_runs_export_training_and_the_gate(env):
    settings, db = env
    ingest_file(settings=settings, db=db, path=SEED_FILE)
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "train", "--from-tickets", "--local", "--json", "--max-steps", "3",
         "--learning-rate", "3e-3", "--pack-len", "256", "--batch-rows", "1", "--save-every", "0",
         "--no-progress-bar", "--eval-limit", "2"],
        env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)
    assert payload["status"] == "succeeded" and "gate" in payload
    with db.session() as session:
        version = session.query(ModelVersion).filter(ModelVersion.name == payload["version"]).one()
        assert version.status.value in ("active", "refused", "candidate")
        assert version.status.value == ("active" if payload["gate"]["passed"] else version.status.value)
