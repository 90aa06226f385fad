"""The escalation desk on Slack and Telegram (issue 12), end to end: real `supportbot slack` and
`supportbot telegram` processes and one real worker serving both, against the local fakes of the
platform APIs.

Per platform: an employee asks -> gets an answer -> presses escalate -> the card is posted on the desk
with its summary, severity and Claim / Resolve -> a non-technician's Claim is refused -> a technician
claims -> replies on the desk -> the employee sees it -> the employee replies -> the desk sees it (the
bot answers nothing in the open escalation) -> the technician resolves with the fix -> the employee is
told -> a second employee's same question cites the new ESC ticket -> `supportbot export` trains on
the fix. Also: the follow-up pings reach the desk thread and the assignee; a technician's own DM
question is answered."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import urllib.parse
from datetime import timedelta

import pytest

from core.conversations import answer_for
from core.db import Database, upgrade
from core.schema import Escalation, EscalationStatus, Message, MessageRole, utcnow
from core.settings import load_settings
from tests.conftest import ROOT, WorkerProcess, free_port, seed_tickets, settings_env
from tests.fake_platforms import (
    BOT_USER,
    SLACK_SECRET,
    SLACK_TOKEN,
    TELEGRAM_BOT_ID,
    TELEGRAM_BOT_NAME,
    TELEGRAM_TOKEN,
    AdapterProcess,
    FakePlatforms,
)

pytestmark = pytest.mark.slow

SLACK_DESK = "C0DESK0001"
SLACK_TECH = "U0TECH0001"
TELEGRAM_DESK = -100999
TELEGRAM_TECH = 601
SLACK_QUESTION = "The shrink wrap tunnel on line 3 shows heater fault H4 and the film stays loose."
SLACK_FIX = "Replaced the heater thermocouple of the shrink tunnel and recalibrated zone 2 to 180 C."
TELEGRAM_QUESTION = "The pallet wrapper on dock 4 stops mid cycle with alarm W17 and the turntable will not turn."
TELEGRAM_FIX = "Cleaned the turntable proximity sensor and re-tensioned the drive chain; alarm W17 cleared."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    fake = FakePlatforms()
    settings = load_settings(data_dir=tmp_path_factory.mktemp("desk") / "data", max_new_tokens=12)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    env = {
        "SUPPORTBOT_SLACK_BOT_TOKEN": SLACK_TOKEN,
        "SUPPORTBOT_SLACK_SIGNING_SECRET": SLACK_SECRET,
        "SUPPORTBOT_SLACK_API_URL": fake.slack_url,
        "SUPPORTBOT_SLACK_DESK_CHANNEL": SLACK_DESK,
        "SUPPORTBOT_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
        "SUPPORTBOT_TELEGRAM_API_URL": fake.telegram_url,
        "SUPPORTBOT_TELEGRAM_DESK_CHAT": str(TELEGRAM_DESK),
        "SUPPORTBOT_TECHNICIANS": json.dumps([f"slack:{SLACK_TECH}", f"telegram:{TELEGRAM_TECH}"]),
        "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0",
    }
    worker = WorkerProcess(settings, name="desk-platforms", env=env)
    port = free_port()
    slack = AdapterProcess(["slack", "--port", str(port)], settings=settings, env=env, name="desk-slack")
    telegram = AdapterProcess(["telegram"], settings=settings, env=env, name="desk-telegram")
    try:
        slack.wait_http(port)
        worker.wait_ready(db, timeout=900)
        fake.wait_for("getUpdates", timeout=600)
        yield settings, db, fake, port, env
    finally:
        for process in (slack, telegram):
            process.stop()
        worker.stop()
        fake.close()


def wait_until(check, timeout: float = 120.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def escalation_row(db: Database, escalation_id: int) -> Escalation:
    with db.session() as session:
        row = session.get(Escalation, escalation_id)
        session.expunge(row)
        return row


def exported_target(settings, tmp_path, question: str) -> str:  # type: ignore[no-untyped-def]
    """`supportbot export`: the weighted assistant turn that follows ``question``."""
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "bot.cli", "export", "--out", str(out), "--json"],
                            env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for path in out.glob("*.jsonl") for line in path.read_text().splitlines() if line]
    mine = [r for r in rows if "messages" in r and any(question[:40] in m["content"] for m in r["messages"])]
    assert len(mine) == 1, [r.get("messages") for r in rows]
    turns = mine[0]["messages"]
    at = next(i for i, m in enumerate(turns) if m["role"] == "user" and question[:40] in m["content"])
    return next(m["content"] for m in turns[at + 1:] if m["role"] == "assistant" and m.get("weight"))


def pings_for(settings, db: Database, escalation_id: int, env: dict[str, str], **moved) -> None:  # type: ignore[no-untyped-def]
    """Move an escalation's clock back and run the beat's ping job here (its delivery is the worker's
    code against the fakes; the beat itself is not started in tests)."""
    from pydantic import SecretStr

    from workers.desk_tasks import deliver_ping, due_pings

    local = settings.model_copy(update={
        "slack_bot_token": SecretStr(env["SUPPORTBOT_SLACK_BOT_TOKEN"]), "slack_api_url": env["SUPPORTBOT_SLACK_API_URL"],
        "telegram_bot_token": SecretStr(env["SUPPORTBOT_TELEGRAM_BOT_TOKEN"]),
        "telegram_api_url": env["SUPPORTBOT_TELEGRAM_API_URL"],
        "slack_desk_channel": SLACK_DESK, "telegram_desk_chat": str(TELEGRAM_DESK),
        "escalation_ping_after_s": 600.0, "escalation_remind_after_s": 3600.0})
    with db.session() as session:
        row = session.get(Escalation, escalation_id)
        for field, delta in moved.items():
            setattr(row, field, utcnow() - delta)
    with db.session() as session:
        pings = [p for p in due_pings(session=session, settings=local) if p.escalation_id == escalation_id]
    assert len(pings) == 1
    assert deliver_ping(db=db, settings=local, ping=pings[0])


# --- Slack ------------------------------------------------------------------------------------------

_event_ids = itertools.count(1)


def slack_post(port: int, body: str, content_type: str) -> tuple[int, str]:
    import hashlib
    import hmac
    import urllib.error
    import urllib.request

    stamp = str(int(time.time()))
    digest = hmac.new(SLACK_SECRET.encode(), f"v0:{stamp}:{body}".encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=body.encode(), headers={
        "Content-Type": content_type, "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def slack_event(port: int, payload: dict) -> None:
    body = json.dumps({"type": "event_callback", "team_id": "T0TEAM", "event_id": f"EvD{next(_event_ids):05d}",
                       "event": payload})
    assert slack_post(port, body, "application/json")[0] == 200


def slack_interaction(port: int, payload: dict) -> str:
    body = "payload=" + urllib.parse.quote(json.dumps(payload))
    status, text = slack_post(port, body, "application/x-www-form-urlencoded")
    assert status == 200
    return text


def slack_ts() -> str:
    return f"{time.time():.6f}"


def blocks_of(payload: dict) -> list[dict]:
    blocks = payload.get("blocks")
    return json.loads(blocks) if isinstance(blocks, str) else (blocks or [])


def press(port: int, action_id: str, value: str, user: str, channel: str, ts: str) -> None:
    slack_interaction(port, {
        "type": "block_actions", "user": {"id": user}, "trigger_id": "123.456.desk", "team": {"id": "T0TEAM"},
        "container": {"type": "message", "channel_id": channel, "message_ts": ts},
        "channel": {"id": channel}, "message": {"ts": ts},
        "actions": [{"action_id": action_id, "block_id": "x", "value": value, "type": "button"}],
    })


def slack_ask(fake: FakePlatforms, port: int, *, user: str, channel: str, text: str, dm: bool = False) -> tuple[str, dict]:
    """A question; returns its ts and the chat.update that put the answer (with buttons) in place."""
    question_ts = slack_ts()
    if dm:
        slack_event(port, {"type": "message", "channel_type": "im", "user": user, "channel": channel,
                           "ts": question_ts, "text": text})
    else:
        slack_event(port, {"type": "app_mention", "user": user, "channel": channel, "ts": question_ts,
                           "text": f"<@{BOT_USER}> {text}"})
    placeholder = fake.wait_for("chat.postMessage", timeout=120, where=lambda p: p.get("channel") == channel
                                and p.get("thread_ts") == question_ts and "Working on it" in p.get("text", ""))[0]["_ts"]
    update = fake.wait_for("chat.update", timeout=300, where=lambda p: p.get("channel") == channel
                           and p.get("ts") == placeholder and "rate_good" in json.dumps(p.get("blocks")))[0]
    return question_ts, {**update, "_placeholder": placeholder}


def in_thread(fake: FakePlatforms, channel: str, thread: str, contains: str) -> list[dict]:
    return [p for p in fake.posted("chat.postMessage")
            if p.get("channel") == channel and p.get("thread_ts") == thread and contains in p.get("text", "")]


def test_slack_desk_end_to_end(stack, tmp_path):
    settings, db, fake, port, env = stack
    floor = "C0FLOOR001"
    question_ts, answer = slack_ask(fake, port, user="U0EMPLOY01", channel=floor, text=SLACK_QUESTION)
    reply_id = next(b for b in blocks_of(answer) if b["type"] == "actions")["elements"][0]["value"]
    press(port, "escalate", reply_id, "U0EMPLOY01", floor, answer["_placeholder"])

    # The desk card: summary, severity, the link back, Claim / Resolve.
    card = fake.wait_for("chat.postMessage", timeout=180, where=lambda p: p.get("channel") == SLACK_DESK
                         and "claim" in json.dumps(p.get("blocks")))[0]
    card_ts = card["_ts"]
    actions = next(b for b in blocks_of(card) if b["type"] == "actions")
    assert [e["action_id"] for e in actions["elements"]] == ["claim", "resolve"]
    escalation_id = int(actions["elements"][0]["value"])
    assert "H4" in json.dumps(blocks_of(card)) and f"archives/{floor}/p" in json.dumps(blocks_of(card))
    summarized = fake.wait_for("chat.update", timeout=180, where=lambda p: p.get("channel") == SLACK_DESK
                               and p.get("ts") == card_ts and "Problem:" in p.get("text", "")
                               and "not estimated" not in p.get("text", ""))[-1]
    assert "Severity: " in summarized["text"]
    with db.session() as session:
        row = session.get(Escalation, escalation_id)
        assert (row.tech_channel, row.tech_thread, row.desk_message_ref) == (SLACK_DESK, card_ts, card_ts)

    # Nobody claimed it: the ping goes to the desk thread.
    pings_for(settings, db, escalation_id, env, created_at=timedelta(minutes=20))
    assert in_thread(fake, SLACK_DESK, card_ts, f"Escalation #{escalation_id} has been waiting")

    # A non-technician's Claim is refused, saying why; the escalation stays open.
    press(port, "claim", str(escalation_id), "U0EMPLOY02", SLACK_DESK, card_ts)
    refusal = fake.wait_for("chat.postEphemeral", timeout=60, where=lambda p: p.get("user") == "U0EMPLOY02")[0]
    assert "technician" in refusal["text"]
    assert escalation_row(db, escalation_id).status == EscalationStatus.open

    # The technician claims it: the employee is told, the card shows who.
    press(port, "claim", str(escalation_id), SLACK_TECH, SLACK_DESK, card_ts)
    fake.wait_for("chat.postMessage", timeout=60, where=lambda p: p.get("channel") == floor
                  and p.get("thread_ts") == question_ts and "A technician has taken" in p.get("text", ""))
    assert escalation_row(db, escalation_id).status == EscalationStatus.claimed
    fake.wait_for("chat.update", timeout=60, where=lambda p: p.get("ts") == card_ts and f"<@{SLACK_TECH}>"
                  in json.dumps(p.get("blocks")))
    pings_for(settings, db, escalation_id, env, created_at=timedelta(hours=6), claimed_at=timedelta(hours=5),
              updated_at=timedelta(hours=5), last_ping_at=timedelta(hours=5))
    assert fake.wait_for("chat.postMessage", timeout=30, where=lambda p: p.get("channel") == SLACK_TECH
                         and "Reminder" in p.get("text", ""))

    # Technician -> employee, through the desk thread; a note stays on the desk.
    slack_event(port, {"type": "message", "channel_type": "channel", "user": SLACK_TECH, "channel": SLACK_DESK,
                       "ts": slack_ts(), "thread_ts": card_ts, "text": "note: probably the thermocouple again"})
    slack_event(port, {"type": "message", "channel_type": "channel", "user": SLACK_TECH, "channel": SLACK_DESK,
                       "ts": slack_ts(), "thread_ts": card_ts, "text": "Does the H4 light blink or stay on?"})
    relayed = fake.wait_for("chat.postMessage", timeout=60, where=lambda p: p.get("channel") == floor
                            and p.get("thread_ts") == question_ts and "H4 light" in p.get("text", ""))[0]
    assert relayed["text"].startswith("Technician:")
    # A technician writing in the employee's thread is not answered as a question either.
    slack_event(port, {"type": "message", "channel_type": "channel", "user": SLACK_TECH, "channel": floor,
                       "ts": slack_ts(), "thread_ts": question_ts, "text": "Checking the tunnel now."})

    # Employee -> desk: relayed, never answered by the bot.
    follow_up_ts = slack_ts()
    slack_event(port, {"type": "message", "channel_type": "channel", "user": "U0EMPLOY01", "channel": floor,
                       "ts": follow_up_ts, "thread_ts": question_ts, "text": "It blinks twice, then stays on."})
    to_desk = fake.wait_for("chat.postMessage", timeout=180, where=lambda p: p.get("channel") == SLACK_DESK
                            and p.get("thread_ts") == card_ts and "blinks twice" in p.get("text", ""))[0]
    assert f"escalation #{escalation_id}" in to_desk["text"]
    # Another employee writing in the escalated thread is not answered either: their text reaches the desk.
    slack_event(port, {"type": "message", "channel_type": "channel", "user": "U0EMPLOY03", "channel": floor,
                       "ts": slack_ts(), "thread_ts": question_ts, "text": "Same on line 4, the film is loose too."})
    colleague = fake.wait_for("chat.postMessage", timeout=180, where=lambda p: p.get("channel") == SLACK_DESK
                              and p.get("thread_ts") == card_ts and "line 4" in p.get("text", ""))[0]
    assert colleague["text"].startswith(f"Another employee in the thread of escalation #{escalation_id}")
    time.sleep(2.0)
    assert not in_thread(fake, floor, question_ts, "Working on it")[1:]  # only the first question's placeholder
    assert not [p for p in fake.posted("chat.update") if p.get("channel") == floor and "line 4" in json.dumps(p)]
    assert not any("thermocouple again" in p.get("text", "") for p in fake.posted("chat.postMessage")
                   if p.get("channel") == floor)
    with db.session() as session:
        employee_msg = session.query(Message).filter(Message.idempotency_key == f"slack:{floor}:{follow_up_ts}").one()
        assert employee_msg.meta.get("relayed_to_desk") and answer_for(session=session, message_id=employee_msg.id) is None
        technician_turns = session.query(Message).filter(Message.role == MessageRole.technician).all()
        assert [m.text for m in technician_turns] == ["Does the H4 light blink or stay on?"]

    # Resolve: the modal, then the fix becomes ticket ESC-<id> and the employee is asked to confirm.
    press(port, "resolve", str(escalation_id), SLACK_TECH, SLACK_DESK, card_ts)
    view = fake.wait_for("views.open", timeout=60, where=lambda p: "desk_resolve" in json.dumps(p.get("view")))[-1]["view"]
    view = json.loads(view) if isinstance(view, str) else view
    assert [b["block_id"] for b in view["blocks"]] == ["resolution", "hours", "machine"]

    def submit(resolution: str, hours: str) -> str:
        return slack_interaction(port, {"type": "view_submission", "user": {"id": SLACK_TECH}, "team": {"id": "T0TEAM"},
                                        "view": {**view, "id": "V2", "state": {"values": {
                                            "resolution": {"resolution": {"type": "plain_text_input", "value": resolution}},
                                            "hours": {"hours": {"type": "plain_text_input", "value": hours}},
                                            "machine": {"machine": {"type": "plain_text_input", "value": "Shrink tunnel"}}}}}})

    assert "Hours must be a number" in submit(SLACK_FIX, "two")  # said in the form; nothing is stored
    assert escalation_row(db, escalation_id).status == EscalationStatus.claimed
    submit(SLACK_FIX, "1.5")
    told = fake.wait_for("chat.postMessage", timeout=300, where=lambda p: p.get("channel") == floor
                         and p.get("thread_ts") == question_ts and "resolved escalation" in p.get("text", ""))[0]
    assert "thermocouple" in told["text"] and "Did it work?" in told["text"]
    done = escalation_row(db, escalation_id)
    assert done.status == EscalationStatus.resolved and done.ticket_id == f"ESC-{escalation_id}"
    assert done.resolution_hours == 1.5
    fake.wait_for("chat.postMessage", timeout=60, where=lambda p: p.get("thread_ts") == card_ts
                  and f"ESC-{escalation_id}" in p.get("text", ""))

    # The next employee asking the same thing gets an answer citing the technician's ticket.
    _, second = slack_ask(fake, port, user="U0EMPLOY02", channel="C0FLOOR002", text=SLACK_QUESTION)
    assert f"ESC-{escalation_id}" in json.dumps([b for b in blocks_of(second) if b["type"] == "context"])

    # A technician's own question, in a DM, is answered, with every matching ticket, its repair and hours.
    _, own = slack_ask(fake, port, user=SLACK_TECH, channel="D0TECH0001", text="Printer error E-502, paper jams",
                       dm=True)
    assert "All matching tickets (" in own["text"] and "Repair: " in own["text"]

    # The export trains on the fix as the answer to the first conversation.
    assert "thermocouple" in exported_target(settings, tmp_path, SLACK_QUESTION)


# --- Telegram ---------------------------------------------------------------------------------------

_update_ids = itertools.count(5000)
_message_ids = itertools.count(700)
BOT = {"id": TELEGRAM_BOT_ID, "is_bot": True, "first_name": "supportbot", "username": TELEGRAM_BOT_NAME}
DESK_CHAT = {"id": TELEGRAM_DESK, "type": "supergroup", "title": "Desk"}


def tg_user(uid: int) -> dict:
    return {"id": uid, "is_bot": False, "first_name": f"Person{uid}"}


def tg_private(uid: int) -> dict:
    return {"id": uid, "type": "private", "first_name": f"Person{uid}"}


def tg_message(chat: dict, sender: int, text: str, **extra) -> dict:
    body = {"message_id": next(_message_ids), "date": int(time.time()), "chat": chat, "from": tg_user(sender),
            "text": text, **extra}
    if text.startswith("/"):
        body["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return body


def tg_push(fake: FakePlatforms, payload: dict, kind: str = "message") -> dict:
    fake.push_update({"update_id": next(_update_ids), kind: payload})
    return payload


GROUP_CHAT = {"id": -100777, "type": "supergroup", "title": "Plant floor"}


def bot_message(payload: dict) -> dict:
    """The message the bot sent with this sendMessage call, as a reply's reply_to_message carries it."""
    chat_id = int(payload["chat_id"])
    chat = {TELEGRAM_DESK: DESK_CHAT, GROUP_CHAT["id"]: GROUP_CHAT}.get(chat_id) or tg_private(chat_id)
    return {"message_id": int(payload["_message_id"]), "date": int(time.time()), "from": BOT, "text": payload["text"],
            "chat": chat}


def markup(payload: dict) -> dict:
    value = payload.get("reply_markup")
    return (json.loads(value) if isinstance(value, str) else value) or {}


def sent_to(fake: FakePlatforms, chat_id: int, contains: str, timeout: float = 120.0, count: int = 1) -> list[dict]:
    return fake.wait_for("sendMessage", count=count, timeout=timeout,
                         where=lambda p: int(p["chat_id"]) == chat_id and contains in p.get("text", ""))


def tg_press(fake: FakePlatforms, user: int, data: str, message: dict) -> str:
    query_id = f"cq{next(_update_ids)}"
    tg_push(fake, {"id": query_id, "from": tg_user(user), "chat_instance": "ci", "data": data, "message": message},
            kind="callback_query")
    return query_id


def answered_query(fake: FakePlatforms, query_id: str) -> dict:
    return fake.wait_for("answerCallbackQuery", timeout=60, where=lambda p: p.get("callback_query_id") == query_id)[0]


def tg_ask(fake: FakePlatforms, uid: int, text: str) -> dict:
    """A private question; returns the answer's sendMessage (with the rating keyboard)."""
    question = tg_push(fake, tg_message(tg_private(uid), uid, text))

    def answer(p: dict) -> bool:
        parameters = p.get("reply_parameters")
        parameters = json.loads(parameters) if isinstance(parameters, str) else parameters
        return (int(p["chat_id"]) == uid and bool(parameters) and int(parameters["message_id"]) == question["message_id"]
                and bool(markup(p)))

    return fake.wait_for("sendMessage", timeout=300, where=answer)[-1]


def test_telegram_desk_end_to_end(stack, tmp_path):
    settings, db, fake, _port, env = stack
    employee, colleague = 501, 502
    answer = tg_ask(fake, employee, TELEGRAM_QUESTION)
    escalate = next(b["callback_data"] for row in markup(answer)["inline_keyboard"] for b in row
                    if b["callback_data"].startswith("esc:"))
    tg_press(fake, employee, escalate, bot_message(answer))

    # The desk card in the desk chat: summary, severity, Claim / Resolve.
    card = fake.wait_for("sendMessage", timeout=180, where=lambda p: int(p["chat_id"]) == TELEGRAM_DESK
                         and "claim:" in json.dumps(markup(p)))[0]
    buttons = [b["callback_data"] for row in markup(card)["inline_keyboard"] for b in row]
    escalation_id = int(buttons[0].split(":")[1])
    assert buttons == [f"claim:{escalation_id}", f"resolve:{escalation_id}"]
    assert "W17" in card["text"] and f"Escalation #{escalation_id}" in card["text"]
    card_id = int(card["_message_id"])
    fake.wait_for("editMessageText", timeout=180, where=lambda p: int(p.get("message_id", 0)) == card_id
                  and "Problem:" in p.get("text", "") and "not estimated" not in p.get("text", ""))
    card_message = bot_message(card)

    pings_for(settings, db, escalation_id, env, created_at=timedelta(minutes=20))
    sent_to(fake, TELEGRAM_DESK, f"Escalation #{escalation_id} has been waiting", timeout=30)

    # A non-technician's Claim is refused with the reason; the technician's is taken.
    refused = answered_query(fake, tg_press(fake, colleague, f"claim:{escalation_id}", card_message))
    assert "technician" in refused.get("text", "") and refused.get("show_alert") in (True, "true", "True")
    assert escalation_row(db, escalation_id).status == EscalationStatus.open
    tg_press(fake, TELEGRAM_TECH, f"claim:{escalation_id}", card_message)
    sent_to(fake, employee, "A technician has taken", timeout=60)
    assert escalation_row(db, escalation_id).status == EscalationStatus.claimed

    # Technician -> employee: a reply to the card on the desk; a note stays there.
    tg_push(fake, tg_message(DESK_CHAT, TELEGRAM_TECH, "note: sensor probably dirty", reply_to_message=card_message))
    tg_push(fake, tg_message(DESK_CHAT, TELEGRAM_TECH, "Is the turntable sensor LED lit?", reply_to_message=card_message))
    relayed = sent_to(fake, employee, "turntable sensor LED", timeout=60)[0]
    assert relayed["text"].startswith("Technician:")

    # Employee -> desk: relayed, never answered.
    follow_up = tg_push(fake, tg_message(tg_private(employee), employee, "The LED is off, there is dust on it."))
    to_desk = sent_to(fake, TELEGRAM_DESK, "dust on it", timeout=180)[0]
    assert f"escalation #{escalation_id}" in to_desk["text"]
    time.sleep(2.0)
    with db.session() as session:
        row = session.query(Message).filter(
            Message.idempotency_key == f"telegram:{employee}:{follow_up['message_id']}").one()
        assert row.meta.get("relayed_to_desk") and answer_for(session=session, message_id=row.id) is None
    assert not any("sensor probably dirty" in p.get("text", "") for p in fake.posted("sendMessage")
                   if int(p["chat_id"]) == employee)

    # Resolve: the guided reply (the bot asks, the technician replies with the fix).
    tg_press(fake, TELEGRAM_TECH, f"resolve:{escalation_id}", card_message)
    prompt = sent_to(fake, TELEGRAM_DESK, f"Resolution for escalation #{escalation_id}", timeout=60)[0]
    assert markup(prompt).get("force_reply")
    tg_push(fake, tg_message(DESK_CHAT, TELEGRAM_TECH, TELEGRAM_FIX, reply_to_message=bot_message(prompt)))
    told = sent_to(fake, employee, "resolved escalation", timeout=300)[0]
    assert "proximity sensor" in told["text"] and "Did it work?" in told["text"]
    done = escalation_row(db, escalation_id)
    assert done.status == EscalationStatus.resolved and done.ticket_id == f"ESC-{escalation_id}"

    # A colleague's same question cites the technician's ticket.
    second = tg_ask(fake, colleague, TELEGRAM_QUESTION)
    assert f"ESC-{escalation_id}" in second["text"]

    # A technician's own DM question is answered.
    tg_ask(fake, TELEGRAM_TECH, "Printer error E-502, paper jams")

    assert "proximity sensor" in exported_target(settings, tmp_path, TELEGRAM_QUESTION)


def test_telegram_group_escalation_keeps_the_bot_out(stack):
    """In a group: the employee's reply to the technician's relayed message goes to the desk (it is not
    a new question), and a technician replying to the bot's answer there is not answered."""
    settings, db, fake, _port, env = stack
    employee = 503
    question = tg_push(fake, tg_message(GROUP_CHAT, employee, f"@{TELEGRAM_BOT_NAME} The conveyor belt on line 5 "
                                        "squeals loudly at start-up and slips under load."))

    def answer_to(message_id: int):  # type: ignore[no-untyped-def]
        def check(p: dict) -> bool:
            parameters = p.get("reply_parameters")
            parameters = json.loads(parameters) if isinstance(parameters, str) else parameters
            return int(p["chat_id"]) == GROUP_CHAT["id"] and bool(parameters) and int(parameters["message_id"]) == message_id
        return check

    answer = fake.wait_for("sendMessage", timeout=300, where=lambda p: answer_to(question["message_id"])(p)
                           and bool(markup(p)))[-1]
    escalate = next(b["callback_data"] for row in markup(answer)["inline_keyboard"] for b in row
                    if b["callback_data"].startswith("esc:"))
    tg_press(fake, employee, escalate, bot_message(answer))
    card = fake.wait_for("sendMessage", timeout=180, where=lambda p: int(p["chat_id"]) == TELEGRAM_DESK
                         and "squeals" in p.get("text", "") and "claim:" in json.dumps(markup(p)))[0]
    tg_push(fake, tg_message(DESK_CHAT, TELEGRAM_TECH, "Which belt tensioner model is fitted?",
                             reply_to_message=bot_message(card)))
    relayed = sent_to(fake, GROUP_CHAT["id"], "belt tensioner model", timeout=60)[0]
    tg_push(fake, tg_message(GROUP_CHAT, employee, "It is the TX-40 tensioner.", reply_to_message=bot_message(relayed)))
    assert sent_to(fake, TELEGRAM_DESK, "TX-40", timeout=180)
    watching = tg_push(fake, tg_message(GROUP_CHAT, TELEGRAM_TECH, "I am on my way with a new belt.",
                                        reply_to_message=bot_message(answer)))
    # /resolve as a reply to the card: the employee is told in their group thread.
    tg_push(fake, tg_message(DESK_CHAT, TELEGRAM_TECH, "/resolve Replaced the TX-40 tensioner spring and the belt.",
                             reply_to_message=bot_message(card)))
    told = sent_to(fake, GROUP_CHAT["id"], "resolved escalation", timeout=300)[0]
    assert "TX-40 tensioner spring" in told["text"]
    assert not [p for p in fake.posted("sendMessage") if answer_to(watching["message_id"])(p)]
    with db.session() as session:
        assert session.query(Message).filter(
            Message.idempotency_key == f"telegram:{GROUP_CHAT['id']}:{watching['message_id']}").count() == 0
        for extra in session.query(Message).filter(Message.role == MessageRole.user, Message.idempotency_key.like(
                f"telegram:{GROUP_CHAT['id']}:%")).all():
            assert answer_for(session=session, message_id=extra.id) is None or extra.idempotency_key.endswith(
                f":{question['message_id']}")
