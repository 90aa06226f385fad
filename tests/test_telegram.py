"""The Telegram adapter as a real `supportbot telegram` process (long polling, and webhook mode) with
a real worker, against a local fake of the Bot API. Each Telegram scenario of issue 11's "Why" list
has a test here."""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request

import pytest

from bot.telegram.render import MESSAGE_LIMIT, answer_parts, utf16_len
from core.db import Database, upgrade
from core.schema import Conversation, Escalation, Message, MessageRole, MessageStatus, Rating
from core.settings import load_settings
from core.types import ConversationRef, Reply
from tests.conftest import WorkerProcess, free_port, seed_tickets
from tests.fake_platforms import TELEGRAM_BOT_ID, TELEGRAM_TOKEN, AdapterProcess, FakePlatforms

QUESTION = "Our printer keeps jamming on every page and shows error E-502."
SECRET = "s3cret-" + "x" * 24
QUIET_S = 30  # long enough for a loaded test machine, short enough to wait out once
pytestmark = pytest.mark.slow

_update_ids = itertools.count(1000)
_message_ids = itertools.count(100)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    fake = FakePlatforms()
    settings = load_settings(data_dir=tmp_path_factory.mktemp("telegram") / "data", max_new_tokens=12)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    env = {
        "SUPPORTBOT_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
        "SUPPORTBOT_TELEGRAM_API_URL": fake.telegram_url,
        "SUPPORTBOT_TELEGRAM_QUIET_PERIOD_S": str(QUIET_S),
        "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0",
    }
    worker = WorkerProcess(settings, name="telegram", env=env)
    polling = AdapterProcess(["telegram"], settings=settings, env=env, name="telegram-polling")
    hook_port = free_port()
    webhook = AdapterProcess(["telegram"], settings=settings, name="telegram-webhook", env={
        **env,
        "SUPPORTBOT_TELEGRAM_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/telegram",
        "SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET": SECRET,
        "SUPPORTBOT_TELEGRAM_WEBHOOK_LISTEN": "127.0.0.1",
        "SUPPORTBOT_TELEGRAM_WEBHOOK_PORT": str(hook_port),
    })
    try:
        worker.wait_ready(db, timeout=900)
        fake.wait_for("getUpdates", timeout=600)  # the polling adapter is up
        fake.wait_for("setWebhook", timeout=600)
        yield settings, db, fake, hook_port
    finally:
        polling.stop()
        webhook.stop()
        worker.stop()
        fake.close()


def user(uid: int) -> dict:
    return {"id": uid, "is_bot": False, "first_name": f"Employee{uid}"}


def private(uid: int) -> dict:
    return {"id": uid, "type": "private", "first_name": f"Employee{uid}"}


GROUP = {"id": -100777, "type": "supergroup", "title": "IT help"}
FORUM = {"id": -100888, "type": "supergroup", "title": "Plant floor", "is_forum": True}


def message(chat: dict, sender: int, text: str | None = None, **extra) -> dict:
    body = {"message_id": next(_message_ids), "date": int(time.time()), "chat": chat, "from": user(sender), **extra}
    if text is not None:
        body["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            body["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
    return body


def push(fake: FakePlatforms, payload: dict, kind: str = "message") -> dict:
    fake.push_update({"update_id": next(_update_ids), kind: payload})
    return payload


def replies_to(fake: FakePlatforms, chat_id: int, message_id: int, timeout: float = 300.0, count: int = 1) -> list[dict]:
    def matches(p: dict) -> bool:
        parameters = p.get("reply_parameters")
        parameters = json.loads(parameters) if isinstance(parameters, str) else parameters
        return int(p["chat_id"]) == chat_id and bool(parameters) and int(parameters["message_id"]) == message_id

    return fake.wait_for("sendMessage", where=matches, timeout=timeout, count=count)


def keyboard(payload: dict) -> dict | None:
    markup = payload.get("reply_markup")
    return json.loads(markup) if isinstance(markup, str) else markup


def sent_message_id(fake: FakePlatforms, payload: dict) -> int:
    """The id the fake gave the message this sendMessage call created."""
    return int(payload["_message_id"])


def question_row(db: Database, chat_id: int, message_id: int) -> Message:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with db.session() as session:
            row = session.query(Message).filter(Message.idempotency_key == f"telegram:{chat_id}:{message_id}").first()
            if row is not None:
                session.expunge(row)
                return row
        time.sleep(0.1)
    raise AssertionError(f"message {chat_id}:{message_id} was not stored")


def thread_of(db: Database, row: Message) -> str:
    with db.session() as session:
        return session.get(Conversation, row.conversation_id).thread


def test_commands_get_answers_also_addressed_to_the_bot_in_groups(stack):
    settings, db, fake, _ = stack
    for text, expected in (("/start", "Hi!"), ("/help", "/new"), ("/escalate", "nothing to hand over")):
        asked = push(fake, message(private(11), 11, text))
        assert expected in replies_to(fake, 11, asked["message_id"], timeout=90)[0]["text"]
    asked = push(fake, message(GROUP, 12, "/help@supportbot"))
    assert "/new" in replies_to(fake, GROUP["id"], asked["message_id"], timeout=90)[0]["text"]


def test_private_question_is_answered_once_with_keyboard_typing_and_no_second_answer_for_edits(stack):
    settings, db, fake, _ = stack
    asked = message(private(21), 21, QUESTION)
    push(fake, asked)
    push(fake, asked)  # the same update delivered twice
    fake.wait_for("sendChatAction", where=lambda p: int(p["chat_id"]) == 21, timeout=90)
    answer = replies_to(fake, 21, asked["message_id"])[0]
    assert answer.get("parse_mode") == "HTML" and "T-100" in answer["text"]
    buttons = [b["callback_data"] for b in keyboard(answer)["inline_keyboard"][0]]
    assert [b.split(":")[0] for b in buttons] == ["good", "bad", "esc"]
    push(fake, {**asked, "text": QUESTION + " (edited)", "edit_date": int(time.time())}, kind="edited_message")
    time.sleep(2.0)
    assert len(replies_to(fake, 21, asked["message_id"])) == 1


def test_group_answers_only_when_addressed_each_question_its_own_conversation(stack):
    settings, db, fake, _ = stack
    chatter = push(fake, message(GROUP, 31, "lunch at noon?"))
    first = push(fake, message(GROUP, 31, f"@supportbot {QUESTION}",
                               entities=[{"type": "mention", "offset": 0, "length": 11}]))
    second = push(fake, message(GROUP, 32, "@SupportBot the scanner on floor 2 shows a paper jam too"))
    answer = replies_to(fake, GROUP["id"], first["message_id"])[0]
    replies_to(fake, GROUP["id"], second["message_id"])
    time.sleep(1.0)
    assert not [p for p in fake.posted("sendMessage") if "reply_parameters" in p
                and json.loads(p["reply_parameters"]).get("message_id") == chatter["message_id"]]
    one, two = question_row(db, GROUP["id"], first["message_id"]), question_row(db, GROUP["id"], second["message_id"])
    assert one.conversation_id != two.conversation_id  # no shared thread="main" any more
    assert "supportbot" not in one.text.lower() and "<" not in one.text[:3]  # the @handle is gone, not masked
    # A reply to the bot's answer continues that question's conversation.
    follow = push(fake, message(GROUP, 31, "It still jams after cleaning the rollers",
                                reply_to_message={"message_id": sent_message_id(fake, answer), "date": int(time.time()),
                                                  "chat": GROUP, "from": {"id": TELEGRAM_BOT_ID, "is_bot": True,
                                                                          "first_name": "supportbot"}, "text": "…"}))
    replies_to(fake, GROUP["id"], follow["message_id"])
    assert question_row(db, GROUP["id"], follow["message_id"]).conversation_id == one.conversation_id


def test_forum_topics_are_their_own_conversations(stack):
    settings, db, fake, _ = stack
    a = push(fake, message(FORUM, 41, f"@supportbot {QUESTION}", message_thread_id=7, is_topic_message=True))
    b = push(fake, message(FORUM, 41, "@supportbot the badge reader beeps twice", message_thread_id=9,
                           is_topic_message=True))
    reply = replies_to(fake, FORUM["id"], a["message_id"])[0]
    assert int(reply["message_thread_id"]) == 7
    assert thread_of(db, question_row(db, FORUM["id"], a["message_id"])) == "topic7"
    assert thread_of(db, question_row(db, FORUM["id"], b["message_id"])) == "topic9"


def test_private_chat_new_conversation_after_quiet_period_or_new(stack):
    settings, db, fake, _ = stack
    first = push(fake, message(private(51), 51, QUESTION))
    replies_to(fake, 51, first["message_id"])
    again = push(fake, message(private(51), 51, "Which tray should I use?"))
    replies_to(fake, 51, again["message_id"])
    conv = question_row(db, 51, first["message_id"]).conversation_id
    assert question_row(db, 51, again["message_id"]).conversation_id == conv  # a follow-up continues it
    new = push(fake, message(private(51), 51, "/new"))
    replies_to(fake, 51, new["message_id"], timeout=90)
    fresh = push(fake, message(private(51), 51, "The laptop does not charge"))
    replies_to(fake, 51, fresh["message_id"])
    after_new = question_row(db, 51, fresh["message_id"]).conversation_id
    assert after_new != conv
    time.sleep(QUIET_S + 1)
    later = push(fake, message(private(51), 51, "The monitor flickers"))
    replies_to(fake, 51, later["message_id"])
    assert question_row(db, 51, later["message_id"]).conversation_id not in (conv, after_new)


def test_media_without_text_get_help_and_captions_are_read(stack):
    settings, db, fake, _ = stack
    photo = [{"file_id": "p1", "file_unique_id": "u1", "width": 90, "height": 90}]
    for extra in ({"photo": photo},
                  {"sticker": {"file_id": "s1", "file_unique_id": "u2", "width": 512, "height": 512,
                               "is_animated": False, "is_video": False, "type": "regular"}},
                  {"voice": {"file_id": "v1", "file_unique_id": "u3", "duration": 2}}):
        sent = push(fake, message(private(61), 61, **extra))
        assert "only read text" in replies_to(fake, 61, sent["message_id"], timeout=90)[0]["text"]
    captioned = push(fake, message(private(62), 62, photo=photo, caption=QUESTION))
    assert "T-100" in replies_to(fake, 62, captioned["message_id"])[0]["text"]


def test_keyboard_rates_asks_why_with_force_reply_and_escalates(stack):
    settings, db, fake, _ = stack
    asked = push(fake, message(private(71), 71, QUESTION))
    answer = replies_to(fake, 71, asked["message_id"])[0]
    buttons = {b["callback_data"].split(":")[0]: b["callback_data"] for b in keyboard(answer)["inline_keyboard"][0]}
    reply_id = int(buttons["good"].split(":")[1])
    answer_message = {"message_id": sent_message_id(fake, answer), "date": int(time.time()), "chat": private(71),
                      "from": {"id": TELEGRAM_BOT_ID, "is_bot": True, "first_name": "supportbot"}, "text": "answer"}

    def press(data: str, qid: str) -> dict:
        push(fake, {"id": qid, "from": user(71), "chat_instance": "ci", "data": data, "message": answer_message},
             kind="callback_query")
        return fake.wait_for("answerCallbackQuery", where=lambda p: p.get("callback_query_id") == qid, timeout=90)[0]

    assert "👍" in press(buttons["good"], "q1").get("text", "")
    assert "👎" in press(buttons["bad"], "q2").get("text", "")  # pressing again changes the vote
    prompt = fake.wait_for("sendMessage", where=lambda p: "What was wrong" in p.get("text", ""), timeout=90)[0]
    assert keyboard(prompt).get("force_reply") is True
    reason = push(fake, message(private(71), 71, "Priya Raman already replaced the rollers",
                                reply_to_message={"message_id": sent_message_id(fake, prompt), "date": int(time.time()),
                                                  "chat": private(71), "text": prompt["text"],
                                                  "from": {"id": TELEGRAM_BOT_ID, "is_bot": True, "first_name": "s"}}))
    replies_to(fake, 71, reason["message_id"], timeout=90)
    with db.session() as session:
        ratings = session.query(Rating).filter(Rating.message_id == reply_id).all()
        assert len(ratings) == 1 and ratings[0].value == -1
        assert "rollers" in ratings[0].reason and "Priya" not in ratings[0].reason
        # The reason reply is no question: nothing was queued for it.
        assert session.query(Message).filter(Message.idempotency_key == f"telegram:71:{reason['message_id']}").count() == 0
    escalated = press(buttons["esc"], "q3")
    assert "Handed to the support team" in escalated.get("text", "")
    with db.session() as session:
        conversation_id = session.get(Message, reply_id).conversation_id
        assert session.query(Escalation).filter(Escalation.conversation_id == conversation_id).count() == 1


def test_replies_in_one_conversation_are_posted_in_order_and_survive_a_rate_limit(stack):
    settings, db, fake, _ = stack
    fake.rate_limit_where["sendMessage"] = lambda p: int(p.get("chat_id", 0)) == 81
    fake.rate_limits["sendMessage"] = 1
    first = push(fake, message(private(81), 81, QUESTION))
    question_row(db, 81, first["message_id"])  # a person types the second line after the first arrived
    second = push(fake, message(private(81), 81, "Also the tray 2 light blinks orange"))
    replies_to(fake, 81, second["message_id"])
    replies_to(fake, 81, first["message_id"])
    assert question_row(db, 81, first["message_id"]).conversation_id == question_row(
        db, 81, second["message_id"]).conversation_id
    order = [json.loads(p["reply_parameters"])["message_id"] for p in fake.posted("sendMessage")
             if int(p["chat_id"]) == 81 and not p.get("_rate_limited") and p.get("reply_parameters")]
    assert order.index(first["message_id"]) < order.index(second["message_id"])
    # One long-lived client per process: the worker asked getMe once, not once per reply.
    assert len(fake.posted("getMe")) < 5  # polling adapter, webhook adapter, worker: not one per reply


def test_webhook_refuses_a_wrong_secret_and_answers_with_the_right_one(stack):
    settings, db, fake, port = stack

    def deliver(update: dict, secret: str | None) -> int:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        request = urllib.request.Request(f"http://127.0.0.1:{port}/telegram", data=json.dumps(update).encode(),
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    asked = message(private(91), 91, QUESTION)
    assert deliver({"update_id": next(_update_ids), "message": asked}, None) == 403
    assert deliver({"update_id": next(_update_ids), "message": asked}, "wrong") == 403
    time.sleep(1.0)
    with db.session() as session:
        assert session.query(Message).filter(Message.idempotency_key == f"telegram:91:{asked['message_id']}").count() == 0
    assert deliver({"update_id": next(_update_ids), "message": asked}, SECRET) == 200
    assert "T-100" in replies_to(fake, 91, asked["message_id"])[0]["text"]
    # The worker marks the reply sent once sendMessage has returned, which is just after the fake saw it.
    deadline = time.monotonic() + 10
    while True:
        with db.session() as session:
            row = session.query(Message).filter(Message.idempotency_key == f"telegram:91:{asked['message_id']}").one()
            reply = session.query(Message).filter(Message.reply_to_id == row.id).one()
        if reply.status == MessageStatus.sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.role == MessageRole.assistant and reply.status == MessageStatus.sent


def test_long_answers_split_at_sentences_within_telegram_limits_and_escaped():
    sentence = "Check the <fuser> & the rollers — ünïcödé 😀 works. "
    reply = Reply(text=sentence * 400, conversation=ConversationRef("telegram", "1", "1"), message_id=5,
                  sources=(("T-1", "Jam <E-502>"),), estimated_hours=1.5)
    parts = answer_parts(reply)
    assert len(parts) > 1
    for part in parts:
        assert utf16_len(part) <= MESSAGE_LIMIT
        assert "<fuser>" not in part and "&lt;fuser&gt;" in part
    assert all(p.rstrip().endswith("works.") for p in parts[:-1])  # cut at sentence ends
    assert "T-1" in parts[-1] and "1.5 h" in parts[-1]
