"""Admins retrain, promote and roll back from chat (issue 13): real `supportbot slack` (HTTP) and
`supportbot telegram` (long polling) processes, a real answer worker and a real `train` worker, against
the local fakes of the Slack Web API and the Telegram Bot API. Training is a few steps on CPU
(SUPPORTBOT_RETRAIN_CONFIG); the model, the export, the evaluation and the gate are the real ones.

The tests share one stack and run in file order: the Slack retrain promotes a candidate, and the
Telegram retrain is judged against it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from core.db import Database, upgrade
from core.schema import (
    AuditEntry,
    Conversation,
    Message,
    MessageRole,
    ModelStatus,
    ModelVersion,
    TrainingRun,
)
from core.settings import load_settings
from model import registry
from tests.conftest import WorkerProcess, free_port, seed_tickets
from tests.fake_platforms import (
    BOT_USER,
    SLACK_SECRET,
    SLACK_TOKEN,
    TELEGRAM_TOKEN,
    AdapterProcess,
    FakePlatforms,
)
from tests.test_slack import blocks_of, interaction, signed
from tests.test_telegram import message, private, push
from tests.test_train import seed_rated

pytestmark = pytest.mark.slow

ADMIN, EMPLOYEE = "U0ADMIN000", "U0EMPLOY00"
TG_ADMIN, TG_EMPLOYEE = 4242, 777
# A few steps on CPU: two ~130-token conversations per row, one row per step (as tests/test_train.py).
QUICK = {"pack_len": 256, "batch_rows": 1, "save_every": 0, "eval_limit": 2, "load_in_4bit": False,
         "gradient_checkpointing": False, "lora_targets": "q_proj,v_proj"}  # fmt: skip
GOOD_RUN = {**QUICK, "max_steps": 5, "learning_rate": 3e-3}
WORSE_RUN = {**QUICK, "max_steps": 2, "learning_rate": 0.05}  # wrecks the model in two steps


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    fake = FakePlatforms()
    settings = load_settings(data_dir=tmp_path_factory.mktemp("admin") / "data", max_new_tokens=12)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    seed_rated(db, "first")
    env = {
        "SUPPORTBOT_SLACK_BOT_TOKEN": SLACK_TOKEN,
        "SUPPORTBOT_SLACK_SIGNING_SECRET": SLACK_SECRET,
        "SUPPORTBOT_SLACK_API_URL": fake.slack_url,
        "SUPPORTBOT_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
        "SUPPORTBOT_TELEGRAM_API_URL": fake.telegram_url,
        "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0",
        "SUPPORTBOT_ADMINS": json.dumps([f"slack:{ADMIN}", f"telegram:{TG_ADMIN}"]),
        "SUPPORTBOT_RETRAIN_CONFIG": json.dumps(GOOD_RUN),
    }
    answers = WorkerProcess(settings, name="answers", env=env)
    trainer = {"worker": WorkerProcess(settings, name="train", queues="train", concurrency=1, env=env)}
    port = free_port()
    slack = AdapterProcess(["slack", "--port", str(port)], settings=settings, env=env, name="admin-slack")
    telegram = AdapterProcess(["telegram"], settings=settings, env=env, name="admin-telegram")

    def restart_trainer(**overrides: str) -> None:
        trainer["worker"].stop()
        trainer["worker"] = WorkerProcess(settings, name="train2", queues="train", concurrency=1,
                                          env={**env, **overrides})  # fmt: skip

    try:
        slack.wait_http(port)
        fake.wait_for("getUpdates", timeout=600)
        answers.wait_ready(db, timeout=900)
        yield settings, db, fake, port, restart_trainer
    finally:
        for process in (slack, telegram):
            process.stop()
        trainer["worker"].stop()
        answers.stop()
        fake.close()


def slash(port: int, user: str, text: str) -> str:
    """`/supportbot TEXT` as Slack sends it; returns the text of the immediate (ephemeral) answer."""
    body = urllib.parse.urlencode({
        "command": "/supportbot", "text": text, "user_id": user, "channel_id": "C0ADMINS00", "team_id": "T0TEAM",
        "response_url": "http://127.0.0.1:9/unused", "trigger_id": "1.2.3",
    })  # fmt: skip
    request = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=body.encode(),
                                     headers=signed(body, content_type="application/x-www-form-urlencoded"))
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read().decode()
    # Bolt answers a text-only acknowledgement as a plain-text body, which Slack shows as the message.
    return str(json.loads(raw).get("text", "")) if raw.startswith("{") else raw


def audit(db: Database, actor: str) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(a.action, a.result) for a in s.query(AuditEntry).filter_by(actor=actor).order_by(AuditEntry.id)]


def wait_until(check, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_employees_are_refused_with_the_reason_and_audited(stack) -> None:
    settings, db, fake, port, _ = stack
    answer = slash(port, EMPLOYEE, "retrain")
    assert "Refused" in answer and "needs the admin role" in answer and "SUPPORTBOT_ADMINS" in answer
    assert ("retrain", "denied") in audit(db, f"slack:{EMPLOYEE}")
    assert "Refused" in slash(port, EMPLOYEE, "promote lora-anything")
    assert ("models.promote", "denied") in audit(db, f"slack:{EMPLOYEE}")

    push(fake, message(private(TG_EMPLOYEE), TG_EMPLOYEE, "/retrain"))
    refused = fake.wait_for("sendMessage", timeout=120, where=lambda p: int(p["chat_id"]) == TG_EMPLOYEE)
    assert "Refused" in refused[0]["text"] and "admin" in refused[0]["text"]
    wait_until(lambda: ("retrain", "denied") in audit(db, f"telegram:{TG_EMPLOYEE}"))
    with db.session() as s:
        assert s.query(TrainingRun).count() == 0  # nothing was queued for them

    # The App Home: admins get the models and the buttons, everyone else what the bot is for.
    from tests.test_slack import event

    for user in (ADMIN, EMPLOYEE):
        event(port, {"type": "app_home_opened", "user": user, "channel": "D0HOME", "tab": "home"})
    homes = {p["user_id"]: p for p in fake.wait_for("views.publish", count=2, timeout=60)}
    admin_home = json.dumps(homes[ADMIN]["view"])
    assert "admin_retrain" in admin_home and "New ratings since the last training run: 12" in admin_home
    assert "admin_retrain" not in json.dumps(homes[EMPLOYEE]["view"])


def test_admin_retrains_from_slack_and_promote_changes_the_answers_model_version(stack) -> None:
    settings, db, fake, port, _ = stack
    assert "Retraining queued" in slash(port, ADMIN, "retrain")
    dm = f"D{ADMIN}"
    report = fake.wait_for("chat.postMessage", timeout=1500,
                           where=lambda p: p.get("channel") == dm and "Retrain report" in p.get("text", ""))[0]
    blocks = json.dumps(blocks_of(report))
    assert "val_loss" in blocks and "base" in blocks and "candidate" in blocks  # the metrics table
    assert "admin_promote" in blocks, report["text"]  # the gate passed against the base: Promote offered
    with db.session() as s:
        candidate = s.query(ModelVersion).one()
        name = candidate.name
        assert candidate.status == ModelStatus.candidate  # the gate passed, but only an admin promotes
        evaluation = candidate.metrics["evaluation"]
        assert evaluation["gate"]["passed"] and evaluation["data"]["train"] >= 8
    # The loss curve, uploaded as an image into the same DM.
    done = fake.wait_for("files.completeUploadExternal", timeout=120)[0]
    assert done.get("channel_id") == dm
    assert any(data.startswith(b"\x89PNG") for data in fake.uploads.values())

    # An employee pressing the report's button is refused; the admin's press promotes.
    def press(user: str) -> None:
        assert interaction(port, {
            "type": "block_actions", "user": {"id": user}, "team": {"id": "T0TEAM"}, "trigger_id": "1.2",
            "container": {"type": "message", "channel_id": dm, "message_ts": report["_ts"]},
            "channel": {"id": dm}, "message": {"ts": report["_ts"]},
            "actions": [{"action_id": "admin_promote", "value": name, "type": "button", "block_id": "retrain-report"}],
        }) == 200  # fmt: skip

    press(EMPLOYEE)
    fake.wait_for("chat.postMessage", timeout=60, where=lambda p: p.get("channel") == dm and "Refused" in p.get("text", ""))
    press(ADMIN)
    fake.wait_for("chat.postMessage", timeout=60, where=lambda p: p.get("channel") == dm and "Promoted" in p.get("text", ""))
    with db.session() as s:
        assert registry.active(session=s).name == name
    assert ("models.promote", "succeeded") in audit(db, f"slack:{ADMIN}")

    # The next answer comes from the promoted adapter.
    channel, question_ts = "C0HELP0001", f"{time.time():.6f}"
    from tests.test_slack import event

    event(port, {"type": "app_mention", "user": EMPLOYEE, "channel": channel, "ts": question_ts,
                 "text": f"<@{BOT_USER}> Our printer keeps jamming and shows error E-502."})  # fmt: skip

    def answered() -> str | None:
        with db.session() as s:
            row = (s.query(Message).join(Conversation, Message.conversation_id == Conversation.id)
                   .filter(Conversation.channel == channel, Message.role == MessageRole.assistant).first())  # fmt: skip
            return row.model_version if row is not None else None

    assert wait_until(answered, timeout=600).endswith(f"+{name}")


def test_admin_retrains_from_telegram_and_a_worse_candidate_offers_no_promote(stack) -> None:
    settings, db, fake, port, restart_trainer = stack
    seed_rated(db, "second")  # rated after the active model was trained: the new data
    restart_trainer(SUPPORTBOT_RETRAIN_CONFIG=json.dumps(WORSE_RUN))
    push(fake, message(private(TG_ADMIN), TG_ADMIN, "/retrain"))
    fake.wait_for("sendMessage", timeout=120,
                  where=lambda p: int(p["chat_id"]) == TG_ADMIN and "Retraining queued" in p.get("text", ""))
    report = fake.wait_for("sendMessage", timeout=1500,
                           where=lambda p: int(p["chat_id"]) == TG_ADMIN and "Retrain report" in p.get("text", ""))[0]
    assert "<pre>" in report["text"] and "val_loss" in report["text"] and "active" in report["text"]
    assert "refused" in report["text"] and not report.get("reply_markup")  # no Promote button
    photo = fake.wait_for("sendPhoto", timeout=120, where=lambda p: int(p["chat_id"]) == TG_ADMIN)[0]
    assert photo["_file_photo"] > 1000 and fake.uploads["photo"].startswith(b"\x89PNG")
    with db.session() as s:
        newest = s.query(ModelVersion).order_by(ModelVersion.id.desc()).first()
        assert newest.status == ModelStatus.refused
        assert newest.metrics["evaluation"]["data"]["train"] + newest.metrics["evaluation"]["data"]["validation"] <= 12
        assert registry.active(session=s).name != newest.name  # the earlier promotion still serves
    # Asking to promote it anyway is refused with the gate's reason.
    push(fake, message(private(TG_ADMIN), TG_ADMIN, f"/promote {newest.name}"))
    fake.wait_for("sendMessage", timeout=120,
                  where=lambda p: int(p["chat_id"]) == TG_ADMIN and "no passed evaluation" in p.get("text", ""))
    # And /status shows what serves.
    push(fake, message(private(TG_ADMIN), TG_ADMIN, "/supportbot status"))
    fake.wait_for("sendMessage", timeout=120,
                  where=lambda p: int(p["chat_id"]) == TG_ADMIN and "Active model: lora-" in p.get("text", ""))


def test_the_beat_queues_a_retrain_for_the_admins_once_enough_new_ratings_exist(tmp_path) -> None:
    """The schedule's side without processes: the beat entry, the threshold, a run in progress."""
    from core.schema import RunStatus
    from workers.app import configure
    from workers.retrain_tasks import BEAT_ACTOR, check_due

    settings = load_settings(data_dir=tmp_path / "data", retrain_min_new_ratings=5, retrain_check_every_s=600,
                             admins=[f"slack:{ADMIN}", f"telegram:{TG_ADMIN}", "web:root"])  # fmt: skip
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    entry = configure(settings).conf.beat_schedule["retrain-when-rated"]
    assert entry["task"] == "supportbot.light.retrain_check" and entry["schedule"] == 600
    queued: list[dict] = []

    def enqueue(**kwargs) -> None:  # type: ignore[no-untyped-def]
        queued.append(kwargs)

    seed_rated(db, "few", n=4)
    assert check_due(settings=settings, database=db, enqueue=enqueue) == {"queued": False, "new_ratings": 4, "busy": False}
    seed_rated(db, "more", n=2)
    with db.session() as s:
        s.add(TrainingRun(data_dir="x", status=RunStatus.running))
    assert check_due(settings=settings, database=db, enqueue=enqueue)["busy"] and not queued
    with db.session() as s:
        s.query(TrainingRun).delete()
    assert check_due(settings=settings, database=db, enqueue=enqueue)["queued"]
    assert queued == [{"requested_by": BEAT_ACTOR, "targets": [{"platform": "slack", "user": ADMIN},
                                                              {"platform": "telegram", "user": str(TG_ADMIN)}]}]
    assert ("retrain", "allowed") in audit(db, BEAT_ACTOR)
    # The same ratings do not queue it again, even when that retrain created no run (nothing new).
    assert check_due(settings=settings, database=db, enqueue=enqueue)["new_ratings"] == 0 and len(queued) == 1
    db.engine.dispose()


def test_chat_commands_promote_only_what_passed_against_what_serves_and_roll_back(tmp_path) -> None:
    """The command layer both chats share, in-process: role checks, the gate's verdict, rollback."""
    from model.retrain import EVALUATION_KEY, chat_command

    settings = load_settings(data_dir=tmp_path / "data", admins=[f"slack:{ADMIN}"])
    upgrade(settings.db_url)
    db = Database.from_settings(settings)

    def candidate(name: str, passed: bool, reference: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        gate = {"passed": passed, "why": "test verdict", "reference": reference}
        with db.session() as s:
            version = registry.register_candidate(session=s, name=name, base_model="b", adapter_path=folder,
                                                  dataset_hash=None, config={}, metrics={})  # fmt: skip
            version.metrics = {EVALUATION_KEY: {"status": "evaluated", "gate": gate}}

    def say(text: str, who: str = f"slack:{ADMIN}") -> str:
        with db.session() as s:
            return chat_command(session=s, settings=settings, actor=who, text=text).text

    candidate("first", True, "base")
    candidate("second", True, "base")  # judged against the base, which will no longer serve
    candidate("loser", False, "base")
    assert say("promote first", f"slack:{EMPLOYEE}").startswith("Refused")
    assert "did not pass the gate" in say("promote loser")
    assert say("promote first").startswith("Promoted first")
    assert "judged against base, but first serves now" in say("promote second")
    assert "first" in say("status") and "first" in say("models")
    assert say("rollback") == "Rolled back: base serves now."
    assert "no adapter is active" in say("rollback")
    assert say("bogus").startswith("Admin commands")
    trail = audit(db, f"slack:{ADMIN}")
    assert ("models.promote", "succeeded") in trail and ("models.promote", "failed") in trail
    assert ("models.rollback", "succeeded") in trail and ("models.rollback", "failed") in trail
    assert ("models.promote", "denied") in audit(db, f"slack:{EMPLOYEE}")
    db.engine.dispose()
