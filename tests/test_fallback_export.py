"""A 👍 on an answer whose model text was dropped for a ticket's fix credits the ticket, not the model:
such a turn is never a training target. Flagged answers never enter an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.db import Database
from core.errors import InputError
from core.schema import User
from core.types import TECHNICIAN_VIEW
from model.export import export
from model.ratings import rate
from tests.test_learning import _conversation, _exchange


def _rows(out: Path) -> list[dict]:
    rows = []
    for name in ("train.jsonl", "validation.jsonl"):
        path = out / name
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_fallback_answer_rated_good_is_never_a_model_target(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        user = User(platform="console", external_id="u1")
        s.add(user)
        s.flush()
        model = _exchange(s, _conversation(s, "model", user), "The scanner leaves streaks.",
                          "Clean the scanner glass and the feed rollers with a lint-free cloth.")
        rate(session=s, message_id=model.id, value="good")
        quoted = _exchange(s, _conversation(s, "fallback", user), "Label printer prints blank.",
                           "What fixed this before: Replaced the ribbon. (SB-1, about 0.5 h)")
        quoted.fallback = True
        rate(session=s, message_id=quoted.id, value="good")
        flagged = _exchange(s, _conversation(s, "flagged", user), "VPN drops.",
                            "Reinstall the client, then mail [removed].")
        flagged.flagged = True
        rate(session=s, message_id=flagged.id, value="good")
    out = tmp_path / "export"
    with db.session() as s:
        summary = export(session=s, out_dir=out, scrub=None, validation_percent=0)
    assert summary.counts["answers_fallback"] == 1 and summary.counts["conversations_flagged"] == 1
    text = json.dumps(_rows(out))
    assert "Clean the scanner glass" in text  # the model's own good answer is a target
    assert "What fixed this before" not in text  # never a target (that conversation has none, so it is not exported)
    assert "Reinstall the client" not in text


def test_only_fallback_answers_means_nothing_to_train(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        user = User(platform="console", external_id="u1")
        s.add(user)
        s.flush()
        quoted = _exchange(s, _conversation(s, "fallback", user), "Label printer prints blank.",
                           "What fixed this before: Replaced the ribbon. (SB-1)")
        quoted.fallback = True
        rate(session=s, message_id=quoted.id, value="good")
    with db.session() as s, pytest.raises(InputError):
        export(session=s, out_dir=tmp_path / "export", scrub=None)


def test_technician_view_answer_rated_good_is_never_a_target(db: Database, tmp_path: Path) -> None:
    """A technician's own question gets every matching ticket listed (workers/compose.for_technician):
    a troubleshooting list, not what the model should learn to tell employees."""
    with db.session() as s:
        user = User(platform="console", external_id="u1")
        s.add(user)
        s.flush()
        model = _exchange(s, _conversation(s, "model", user), "The scanner leaves streaks.",
                          "Clean the scanner glass and the feed rollers with a lint-free cloth.")
        rate(session=s, message_id=model.id, value="good")
        listed = _exchange(s, _conversation(s, "tech", user), "Label printer prints blank.",
                           "Replace the ribbon.\n\nMatching tickets:\n[SB-1] Label printer blank (Zebra), 0.5 h")
        listed.meta = {"composition": [f"{TECHNICIAN_VIEW}: 1 tickets"]}
        rate(session=s, message_id=listed.id, value="good")
    out = tmp_path / "export"
    with db.session() as s:
        summary = export(session=s, out_dir=out, scrub=None, validation_percent=0)
    assert summary.counts["answers_technician_view"] == 1
    text = json.dumps(_rows(out))
    assert "Clean the scanner glass" in text and "Matching tickets" not in text
