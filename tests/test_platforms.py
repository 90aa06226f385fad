"""Slack and Telegram adapters against a local fake of each platform's HTTP API, with a real worker.

The question goes in as a signed Slack event / a Telegram update, and the answer must come back as
the platform API call (chat.postMessage in the thread / sendMessage replying to the message)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest

from bot.cli import make_intake
from core.db import Database, upgrade
from core.schema import Message, MessageRole, MessageStatus
from core.settings import load_settings
from tests.conftest import WorkerProcess, seed_tickets
from tests.fake_platforms import SLACK_SECRET, SLACK_TOKEN, TELEGRAM_TOKEN, FakePlatforms

QUESTION = "Our printer keeps jamming on every page and shows error E-502."


@pytest.fixture(scope="module")
def platform_stack(tmp_path_factory):
    fake = FakePlatforms()
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("platforms") / "data",
        max_new_tokens=12,
        slack_bot_token=SLACK_TOKEN,
        slack_signing_secret=SLACK_SECRET,
        slack_api_url=fake.slack_url,
        telegram_bot_token=TELEGRAM_TOKEN,
        telegram_api_url=fake.telegram_url,
    )
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    env_extra = {
        "SUPPORTBOT_SLACK_BOT_TOKEN": SLACK_TOKEN,
        "SUPPORTBOT_SLACK_API_URL": fake.slack_url,
        "SUPPORTBOT_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
        "SUPPORTBOT_TELEGRAM_API_URL": fake.telegram_url,
    }
    worker = WorkerProcess(settings, name="platforms", env=env_extra)  # the worker delivers the replies
    worker.wait_ready(db)
    yield settings, db, fake
    worker.stop()
    fake.close()


def _signed(body: str, secret: str) -> dict[str, list[str]]:
    ts = str(int(time.time()))
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {
        "content-type": ["application/json"],
        "x-slack-request-timestamp": [ts],
        "x-slack-signature": [f"v0={digest}"],
    }


def test_slack_mention_is_answered_in_its_thread_once_despite_a_retry(platform_stack):
    from slack_bolt.request import BoltRequest

    from bot.slack import build_app, member_names

    settings, db, fake = platform_stack
    intake = make_intake(settings, db)
    app = build_app(settings=settings, intake=intake)
    intake.known_names(member_names(app.client))
    event = {
        "type": "app_mention", "user": "U0EMPLOYEE", "channel": "C0HELPDESK", "ts": "1700000000.000100",
        "text": f"<@U0BOT00000> Priya here. {QUESTION}",
    }
    body = json.dumps({"type": "event_callback", "team_id": "T0TEAM", "event_id": "Ev0001", "event": event})
    first = app.dispatch(BoltRequest(body=body, headers=_signed(body, SLACK_SECRET)))
    retry_headers = {**_signed(body, SLACK_SECRET), "x-slack-retry-num": ["1"], "x-slack-retry-reason": ["http_timeout"]}
    second = app.dispatch(BoltRequest(body=body, headers=retry_headers))
    assert first.status == 200 and second.status == 200

    posted = fake.wait_for("chat.postMessage")
    time.sleep(2)  # a duplicate would arrive about now
    posted = fake.posted("chat.postMessage")
    assert len(posted) == 1, posted
    assert posted[0]["channel"] == "C0HELPDESK" and posted[0]["thread_ts"] == "1700000000.000100"
    assert "T-100" in posted[0]["text"]
    with db.session() as session:
        question = session.query(Message).filter(Message.idempotency_key == "slack:Ev0001").one()
        assert "Priya" not in question.text  # the member directory name was masked before storing
        reply = session.query(Message).filter(Message.reply_to_id == question.id).one()
        assert reply.status == MessageStatus.sent


def test_bad_slack_signature_is_refused(platform_stack):
    from slack_bolt.request import BoltRequest

    from bot.slack import build_app

    settings, db, _ = platform_stack
    app = build_app(settings=settings, intake=make_intake(settings, db))
    body = json.dumps({"type": "event_callback", "event_id": "Ev0002",
                       "event": {"type": "app_mention", "user": "U1", "channel": "C1", "ts": "1.1", "text": "hi"}})
    response = app.dispatch(BoltRequest(body=body, headers=_signed(body, "f" * 32)))
    assert response.status == 401
    with db.session() as session:
        assert session.query(Message).filter(Message.idempotency_key == "slack:Ev0002").count() == 0


def test_telegram_message_is_answered_as_a_reply(platform_stack):
    from telegram import Update

    from bot.telegram import build_application

    settings, db, fake = platform_stack
    application = build_application(settings=settings, intake=make_intake(settings, db))
    update = {
        "update_id": 9001,
        "message": {
            "message_id": 77, "date": int(time.time()), "text": QUESTION,
            "chat": {"id": 555, "type": "private"},
            "from": {"id": 4242, "is_bot": False, "first_name": "Employee"},
        },
    }

    async def run() -> None:
        await application.initialize()
        try:
            await application.process_update(Update.de_json(update, application.bot))
            await application.process_update(Update.de_json(update, application.bot))  # delivered twice
        finally:
            await application.shutdown()

    asyncio.run(run())
    sent = fake.wait_for("sendMessage")
    time.sleep(2)
    sent = fake.posted("sendMessage")
    assert len(sent) == 1, sent
    reply_to = sent[0].get("reply_parameters")
    reply_to = json.loads(reply_to) if isinstance(reply_to, str) else reply_to
    assert int(sent[0]["chat_id"]) == 555 and int(reply_to["message_id"]) == 77
    assert "T-100" in sent[0]["text"]
    with db.session() as session:
        assert session.query(Message).filter(
            Message.idempotency_key == "telegram:9001", Message.role == MessageRole.user
        ).count() == 1
