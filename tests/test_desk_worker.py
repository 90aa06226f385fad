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
CONSOLE_TECH = "tech-on-console"


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

    settings = settings.model_copy(update={"technicians": [TECH, f"console:{CONSOLE_TECH}"]})
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
    worker = WorkerProcess(settings, name="desk", env={"SUPPORTBOT_TECHNICIANS": json.dumps(settings.technicians)})
    try:
        worker.wait_ready(db, timeout=600)
        reply = other.ask("Printer error E-502, paper jams")
        assert reply.status == "answered" and reply.answer
        assert texts.TECHNICIAN_TICKETS.split("(")[0] not in reply.answer  # an employee gets the composed answer
        # A technician asking the bot themselves gets every matching ticket with its repair and hours.
        technician = Console(settings=settings, db=db, intake=intake)
        technician.user = CONSOLE_TECH
        tech_reply = technician.ask("Printer error E-502, paper jams")
        assert tech_reply.status == "answered"
        assert texts.TECHNICIAN_TICKETS.split("(")[0] in tech_reply.answer
        assert "[T-100] Printer jams on every page with error E-502 (HP LaserJet M404), 1.5 h" in tech_reply.answer
        assert "Repair: Replaced the fuser roller" in tech_reply.answer
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


def test_technician_view_lists_every_ticket_checked_like_the_employee_answer():
    from core.types import TicketHit
    from workers.compose import Composed, for_technician

    hits = [
        TicketHit(id="T-1", title="Press stops", machine="Press 4", condition="Valve stuck",
                  work_performed="Freed the valve; call +49 30 1234567 or see https://evil.example/x", hours=2.0),
        TicketHit(id="T-2", title="Press slow", condition="Low oil", work_performed="Topped up oil."),
    ]
    out = for_technician(Composed("Free the valve."), hits, question="press 4 stopped",
                         trusted_domains=["wiki.example.com"])
    assert out.text.startswith("Free the valve.\n\nAll matching tickets (2)")
    assert "[T-1] Press stops (Press 4), 2 h\n  Found: Valve stuck\n  Repair: Freed the valve" in out.text
    assert "[T-2] Press slow, time not recorded" in out.text and "Repair: Topped up oil." in out.text
    assert "evil.example" not in out.text and "1234567" not in out.text  # untrusted ticket text is checked
    assert out.flagged and "technician view: 2 tickets" in out.notes
    assert for_technician(Composed("x"), [], question="q").text == "x"  # nothing found: the answer as is


def test_another_employee_in_an_escalated_thread_goes_to_the_desk_not_to_the_model(settings, db):
    from core.conversations import get_or_create_conversation, get_or_create_user

    posts: list[desk.Post] = []
    desk.on_post(posts.append)
    try:
        with db.session() as session:
            owner = get_or_create_user(session=session, platform="slack", external_id="UOWNER")
            colleague = get_or_create_user(session=session, platform="slack", external_id="UCOLL")
            escalated = get_or_create_conversation(session=session, platform="slack", channel="C1", thread="100.1",
                                                   user_id=owner.id)
            session.add(Message(conversation_id=escalated.id, user_id=owner.id, role=MessageRole.user,
                                text="The shrink tunnel shows H4.", idempotency_key="slack:C1:100.1",
                                status=MessageStatus.answered))
            session.flush()
            escalation, _ = desk.escalate(session=session, conversation_id=escalated.id)
            escalation.tech_channel, escalation.tech_thread = "CDESK", "200.1"
            beside = get_or_create_conversation(session=session, platform="slack", channel="C1", thread="100.1",
                                                user_id=colleague.id)
            elsewhere = get_or_create_conversation(session=session, platform="slack", channel="C1", thread="300.1",
                                                   user_id=colleague.id)
            assert beside.id != escalated.id  # the colleague's own conversation, beside the owner's
            assert desk.is_open(session=session, conversation_id=beside.id)  # the adapter posts no placeholder
            assert not desk.is_open(session=session, conversation_id=elsewhere.id)
            said = Message(conversation_id=beside.id, user_id=colleague.id, role=MessageRole.user,
                           text="Same here on line 3, the film is loose too.", idempotency_key="slack:C1:100.2")
            asked = Message(conversation_id=elsewhere.id, user_id=colleague.id, role=MessageRole.user,
                            text="How do I reset my badge?", idempotency_key="slack:C1:300.1")
            session.add_all([said, asked])
            session.flush()
            assert desk.desk_takes(session=session, settings=settings, message=said)
            # A technician writing there is not answered as a question, and nothing of theirs is relayed.
            technician = get_or_create_user(session=session, platform="slack", external_id="UTECHX")
            theirs = get_or_create_conversation(session=session, platform="slack", channel="C1", thread="100.1",
                                                user_id=technician.id)
            checking = Message(conversation_id=theirs.id, user_id=technician.id, role=MessageRole.user,
                               text="Checking the tunnel now.", idempotency_key="slack:C1:100.3")
            session.add(checking)
            session.flush()
            desk_settings = settings.model_copy(update={"technicians": ["slack:UTECHX"]})
            assert desk.desk_takes(session=session, settings=desk_settings, message=checking)
            assert checking.meta == {"technician_in_escalation": True, "escalation_id": escalation.id}
            assert not desk.desk_takes(session=session, settings=settings, message=asked)  # answered as usual
            assert said.status == MessageStatus.answered and said.meta["relayed_to_desk"] is True
            assert said.meta["escalation_id"] == escalation.id and said.conversation_id == beside.id
            escalation_id = escalation.id
    finally:
        desk._sinks.remove(posts.append)
    (post,) = posts
    assert (post.to, post.channel, post.thread) == ("desk", "CDESK", "200.1")
    assert post.text == texts.DESK_FROM_OTHER_EMPLOYEE.format(id=escalation_id,
                                                              text="Same here on line 3, the film is loose too.")
