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


def _user(s) -> User:  # type: ignore[no-untyped-def]
    user = User(platform="console", external_id="u1")
    s.add(user)
    s.flush()
    return user


def _rated_good(s, user: User, name: str, question: str, answer: str, **marks: object):  # type: ignore[no-untyped-def]
    """One question and answer in a conversation of their own, the answer marked and rated 👍."""
    message = _exchange(s, _conversation(s, name, user), question, answer)
    for field, value in marks.items():
        setattr(message, field, value)
    rate(session=s, message_id=message.id, value="good")
    return message


def test_fallback_answer_rated_good_is_never_a_model_target(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        user = _user(s)
        _rated_good(s, user, "model", "The scanner leaves streaks.",
                    "Clean the scanner glass and the feed rollers with a lint-free cloth.")
        _rated_good(s, user, "fallback", "Label printer prints blank.",
                    "What fixed this before: Replaced the ribbon. (SB-1, about 0.5 h)", fallback=True)
        _rated_good(s, user, "flagged", "VPN drops.", "Reinstall the client, then mail [removed].", flagged=True)
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
        _rated_good(s, _user(s), "fallback", "Label printer prints blank.",
                    "What fixed this before: Replaced the ribbon. (SB-1)", fallback=True)
    with db.session() as s, pytest.raises(InputError):
        export(session=s, out_dir=tmp_path / "export", scrub=None)


def test_technician_view_answer_rated_good_is_never_a_target(db: Database, tmp_path: Path) -> None:
    """A technician's own question gets every matching ticket listed (workers/compose.for_technician):
    a troubleshooting list, not what the model should learn to tell employees."""
    with db.session() as s:
        user = _user(s)
        _rated_good(s, user, "model", "The scanner leaves streaks.",
                    "Clean the scanner glass and the feed rollers with a lint-free cloth.")
        _rated_good(s, user, "tech", "Label printer prints blank.",
                    "Replace the ribbon.\n\nMatching tickets:\n[SB-1] Label printer blank (Zebra), 0.5 h",
                    meta={"composition": [f"{TECHNICIAN_VIEW}: 1 tickets"]})
    out = tmp_path / "export"
    with db.session() as s:
        summary = export(session=s, out_dir=out, scrub=None, validation_percent=0)
    assert summary.counts["answers_technician_view"] == 1
    text = json.dumps(_rows(out))
    assert "Clean the scanner glass" in text and "Matching tickets" not in text
