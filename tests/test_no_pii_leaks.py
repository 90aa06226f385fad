"""Plant personal data in a multi-turn conversation and look for it everywhere it could leak:
the SQL database, the broker's traffic, the worker's and the CLI's logs, and the training export."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from bot.cli import make_intake
from bot.console import Console
from core.db import Database, upgrade
from core.settings import load_settings
from tests.conftest import ROOT, WorkerProcess, seed_tickets, settings_env
from tests.helpers import BrokerWatch

PLANTED = {
    "name": "Priya Raman",
    "lower_name": "marco bianchi",
    "email": "priya.raman@acme-corp.com",
    "phone": "+1 415 555 0134",
    "iban": "DE89 3704 0044 0532 0130 00",
}
TURNS = [
    f"Hi, I'm {PLANTED['name']}. Our printer keeps jamming on every page and shows error E-502.",
    f"You can reach me at {PLANTED['email']} or {PLANTED['phone']} if needed.",
    f"also my colleague {PLANTED['lower_name']} says the VPN drops; refund goes to {PLANTED['iban']}",
]


def _variants(value: str) -> set[str]:
    # The raw value and its spacing-free form (an IBAN or phone number may be normalized on the way).
    return {value, value.replace(" ", ""), value.lower()}


def _assert_clean(where: str, text: str) -> None:
    for kind, value in PLANTED.items():
        for variant in _variants(value):
            assert variant not in text, f"{kind} ({variant!r}) leaked into {where}"


@pytest.mark.redis
def test_planted_pii_reaches_no_store_queue_log_or_export(tmp_path, redis_url):
    settings = load_settings(data_dir=tmp_path / "data", broker_url=redis_url, max_new_tokens=12)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)

    with BrokerWatch(redis_url) as broker:
        worker = WorkerProcess(settings, name="pii", extra=["--loglevel", "DEBUG"])
        try:
            worker.wait_ready(db)
            console = Console(settings=settings, db=db, intake=make_intake(settings, db))
            replies = [console.ask(turn) for turn in TURNS]
            assert all(r.answer for r in replies)
            cli = subprocess.run(
                [sys.executable, "-m", "bot.cli", "-v", "ask", TURNS[1], "--json"],
                env=settings_env(settings), cwd=ROOT, capture_output=True, timeout=300,
            )
            assert cli.returncode == 0, cli.stderr.decode()[-2000:]
            for reply in replies:
                subprocess.run([sys.executable, "-m", "bot.cli", "rate", str(reply.message_id), "good"],
                               env=settings_env(settings), cwd=ROOT, check=True, capture_output=True, timeout=120)
            export_dir = tmp_path / "export"
            exported = subprocess.run([sys.executable, "-m", "bot.cli", "export", "--out", str(export_dir)],
                                      env=settings_env(settings), cwd=ROOT, capture_output=True, timeout=300)
            assert exported.returncode == 0, exported.stderr.decode()[-2000:]
        finally:
            worker.stop()

    # The conversation kept its meaning: pseudonyms, not blanks, and the same person is the same placeholder.
    with db.session() as session:
        from core.schema import Message, MessageRole

        texts = [m.text for m in session.query(Message).filter(Message.role == MessageRole.user).order_by(Message.id)]
    assert "<PERSON_1>" in texts[0] and "E-502" in texts[0]
    assert "<EMAIL_ADDRESS_1>" in texts[1]

    dump = "\n".join(sqlite3.connect(settings.db_url.removeprefix("sqlite:///")).iterdump())
    _assert_clean("the SQL database", dump)
    assert broker.commands, "the broker watch saw nothing"
    _assert_clean("the broker traffic", broker.text)
    _assert_clean("the worker log", worker.log.read_text(errors="replace"))
    _assert_clean("the CLI output", cli.stderr.decode(errors="replace") + cli.stdout.decode(errors="replace"))
    files = [p for p in export_dir.rglob("*") if p.is_file()]
    assert files, "the export wrote nothing"
    _assert_clean("the export", "\n".join(p.read_text(errors="replace") for p in files))
