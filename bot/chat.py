"""The interactive console chat loop."""

from __future__ import annotations

import sys

from bot.console import Console
from core.errors import SupportbotError
from core.settings import Settings

HELP = """Type your problem and press Enter. Commands:
  /good             the last answer helped
  /bad [reason]     the last answer did not help (optionally say why)
  /escalate         hand this conversation to a technician
  /help             this text
  /quit             leave (Ctrl-D works too)"""


def _rate(console: Console, value: str, reason: str | None) -> str:
    if console.last_reply_id is None:
        return "Nothing to rate yet."
    from model.ratings import rate

    with console.db.session() as session:
        rate(session=session, message_id=console.last_reply_id, value=value, reason=reason)
    return "Thanks, noted." if value == "good" else "Thanks, noted. Try /escalate to reach a technician."


def _escalate(console: Console) -> str:
    from core.escalations import open_escalation

    with console.db.session() as session:
        escalation = open_escalation(session=session, platform="console", channel="console", thread=console.thread)
    if escalation is None:
        return "Nothing to escalate yet: ask your question first."
    return f"Escalated (#{escalation.id}). A technician will answer in this conversation."


def run_chat(console: Console, *, settings: Settings, stdin=None, stdout=None) -> int:  # type: ignore[no-untyped-def]
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    say("supportbot: hi! What's broken? (/help for commands)")
    while True:
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
                say(_escalate(console))
            else:
                say("supportbot: (thinking…)")
                reply = console.ask(line)
                say(f"supportbot: {reply.answer}")
        except SupportbotError as err:
            say(f"supportbot: {err}")
