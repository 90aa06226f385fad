"""A conversation holds only its own turns: naming another user's thread (a colleague in a Slack
thread, the console's --thread) gives a conversation of one's own, never a look at someone else's."""

from __future__ import annotations

from bot.console import Console
from bot.intake import Intake
from core.conversations import history, platform_thread
from core.feedback import escalate_conversation
from core.schema import Conversation, Message
from core.types import Inbound


def _intake(settings, db, queued: list[int]) -> Intake:  # type: ignore[no-untyped-def]
    # The anonymizer is not what this test is about; storing and keying conversations is.
    return Intake(settings=settings, db=db, anonymize=lambda text, scope: text, enqueue=queued.append)


def test_another_user_naming_a_thread_gets_a_conversation_of_their_own(env):
    settings, db = env
    queued: list[int] = []
    intake = _intake(settings, db, queued)
    first = intake.receive(Inbound("slack", "C1", "1700.1", "U_ALICE", "my badge 4471 does not open door 3", "e1"))
    second = intake.receive(Inbound("slack", "C1", "1700.1", "U_BOB", "the printer jams", "e2"))
    again = intake.receive(Inbound("slack", "C1", "1700.1", "U_BOB", "still jams", "e3"))
    assert first.conversation_id != second.conversation_id
    assert again.conversation_id == second.conversation_id  # Bob's own conversation continues
    with db.session() as session:
        bob = session.get(Conversation, second.conversation_id)
        assert platform_thread(bob.thread) == "1700.1"  # replies still go to the same Slack thread
        turns = history(session=session, conversation_id=bob.id, before_id=again.message_id + 1, turns=10)
        assert [m.text for m in turns] == ["the printer jams", "still jams"]
        assert all("badge" not in m.text for m in turns)


def test_console_thread_cannot_join_another_users_conversation(env, monkeypatch):
    settings, db = env
    intake = _intake(settings, db, [])
    owner = Console(settings=settings, db=db, intake=intake, thread="shared-name")
    owner.user = "u-owner"
    mine = owner.send("my laptop password is expired")
    other = Console(settings=settings, db=db, intake=intake, thread="shared-name")
    other.user = "u-other"
    theirs = other.send("what did the previous person ask?")
    assert theirs.conversation_id != mine.conversation_id
    assert other.thread != "shared-name"  # it follows its own conversation from now on
    later = other.send("and now?")
    assert later.conversation_id == theirs.conversation_id
    with db.session() as session:
        escalation = escalate_conversation(session=session, conversation_id=theirs.conversation_id)
        assert escalation is not None and escalation.conversation_id == theirs.conversation_id
        owners = {m.conversation_id for m in session.query(Message).filter(Message.text.like("%password%"))}
        assert owners == {mine.conversation_id}
