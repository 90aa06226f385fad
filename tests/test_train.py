"""The learning loop on the tiny real model (SmolLM2-135M, NF4 on CPU): export -> train -> eval -> gate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from core.db import Database
from core.errors import InputError
from core.schema import (
    Conversation,
    Message,
    MessageRole,
    MessageStatus,
    ModelStatus,
    ModelVersion,
    RunStatus,
    TrainingRun,
    User,
)
from model import registry
from model.export import export
from model.ratings import rate

pytestmark = pytest.mark.slow

FIXES = {
    "printer": "Open tray 2, pull the stuck sheet out and restart the printer.",
    "laptop": "Hold the power button for 15 s, unplug the charger, then boot into recovery.",
    "vpn client": "Update the VPN client and switch the protocol to IKEv2 in settings.",
    "monitor": "Replace the DisplayPort cable and set the refresh rate to 60 Hz.",
}


def seed_rated(db: Database, who: str = "u1", n: int = 12) -> None:
    """Rated one-question conversations of ``who``; the same fixes recur, so held-out ones are learnable."""
    devices = list(FIXES)
    with db.session() as s:
        user = User(platform="console", external_id=who)
        s.add(user)
        s.flush()
        for i in range(n):
            device = devices[i % len(devices)]
            conv = Conversation(platform="console", channel="console", thread=f"{who}-{i}", user_id=user.id)
            s.add(conv)
            s.flush()
            asked = Message(conversation_id=conv.id, role=MessageRole.user, status=MessageStatus.answered,
                            text=f"My {device} stopped working (case {who} {i}).")  # fmt: skip
            s.add(asked)
            s.flush()
            answer = Message(conversation_id=conv.id, role=MessageRole.assistant, text=FIXES[device],
                             status=MessageStatus.sent, reply_to_id=asked.id)  # fmt: skip
            s.add(answer)
            s.flush()
            rate(session=s, message_id=answer.id, value="good", user_id=user.id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def exported(db: Database, tmp_path: Path) -> Path:
    from bot.privacy import Anonymizer, PrivacyConfig

    seed_rated(db)
    out = tmp_path / "export"
    with db.session() as s:
        summary = export(session=s, out_dir=out, scrub=Anonymizer(PrivacyConfig()).scrub)
    assert summary.counts["examples_train"] >= 8 and summary.counts["examples_validation"] >= 1
    return out


# Small and quick: ~130-token conversations, two per 256-token row, one row per step.
QUICK = dict(pack_len=256, batch_rows=1, save_every=0, progress_bar=False, eval_limit=2)


def test_export_train_eval_gate_promote(settings, db: Database, exported: Path) -> None:
    from model.embedded import resolve_base
    from model.evaluate import evaluate, gate_candidate
    from model.runtime import LanguageModel, load_base
    from model.train import TrainConfig, new_run, run_training, train

    base_path = resolve_base(settings)
    base_hash = sha256(base_path / "model.safetensors")

    # A deliberately bad candidate: a learning rate that wrecks the model in two steps.
    with db.session() as s:
        bad_run = new_run(
            session=s, settings=settings, data_dir=exported,
            config=TrainConfig(
                max_steps=2, learning_rate=0.05, lora_targets="q_proj,v_proj", load_in_4bit=False,
                gradient_checkpointing=False, **QUICK,
            ),
        ).id  # fmt: skip
    worse = run_training(settings=settings, database=db, run_id=bad_run)
    assert worse["status"] == "succeeded"

    # A good one, trained in-process so the test can look at the weights afterwards.
    config = TrainConfig(max_steps=5, learning_rate=3e-3, **QUICK)
    out = settings.adapters_dir / "good"
    result = train(config, base_path=base_path, data_dir=exported, output_dir=out)
    assert result.metrics["val_loss"] < result.metrics["base_val_loss"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").is_file()

    # LoRA weights moved off their zero init; the base weights are bit-identical to a fresh load.
    trained = dict(result.model.named_parameters())
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    fresh, _ = load_base(base_path, device="cpu", load_in_4bit=True)
    for name, tensor in fresh.state_dict().items():
        key = "base_model.model." + name.replace(".weight", ".base_layer.weight")
        mine = result.model.state_dict().get(key, result.model.state_dict().get("base_model.model." + name))
        assert mine is not None and mine.dtype == tensor.dtype and bool((mine == tensor).all()), name
    assert sha256(base_path / "model.safetensors") == base_hash
    del result, fresh

    with db.session() as s:
        registry.register_candidate(
            session=s, name="good", base_model=base_path.name, adapter_path=out, dataset_hash="h",
            config={"data_dir": str(exported)}, metrics={},
        )  # fmt: skip

    lm = LanguageModel(settings.model_copy(update={"model_loader": "transformers"}))  # reused by the gate below
    report = evaluate(
        settings=settings,
        data=exported,
        models=[("base", None), ("good", str(out))],
        limit=2,
        max_new_tokens=8,
        lm=lm,
    )
    for label in ("base", "good"):
        assert {"val_loss", "rouge1", "rouge2", "rougeL"} <= set(report["models"][label])
    assert report["models"]["good"]["val_loss"] < report["models"]["base"]["val_loss"]

    gate = registry.Gate(metric="val_loss", margin=0.01)
    refused = gate_candidate(settings=settings, database=db, name=worse["version"], gate=gate, lm=lm)
    assert not refused["passed"] and refused["reference"] == "base"
    promoted = gate_candidate(settings=settings, database=db, name="good", gate=gate, lm=lm)
    assert promoted["passed"], promoted["why"]
    with db.session() as s:
        assert s.query(ModelVersion).filter_by(name=worse["version"]).one().status == ModelStatus.refused
        assert registry.active_adapter(session=s) == (str(out), "good")

    # What the worker does before each answer, on the worker's own loader (LoRA merged, model/llama.py).
    served = LanguageModel(settings)
    assert served.plain
    served.use_adapter(str(out), "good")
    assert served.version == f"{base_path.name}+good"
    assert served.generate([[{"role": "user", "content": "My printer stopped working."}]], max_new_tokens=3)[
        0
    ].text

    # A failed run (nothing usable to train on) leaves the active adapter alone.
    broken = exported.parent / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"messages": "no"}\nnot json\n')
    with db.session() as s:
        run_id = new_run(session=s, settings=settings, data_dir=broken, config=TrainConfig(**QUICK)).id
    with pytest.raises(InputError, match="no usable conversation"):
        run_training(settings=settings, database=db, run_id=run_id)
    with db.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == RunStatus.failed and "no usable conversation" in run.error
        assert registry.active_adapter(session=s) == (str(out), "good")
    # Running a finished run again is a no-op (a redelivered task).
    assert run_training(settings=settings, database=db, run_id=run_id)["status"] == "failed"


def test_an_interrupted_run_resumes_from_its_checkpoint(settings, exported: Path) -> None:
    from model.embedded import resolve_base
    from model.train import TrainConfig, train

    config = TrainConfig(
        max_steps=3, learning_rate=1e-3, lora_targets="q_proj,v_proj", load_in_4bit=False,
        gradient_checkpointing=False, **{**QUICK, "save_every": 2},
    )  # fmt: skip
    out = settings.adapters_dir / "resumed"

    def crash_after_the_checkpoint(step: int, total: int, record: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt  # a worker killed mid-run

    with pytest.raises(KeyboardInterrupt):
        train(config, base_path=resolve_base(settings), data_dir=exported, output_dir=out,
              on_progress=crash_after_the_checkpoint)  # fmt: skip
    assert (out / "checkpoint" / "trainer_state.pt").is_file()
    assert not (out / "adapter_model.safetensors").exists()

    result = train(config, base_path=resolve_base(settings), data_dir=exported, output_dir=out)
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2, 3]
    assert not (out / "checkpoint").exists() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "training.json").read_text())["metrics"]["steps"] == 3


def test_packed_conversations_do_not_attend_to_each_other(settings) -> None:
    """transformers builds the block-diagonal mask from restarting position ids; guard against regressions."""
    import torch

    from model.embedded import resolve_base
    from model.runtime import load_base
    from model.train import Example, collate, loss_sum

    model, _ = load_base(resolve_base(settings), device="cpu", load_in_4bit=False)
    a = Example(ids=list(range(200, 230)), targets=list(range(201, 231)))
    b = Example(ids=list(range(900, 925)), targets=list(range(901, 926)))
    with torch.no_grad():
        packed = loss_sum(model, collate([[a, b]], pad_id=0))
        apart = loss_sum(model, collate([[a]], pad_id=0)) + loss_sum(model, collate([[b]], pad_id=0))
    assert torch.allclose(packed, apart, rtol=1e-4), (float(packed), float(apart))
