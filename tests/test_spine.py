"""The spine end to end: console adapter -> intake -> SQL -> Celery -> worker process -> SQL -> reply.

Everything is real: the embedded model, MiniLM + FAISS retrieval, Presidio, SQLite, a Celery worker
process on the embedded file broker and on a real redis-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from core.db import Database, upgrade
from core.schema import Message, MessageRole, MessageStatus
from core.settings import load_settings
from tests.conftest import ROOT, WorkerProcess, seed_tickets, settings_env

PRINTER = "Our printer keeps jamming on every page and shows error E-502. What should I do?"


def _stack(tmp_path_factory, **overrides):
    settings = load_settings(data_dir=tmp_path_factory.mktemp("spine") / "data", max_new_tokens=24, **overrides)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    worker = WorkerProcess(settings, name="spine")
    worker.wait_ready(db)
    return settings, db, worker


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings, db, worker = _stack(tmp_path_factory)
    yield settings, db
    worker.stop()


def _ask(settings, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "ask", *args],
        env=settings_env(settings), cwd=ROOT, capture_output=True, input=input, timeout=300,
    )


def test_ask_json_answers_with_a_cited_ticket(stack):
    settings, db = stack
    done = _ask(settings, PRINTER, "--json")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    reply = json.loads(done.stdout)
    for field in ("answer", "sources", "latency_ms", "model_version", "conversation_id", "message_id"):
        assert field in reply
    assert reply["sources"][0] == "T-100"
    assert "T-100" in reply["answer"] and "Estimated fix time" in reply["answer"]
    assert reply["model_version"].startswith("smollm2-135m-instruct")
    assert reply["latency_ms"] > 0
    with db.session() as session:
        stored = session.get(Message, reply["message_id"])
        assert stored.role == MessageRole.assistant and stored.sources == reply["sources"]
        question = session.get(Message, stored.reply_to_id)
        assert question.status == MessageStatus.answered and "E-502" in question.text


def test_unknown_problem_says_not_sure_instead_of_inventing(stack):
    settings, _ = stack
    done = _ask(settings, "The coffee machine on floor 2 makes a strange whistling sound after descaling", "--json")
    reply = json.loads(done.stdout)
    assert "not sure" in reply["answer"] and reply["sources"] == []


@pytest.mark.parametrize(
    "payload, expect",
    [
        (b"", "empty message"),
        (b"   \n\t  ", "empty message"),
        (os.urandom(3000), "binary data"),
        (("printer E-502 jams " * 2300).encode(), "very long"),
    ],
    ids=["empty", "blank", "binary", "40k-chars"],
)
def test_bad_input_gets_a_clear_reply_and_is_stored(stack, payload, expect):
    settings, db = stack
    done = _ask(settings, "-", "--json", input=payload)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    reply = json.loads(done.stdout)
    assert expect in reply["answer"]
    with db.session() as session:
        question = session.get(Message, reply["question_id"])
        assert question is not None and question.role == MessageRole.user
        assert question.meta["chars"] == len(payload.decode("utf-8", errors="replace"))


def test_duplicate_delivery_is_one_message(stack):
    from bot.cli import make_intake
    from core.types import Inbound

    settings, db = stack
    intake = make_intake(settings, db)
    event = Inbound(platform="console", channel="c", thread="dup", user_external_id="u-1", text=PRINTER, event_id="ev-1")
    first = intake.receive(event)
    second = intake.receive(event)
    assert second.duplicate and second.message_id == first.message_id
    with db.session() as session:
        assert session.scalar(select(func.count()).where(Message.idempotency_key == "console:ev-1")) == 1


def test_status_reports_the_worker(stack):
    settings, _ = stack
    done = subprocess.run([sys.executable, "-m", "bot.cli", "status", "--json"], env=settings_env(settings),
                          cwd=ROOT, capture_output=True, timeout=60)
    report = json.loads(done.stdout)
    assert report["workers"] and report["workers"][0]["model_version"].startswith("smollm2")


@pytest.mark.redis
def test_ask_over_redis_broker(tmp_path_factory, redis_url):
    settings, db, worker = _stack(tmp_path_factory, broker_url=redis_url)
    try:
        done = _ask(settings, PRINTER, "--json")
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert json.loads(done.stdout)["sources"][0] == "T-100"
    finally:
        worker.stop()


def test_ask_without_worker_on_configured_broker_says_so(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", broker_url="redis://127.0.0.1:9/0")
    upgrade(settings.db_url)
    done = _ask(settings, PRINTER)
    assert done.returncode == 2
    assert b"No supportbot worker is reachable" in done.stderr


def test_ask_starts_a_session_worker_on_the_embedded_broker(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", max_new_tokens=16)
    upgrade(settings.db_url)
    seed_tickets(settings, Database.from_settings(settings))
    done = _ask(settings, PRINTER, "--json")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert json.loads(done.stdout)["sources"][0] == "T-100"


def test_console_chat_answers_rates_and_escalates(stack):
    import io

    from bot.chat import run_chat
    from bot.cli import make_intake
    from bot.console import Console
    from core.schema import Escalation, Rating

    settings, db = stack
    console = Console(settings=settings, db=db, intake=make_intake(settings, db))
    stdin = io.StringIO(f"{PRINTER}\n/good\nit still jams after that\n/bad did not help\n/escalate\n/quit\n")
    stdout = io.StringIO()
    assert run_chat(console, settings=settings, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    assert "Sources: [T-100]" in out and "Thanks, noted." in out and "Escalated (#" in out
    with db.session() as session:
        values = sorted(r.value for r in session.query(Rating).all())
        assert values == [-1, 1]
        escalation = session.query(Escalation).one()
        assert "E-502" in escalation.summary
