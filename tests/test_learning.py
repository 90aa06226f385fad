"""The learning loop without a model: ratings, export, the registry and the gate, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.db import Database
from core.errors import InputError
from core.schema import (
    Conversation,
    Escalation,
    EscalationStatus,
    Message,
    MessageRole,
    MessageStatus,
    ModelStatus,
    ModelVersion,
    Rating,
    User,
)
from model import registry
from model.export import export, export_file, split_of
from model.ratings import rate

# A conversation: (user text, assistant text, rating or None), plus extra rows per case below.
PLAIN_ANSWERS = [
    ("The printer on floor 2 shows error 50.4.", "Switch it off for 30 s, then replace the fuser.", "good"),
    ("VPN drops every 10 minutes.", "Update the client and switch the protocol to IKEv2.", "good"),
    (
        "Pump P-101 leaks oil at the seal.",
        "Tighten the drain plug to 25 Nm and replace the shaft seal.",
        "good",
    ),
    ("Monitor flickers on the dock.", "Replace the DisplayPort cable; set 60 Hz.", "good"),
]


def _conversation(session, thread: str, user: User) -> Conversation:
    conv = Conversation(platform="console", channel="console", thread=thread, user_id=user.id)
    session.add(conv)
    session.flush()
    return conv


def _exchange(session, conv: Conversation, question: str, answer: str) -> Message:
    asked = Message(
        conversation_id=conv.id, role=MessageRole.user, text=question, status=MessageStatus.answered
    )
    session.add(asked)
    session.flush()
    answered = Message(
        conversation_id=conv.id,
        role=MessageRole.assistant,
        text=answer,
        status=MessageStatus.sent,
        reply_to_id=asked.id,
    )
    session.add(answered)
    session.flush()
    return answered


def seed(db: Database) -> dict[str, int]:
    """Rated conversations covering every export rule; returns the ids the tests look at."""
    ids: dict[str, int] = {}
    with db.session() as s:
        user = User(platform="console", external_id="u1")
        s.add(user)
        s.flush()
        for i, (q, a, verdict) in enumerate(PLAIN_ANSWERS):
            answer = _exchange(s, _conversation(s, f"plain-{i}", user), q, a)
            rate(session=s, message_id=answer.id, value=verdict)
        # The same conversation twice: exported once.
        for n in range(2):
            answer = _exchange(s, _conversation(s, f"dup-{n}", user), *PLAIN_ANSWERS[0][:2])
            rate(session=s, message_id=answer.id, value="good")

        # 👎 with a technician's resolution on the escalation: the resolution becomes the target.
        conv = _conversation(s, "escalated", user)
        bad = _exchange(s, conv, "Laptop will not boot after the update.", "Try turning it off and on.")
        rate(session=s, message_id=bad.id, value="bad", reason="did not help")
        s.add(
            Escalation(
                conversation_id=conv.id,
                message_id=bad.id,
                status=EscalationStatus.resolved,
                resolution="Boot into recovery, roll back update KB5034441, then reinstall the driver.",
            )
        )
        ids["escalated_bad"] = bad.id

        # 👎 followed by a technician message in the conversation: that message becomes the target.
        conv = _conversation(s, "technician", user)
        bad = _exchange(s, conv, "Badge reader at door 3 beeps red.", "Your badge is expired.")
        rate(session=s, message_id=bad.id, value="bad")
        s.add(
            Message(
                conversation_id=conv.id,
                role=MessageRole.technician,
                text="Reset the reader controller: hold RESET 10 s, then re-enrol the door.",
                status=MessageStatus.sent,
            )
        )

        # 👎 with no fix anywhere: context only, never a target.
        conv = _conversation(s, "unpaired", user)
        first = _exchange(s, conv, "Wi-Fi is slow in room 4.", "Restart the router.")
        rate(session=s, message_id=first.id, value="bad")
        second = _exchange(s, conv, "That did not help. Anything else?", "Move to the 5 GHz network CORP-5G.")
        rate(session=s, message_id=second.id, value="good")
        ids["unpaired_bad"] = first.id

        # Planted personal data that slipped past the first pass: the export's scrub must catch it.
        conv = _conversation(s, "pii", user)
        answer = _exchange(
            s,
            conv,
            "Mail jane.doe@example.com about the broken scanner.",
            "Scanner fixed: reseat the ADF cable.",
        )
        rate(session=s, message_id=answer.id, value="good")

        # Not exported: unrated, and held (anonymization failed).
        _exchange(s, _conversation(s, "unrated", user), "Keyboard sticks.", "Clean it.")
        conv = _conversation(s, "held", user)
        answer = _exchange(s, conv, "raw text", "an answer")
        s.add(Message(conversation_id=conv.id, role=MessageRole.user, text="x", status=MessageStatus.held))
        rate(session=s, message_id=answer.id, value="good")
        ids["user_message"] = answer.reply_to_id or 0
    return ids


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Ratings ------------------------------------------------------------------------------------------


def test_rate_refuses_unknown_and_non_assistant_messages_and_replaces(db: Database) -> None:
    ids = seed(db)
    with db.session() as s:
        with pytest.raises(InputError, match="no message 999999"):
            rate(session=s, message_id=999999, value="good")
        with pytest.raises(InputError, match="only assistant answers"):
            rate(session=s, message_id=ids["user_message"], value="good")
        with pytest.raises(InputError, match="good or bad"):
            rate(session=s, message_id=ids["escalated_bad"], value="meh")
        rate(session=s, message_id=ids["escalated_bad"], value="good", reason="actually it worked")
    with db.session() as s:
        rows = s.query(Rating).filter_by(message_id=ids["escalated_bad"]).all()
        assert [(r.value, r.reason) for r in rows] == [(1, "actually it worked")]


def test_rate_command_via_the_cli(db: Database, settings, monkeypatch, capsys) -> None:
    from bot.cli import main

    ids = seed(db)
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    assert main(["rate", str(ids["escalated_bad"]), "bad", "--reason", "wrong part"]) == 0
    assert "rated bad" in capsys.readouterr().out
    assert main(["rate", "424242", "good"]) == 2  # a clear error, not a traceback
    assert "no message 424242" in capsys.readouterr().err


# Export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scrub():
    from bot.privacy import Anonymizer, PrivacyConfig

    return Anonymizer(PrivacyConfig()).scrub


def test_export_turns_ratings_into_chat_jsonl(db: Database, tmp_path: Path, scrub) -> None:
    seed(db)
    out = tmp_path / "export"
    with db.session() as s:
        summary = export(session=s, out_dir=out, scrub=scrub, validation_percent=10)
    rows = read(out / "train.jsonl") + read(out / "validation.jsonl")
    chats = [r["messages"] for r in rows]
    texts = json.dumps(rows)

    assert summary.counts["duplicates_dropped"] == 2  # both copies of plain-0
    assert summary.counts["conversations_held"] == 1
    assert len(chats) == len(PLAIN_ANSWERS) + 4  # plain (dup once) + escalated + technician + unpaired + pii
    assert all(c[0]["role"] == "system" and c[1]["role"] == "user" for c in chats)
    assert "Keyboard sticks" not in texts and "raw text" not in texts
    assert "jane.doe@example.com" not in texts  # second anonymization pass

    def targets(chat):
        return [m["content"] for m in chat if m["role"] == "assistant" and m.get("weight", 1)]

    all_targets = [t for c in chats for t in targets(c)]
    assert "Boot into recovery, roll back update KB5034441, then reinstall the driver." in all_targets
    assert "Try turning it off and on." not in texts  # replaced, not kept
    assert "Reset the reader controller: hold RESET 10 s, then re-enrol the door." in all_targets
    assert "Your badge is expired." not in texts
    # The unfixed 👎 stays as context (weight 0) before the 👍 answer that follows it.
    unpaired = next(c for c in chats if any(m["content"] == "Restart the router." for m in c))
    assert [m.get("weight") for m in unpaired if m["role"] == "assistant"] == [0, 1]

    # No preference (KTO) rows: nothing trains on them, so nothing writes them (issue 13).
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["train.jsonl", "validation.jsonl"]
    assert not any(key.startswith("kto") for key in summary.counts)

    card = json.loads((out / "card.json").read_text())
    assert card["dataset_hash"] == summary.dataset_hash and card["second_pass_scrub"] is True
    assert card["counts"]["examples_validation"] >= 1  # a tiny export still holds one back
    assert "Dataset hash" in (out / "README.md").read_text()

    # Deterministic: the same data gives the same files and hash.
    with db.session() as s:
        again = export(session=s, out_dir=tmp_path / "again", scrub=scrub, validation_percent=10)
    assert again.dataset_hash == summary.dataset_hash


def test_split_is_by_conversation_and_stable() -> None:
    keys = [f"conversation:{i}" for i in range(2000)]
    held = [k for k in keys if split_of(k, 10) == "validation"]
    assert 140 < len(held) < 260
    assert held == [k for k in keys if split_of(k, 10) == "validation"]


def test_empty_export_is_a_clear_error(db: Database, tmp_path: Path) -> None:
    with db.session() as s, pytest.raises(InputError, match="nothing to export"):
        export(session=s, out_dir=tmp_path / "empty", scrub=None)


def test_export_from_dialogues_skips_malformed_rows(tmp_path: Path) -> None:
    source = tmp_path / "dialogues.jsonl"
    good = {
        "conversation_id": "a",
        "turns": [
            {"speaker": "customer", "text": "My order is late."},
            {"speaker": "customer", "text": "@Shop hello?"},
            {"speaker": "agent", "text": "Sorry! DM us the order number."},
        ],
    }
    source.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"turns": "x"}) + "\n\x00\x01binary\n")
    summary = export_file(path=source, kind="dialogues", out_dir=tmp_path / "out", scrub=None)
    assert summary.counts["rows_malformed"] == 3
    rows = read(tmp_path / "out" / "train.jsonl") + read(tmp_path / "out" / "validation.jsonl")
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "My order is late.\n@Shop hello?"},
                {"role": "assistant", "content": "Sorry! DM us the order number."},
            ]
        }
    ]


# Data for training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from core.settings import load_settings
    from model.embedded import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base(load_settings(data_dir=tmp_path_factory.mktemp("d"))))


def test_targets_are_the_trained_assistant_turns_only(tokenizer) -> None:
    from model.train import IGNORE, tokenize

    messages = [
        {"role": "system", "content": "You are supportbot."},
        {"role": "user", "content": "Printer jammed."},
        {"role": "assistant", "content": "Restart it.", "weight": 0},
        {"role": "user", "content": "Still jammed."},
        {"role": "assistant", "content": "Open tray 2 and pull the sheet."},
    ]
    example = tokenize(tokenizer, messages, 1024)
    trained = tokenizer.decode([t for t in example.targets if t != IGNORE])
    assert trained.startswith("Open tray 2 and pull the sheet.")
    assert tokenizer.eos_token in trained or "<|im_end|>" in trained  # learns to stop
    assert "Restart it" not in trained


def test_too_long_conversations_lose_old_turns_then_their_tail(tokenizer) -> None:
    from model.train import IGNORE, tokenize

    old = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "old answer " * 50}]
    last = [{"role": "user", "content": "Printer jammed."}, {"role": "assistant", "content": "Open tray 2."}]
    example = tokenize(tokenizer, [{"role": "system", "content": "sys"}, *old, *last], 64)
    assert example.truncated and len(example.ids) <= 64
    assert tokenizer.decode([t for t in example.targets if t != IGNORE]).startswith("Open tray 2.")
    huge = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "step " * 500}]
    cut = tokenize(tokenizer, huge, 64)
    assert cut.truncated and len(cut.ids) == 64 and cut.n_targets > 0
    assert tokenize(tokenizer, [{"role": "system", "content": "x " * 500}, *last], 64) is None


def test_malformed_training_rows_are_skipped_and_all_bad_is_an_error(tmp_path: Path, tokenizer) -> None:
    from model.train import load_dataset

    path = tmp_path / "train.jsonl"
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad_rows = ['{"messages": []}', '{"messages": [{"role": "robot", "content": "x"}]}', "[1,2]", "nope"]
    path.write_text("\n".join([json.dumps(ok), *bad_rows]) + "\n")
    data = load_dataset(path, tokenizer, 256)
    assert len(data.examples) == 1 and data.skipped_malformed == 4


def test_packing_never_mixes_conversations(tokenizer) -> None:
    import torch

    from model.train import Example, collate, pack

    examples = [Example(ids=[1] * n, targets=[2] * n) for n in (300, 200, 100, 60, 30)]
    rows = pack(examples, 320)
    assert all(sum(len(e.ids) for e in row) <= 320 for row in rows)
    assert sorted(len(e.ids) for row in rows for e in row) == [30, 60, 100, 200, 300]
    batch = collate(rows, pad_id=0)
    # Positions restart for each conversation: transformers builds a block-diagonal mask from that.
    starts = (batch.position_ids == 0).sum().item()
    assert starts >= len(examples)
    assert batch.real_tokens == 690 and int((batch.targets != -100).sum()) == 690
    assert batch.input_ids.dtype == torch.long


# Registry and gate --------------------------------------------------------------------------------


def _adapter_dir(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_gate_direction_and_margin() -> None:
    loss_gate = registry.Gate(metric="val_loss", margin=0.05)
    assert loss_gate.passes(1.80, 2.00)[0]
    assert not loss_gate.passes(1.97, 2.00)[0]  # better, but not by the margin
    assert not loss_gate.passes(float("nan"), 2.00)[0]
    assert registry.Gate(metric="rougeL", margin=0.0).passes(0.31, 0.30)[0]
    with pytest.raises(InputError):
        registry.Gate(metric="accuracy")


def test_promote_refuse_and_rollback(db: Database, tmp_path: Path) -> None:
    with db.session() as s:
        for name in ("v1", "v2", "v3"):
            registry.register_candidate(
                session=s, name=name, base_model="b", adapter_path=_adapter_dir(tmp_path, name),
                dataset_hash="h", config={}, metrics={},
            )  # fmt: skip
        with pytest.raises(InputError, match="not a LoRA adapter"):
            registry.register_candidate(
                session=s,
                name="v9",
                base_model="b",
                adapter_path=tmp_path,
                dataset_hash=None,
                config={},
                metrics={},
            )
        assert registry.active_adapter(session=s) is None
        registry.record_gate(session=s, name="v1", passed=True, report={})
        registry.record_gate(session=s, name="v2", passed=False, report={"why": "worse"})
        registry.record_gate(session=s, name="v3", passed=True, report={})
    with db.session() as s:
        status = {v.name: v.status for v in s.query(ModelVersion)}
        assert status == {"v1": ModelStatus.retired, "v2": ModelStatus.refused, "v3": ModelStatus.active}
        assert registry.active_adapter(session=s) == (str(tmp_path / "v3"), "v3")
        assert registry.rollback(session=s).name == "v1"
        assert registry.active_adapter(session=s) == (str(tmp_path / "v1"), "v1")
        assert registry.rollback(session=s) is None  # back to the base
        assert registry.active_adapter(session=s) is None
        with pytest.raises(InputError, match="base model already serves"):
            registry.rollback(session=s)


def test_models_list_json(db: Database, settings, monkeypatch, capsys, tmp_path: Path) -> None:
    from bot.cli import main

    with db.session() as s:
        registry.register_candidate(
            session=s, name="v1", base_model="b", adapter_path=_adapter_dir(tmp_path, "v1"),
            dataset_hash="h", config={}, metrics={"val_loss": 1.5},
        )  # fmt: skip
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "v1" and rows[0]["status"] == "candidate" and rows[0]["val_loss"] == 1.5
    assert main(["models", "rollback"]) == 2


def test_training_refuses_missing_or_empty_data(db: Database, settings, tmp_path: Path) -> None:
    from model.train import TrainConfig, new_run

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    with db.session() as s:
        with pytest.raises(InputError, match="no train.jsonl"):
            new_run(session=s, settings=settings, data_dir=tmp_path, config=TrainConfig())
        with pytest.raises(InputError, match="empty"):
            new_run(session=s, settings=settings, data_dir=tmp_path / "empty", config=TrainConfig())
        with pytest.raises(InputError, match="learning_rate"):
            new_run(
                session=s, settings=settings, data_dir=tmp_path / "empty", config=TrainConfig(learning_rate=0)
            )


def test_export_snapshot_is_idempotent(db: Database, settings) -> None:
    from workers.train_tasks import export_snapshot

    assert export_snapshot(settings=settings, database=db)["status"] == "empty"
    seed(db)
    first = export_snapshot(settings=settings, database=db)
    assert first["status"] == "written" and (Path(first["out_dir"]) / "train.jsonl").is_file()
    again = export_snapshot(settings=settings, database=db)
    assert again == {
        "status": "unchanged",
        "out_dir": first["out_dir"],
        "dataset_hash": first["dataset_hash"],
    }
    card = json.loads((Path(first["out_dir"]) / "card.json").read_text())
    assert card["tokens"]["train"]["tokens"] > 0  # token statistics from the base tokenizer


def test_train_command_enqueues_on_the_train_queue(
    db: Database, settings, monkeypatch, capsys, tmp_path: Path
) -> None:
    from bot.cli import main
    from core.schema import RunStatus, TrainingRun

    data = tmp_path / "export"
    data.mkdir()
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "train.jsonl").write_text(json.dumps(ok) + "\n")
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    assert (
        main(["train", "--data", str(data), "--no-wait", "--max-steps", "3", "--lora-r", "8", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["status"] == "queued"
    with db.session() as s:
        run = s.query(TrainingRun).one()
        assert run.status == RunStatus.queued and run.config["max_steps"] == 3 and run.config["lora_r"] == 8
        assert run.output_dir.startswith(str(settings.adapters_dir))
    queued = [p.read_text() for p in (settings.broker_dir / "in").iterdir()]
    assert len(queued) == 1 and "supportbot.train" in queued[0]


def test_a_long_row_does_not_widen_the_short_ones() -> None:
    from model.train import Example, batches, pack

    examples = [Example(ids=[1] * n, targets=[2] * n) for n in (1000, 100, 90, 80, 70)]
    micro = batches(pack(examples, 256), batch_rows=4, pad_id=0, pack_len=256)
    assert sorted(b.input_ids.shape[1] for b in micro) == [190, 1000]  # the long one travels alone
    assert sum(b.real_tokens for b in micro) == 1340
