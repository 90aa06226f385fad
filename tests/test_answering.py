"""Answer composition: sources and fix time never depend on the model; an echo is replaced by the ticket's fix."""

from core.types import TicketHit
from workers.answering import compose, is_echo

HIT = TicketHit(id="SB-1", title="Label printer prints blank", work_performed="Replaced the ribbon.", hours=0.5, score=0.9)
QUESTION = "The label printer in shipping prints blank labels"


def test_echo_is_detected():
    assert is_echo(QUESTION, QUESTION)
    assert is_echo("", QUESTION)
    assert not is_echo("Replace the thermal ribbon and recalibrate the media sensor.", QUESTION)


def test_echo_becomes_the_tickets_fix():
    text = compose(QUESTION, [HIT], 0.5, question=QUESTION)
    assert text.startswith("The same problem was solved before (SB-1")
    assert "Replaced the ribbon." in text


def test_sources_and_fix_time_follow_the_answer():
    text = compose("Replace the ribbon, then recalibrate.", [HIT], 0.5, question=QUESTION)
    assert text.splitlines()[0] == "Replace the ribbon, then recalibrate."
    assert "Sources: [SB-1] Label printer prints blank" in text
    assert text.endswith("Estimated fix time: about 0.5 h")


def test_no_tickets_no_sources():
    assert compose("Try restarting.", [], None, question=QUESTION) == "Try restarting."
