"""The interactive console chat loop."""

from __future__ import annotations

import logging
import sys

from bot.console import Console
from core.errors import SupportbotError
from core.settings import Settings

log = logging.getLogger(__name__)

HELP = """Type your problem and press Enter. Commands:
  /good             the last answer helped
  /bad [reason]     the last answer did not help (optionally say why)
  /escalate [why]   hand this conversation to the technicians (the bot stops answering it)
  /help             this text
  /quit             leave (Ctrl-D works too)"""


def _rate(console: Console, value: str, reason: str | None) -> str:
    if console.last_reply_id is None:
        return "Nothing to rate yet."
    from model.ratings import rate

    with console.db.session() as session:
        rate(session=session, message_id=console.last_reply_id, value=value, reason=reason)
    return "Thanks, noted." if value == "good" else "Thanks, noted. Try /escalate to reach a technician."


def _escalate(console: Console, reason: str | None = None) -> str:
    """Hand the conversation to the technicians through the desk service, and say exactly what that
    does: the bot stops answering here, messages typed now are passed on, and a technician's replies
    are shown here (``_technician_replies``) once one writes."""
    from core import desk, texts
    from core.errors import DeskError

    with console.db.session() as session:
        conversation = desk.conversation_at(session=session, platform="console", channel="console",
                                            thread=console.thread)
        if conversation is None:
            return texts.DESK_NOTHING_TO_ESCALATE
        try:
            escalation, created = desk.escalate(
                session=session,
                conversation_id=conversation.id,
                reason=reason,
                anonymize=console.intake.anonymize,
            )
        except DeskError as err:
            return str(err)
        escalation_id, status = escalation.id, escalation.status.value
    if not created:
        return texts.DESK_ALREADY_ESCALATED.format(id=escalation_id, status=status)
    _queue_summary(escalation_id)
    return texts.DESK_ESCALATED.format(id=escalation_id)


def _queue_summary(escalation_id: int) -> None:
    """The model's desk summary is written by a worker (bot/ never loads the model); until then the
    escalation carries the employee's questions as its summary."""
    from workers.desk_tasks import enqueue_summary

    try:
        enqueue_summary(escalation_id)
    except Exception as err:  # a broker hiccup must not undo the escalation: it is stored already
        log.warning("escalation %s: summary not queued (%s)", escalation_id, err)


def _active_escalation(console: Console) -> int | None:
    from core import desk

    with console.db.session() as session:
        conversation = desk.conversation_at(session=session, platform="console", channel="console",
                                            thread=console.thread)
        if conversation is None:
            return None
        escalation = desk.active_escalation(session=session, conversation_id=conversation.id)
        return escalation.id if escalation is not None else None


def _technician_replies(console: Console, after_id: int) -> tuple[list[str], int]:
    """Technician messages relayed into this conversation since ``after_id`` (notes are never shown)."""
    from sqlalchemy import select

    from core import desk, texts
    from core.schema import Message, MessageRole

    with console.db.session() as session:
        conversation = desk.conversation_at(session=session, platform="console", channel="console",
                                            thread=console.thread)
        if conversation is None:
            return [], after_id
        rows = list(session.scalars(
            select(Message).where(Message.conversation_id == conversation.id, Message.id > after_id,
                                  Message.role == MessageRole.technician).order_by(Message.id)
        ))
        newest = max([after_id, *(m.id for m in rows)])
        return [texts.DESK_FROM_TECHNICIAN.format(text=m.text) for m in rows], newest


def run_chat(console: Console, *, settings: Settings, stdin=None, stdout=None) -> int:  # type: ignore[no-untyped-def]
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    say("supportbot: hi! What's broken? (/help for commands)")
    seen = 0
    while True:
        replies, seen = _technician_replies(console, seen)
        for reply in replies:
            say(reply)
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            say("")
            return 0
        line = line.rstrip("\n")
        command, _, rest = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                say(HELP)
            elif command == "/good":
                say(_rate(console, "good", None))
            elif command == "/bad":
                say(_rate(console, "bad", rest.strip() or None))
            elif command == "/escalate":
                say(_escalate(console, rest.strip() or None))
            elif _active_escalation(console) is not None:
                # With the technicians: stored and relayed by the worker, never answered by the bot.
                receipt = console.send(line)
                say(f"supportbot: passed on to the technicians (message {receipt.message_id}).")
            else:
                say("supportbot: (thinking…)")
                reply = console.ask(line)
                say(f"supportbot: {reply.answer}")
        except SupportbotError as err:
            say(f"supportbot: {err}")
