"""What both chat platforms share: the outbound port, its rendering limits, the worker start-up check,
and that workers import no chat SDK. The adapters themselves are driven as real processes in
tests/test_slack.py and tests/test_telegram.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bot.outbound import answer_body, require_delivery, split_text
from bot.slack import render as slack_render
from core import texts
from core.errors import ConfigError
from core.schema import Conversation
from core.types import ConversationRef, Reply
from tests.conftest import ROOT


def test_answer_body_leaves_sources_and_fix_time_to_the_renderers():
    stored = "Clean the rollers.\n\n" + texts.SOURCES.format(ids="[T-1] Jam") + "\n\n" + texts.FIX_TIME.format(hours=1.5)
    assert answer_body(stored) == "Clean the rollers."


def test_block_kit_answer_stays_within_slack_limits_and_escapes_mentions():
    reply = Reply(text=("<@U0PRIYA000> & friends. " + "Check the fuser unit now. " * 40) * 30,
                  conversation=ConversationRef("slack", "C1", "1.1"), message_id=7,
                  sources=tuple((f"T-{i}", "Paper jam " * 50) for i in range(20)), estimated_hours=2.0)
    blocks = slack_render.answer_blocks(reply, rating_note=texts.RATED.format(emoji="👍"))
    assert len(blocks) <= 50
    for block in blocks:
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= 3000
        if block["type"] == "context":
            assert all(len(e["text"]) <= 3000 for e in block["elements"]) and len(block["elements"]) <= 10
    assert "<@U0PRIYA000>" not in json.dumps(blocks)  # never pings anyone from an answer
    assert len(slack_render.fallback_text(reply)) <= 3000
    assert [e["action_id"] for e in next(b for b in blocks if b["type"] == "actions")["elements"]] == [
        "rate_good", "rate_bad", "escalate"]


def test_split_text_prefers_sentence_ends_and_never_exceeds_the_limit():
    text = "First sentence here. Second one is longer than that! Third? " + "x" * 50
    pieces = split_text(text, 30)
    assert all(len(p) <= 30 for p in pieces)
    assert pieces[0] == "First sentence here."
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_worker_start_up_check_fails_loudly_without_a_way_to_deliver(env):
    settings, db = env
    require_delivery(settings=settings, db=db)  # nothing in use: nothing to deliver
    with db.session() as session:
        session.add(Conversation(platform="telegram", channel="555", thread="1", user_id=None))
    with pytest.raises(ConfigError, match="SUPPORTBOT_TELEGRAM_BOT_TOKEN"):
        require_delivery(settings=settings, db=db)
    with pytest.raises(ConfigError, match="SUPPORTBOT_SLACK_BOT_TOKEN"):
        require_delivery(settings=settings.model_copy(update={"chat_platforms": ["slack"]}))


def test_workers_import_no_chat_sdk():
    code = ("import sys, workers.answering, workers.tasks, bot.outbound; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('slack_sdk', 'slack_bolt', 'telegram')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_both_adapters_and_gives_workers_the_tokens():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert compose["slack-adapter"]["command"][:2] == ["supportbot", "slack"]
    assert compose["telegram-adapter"]["command"][:2] == ["supportbot", "telegram"]
    for name in ("answer-worker", "light-worker"):
        env = compose[name]["environment"]
        assert "SUPPORTBOT_SLACK_BOT_TOKEN" in env and "SUPPORTBOT_TELEGRAM_BOT_TOKEN" in env, name
    manifest = yaml.safe_load((ROOT / "docker" / "slack-manifest.yaml").read_text())
    assert {"app_mention", "message.im", "message.channels"} <= set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert {"chat:write", "users:read", "app_mentions:read", "commands"} <= set(manifest["oauth_config"]["scopes"]["bot"])
    assert manifest["settings"]["interactivity"]["is_enabled"] and manifest["settings"]["socket_mode_enabled"]
