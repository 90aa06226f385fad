"""The console `/escalate` through the desk and a real worker process: the employee is told what
happens, later messages go to the desk instead of the model, a technician's reply is shown in the
conversation, the worker writes the desk summary, and still answers other conversations."""

from __future__ import annotations

import io
import json
import time

import pytest

from core import desk, texts
from core.conversations import answer_for
from core.schema import Escalation, Message, MessageRole, MessageStatus
from tests.conftest import FIXTURES, WorkerProcess

TECH = "slack:UTECH1"


class ScriptedStdin(io.StringIO):
    """Console input; ``hooks[n]`` runs just before the n-th line is read (a technician acting meanwhile)."""

    def __init__(self, lines: list[str], hooks: dict[int, object]) -> None:
        super().__init__("".join(line + "\n" for line in lines))
        self.hooks, self.reads = hooks, 0

    def readline(self, *args: object) -> str:  # type: ignore[override]
        hook = self.hooks.get(self.reads)
        if hook is not None:
            hook()  # type: ignore[operator]
        self.reads += 1
        return super().readline()


@pytest.mark.slow
def test_console_escalation_with_a_real_worker(settings, db):
    from bot.chat import run_chat
    from bot.cli import make_intake
    from bot.console import Console
    from retrieval.ingest import ingest_file

    settings = settings.model_copy(update={"technicians": [TECH]})
    ingest_file(settings=settings, db=db, path=FIXTURES / "spine_tickets.jsonl")
    intake = make_intake(settings, db)
    console = Console(settings=settings, db=db, intake=intake)
    first = console.send("The printer on floor 2 shows E-502 and jams on every page.")  # queued; no worker yet

    def technician_replies() -> None:
        with db.session() as session:
            conversation = desk.conversation_at(session=session, platform="console", channel="console",
                                                thread=console.thread)
            escalation = desk.active_escalation(session=session, conversation_id=conversation.id)
            technician = desk.user_by_key(session=session, key=TECH)
            desk.relay(session=session, settings=settings, escalation_id=escalation.id, sender_id=technician.id,
                       text="Bring the printer's serial number, I'm on my way.",
                       anonymize=intake.anonymize)
            desk.relay(session=session, settings=settings, escalation_id=escalation.id, sender_id=technician.id,
                       text="note: probably the fuser again", anonymize=intake.anonymize)

    stdin = ScriptedStdin(["/escalate the whole line is stopped", "any update?", "/help", "/quit"],
                          hooks={2: technician_replies})
    stdout = io.StringIO()
    assert run_chat(console, settings=settings, stdin=stdin, stdout=stdout) == 0
    out = stdout.getvalue()
    with db.session() as session:
        escalation = session.query(Escalation).one()
        escalation_id = escalation.id
        assert escalation.reason == "the whole line is stopped"
    assert texts.DESK_ESCALATED.format(id=escalation_id) in out
    assert "technician will answer" not in out.lower()
    assert "passed on to the technicians" in out
    assert "Technician: Bring the printer's serial number" in out and "fuser again" not in out

    other = Console(settings=settings, db=db, intake=intake)  # a second employee, no escalation
    worker = WorkerProcess(settings, name="desk", env={"SUPPORTBOT_TECHNICIANS": json.dumps([TECH])})
    try:
        worker.wait_ready(db, timeout=600)
        reply = other.ask("Printer error E-502, paper jams")
        assert reply.status == "answered" and reply.answer
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with db.session() as session:
                relayed = [m for m in session.query(Message).filter(
                    Message.conversation_id == first.conversation_id, Message.role == MessageRole.user)]
                summary = session.get(Escalation, escalation_id).summary
                if all(m.status == MessageStatus.answered for m in relayed) and summary.startswith("Problem:"):
                    break
            time.sleep(0.5)
        with db.session() as session:
            relayed = session.query(Message).filter(
                Message.conversation_id == first.conversation_id, Message.role == MessageRole.user).all()
            assert len(relayed) == 2
            for message in relayed:  # the question queued before /escalate and the one after
                assert message.status == MessageStatus.answered and message.meta.get("relayed_to_desk") is True
                assert answer_for(session=session, message_id=message.id) is None  # no bot answer, ever
            escalation = session.get(Escalation, escalation_id)
            assert escalation.summary.startswith("Problem:") and "E-502" in escalation.summary
            assert escalation.severity == "line stopped"
    finally:
        worker.stop()
