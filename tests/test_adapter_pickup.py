"""A promoted adapter is served by running workers without a restart, and a rollback takes it back."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from core.db import Database, upgrade
from core.settings import load_settings
from tests.conftest import ROOT, WorkerProcess, seed_tickets, settings_env

QUESTION = "Our printer keeps jamming on every page and shows error E-502."


def _make_adapter(settings, folder) -> None:
    from peft import LoraConfig, get_peft_model

    from model.runtime import LanguageModel

    lm = LanguageModel(settings)
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)


def _ask_version(settings) -> str:
    done = subprocess.run([sys.executable, "-m", "bot.cli", "ask", QUESTION, "--json"], env=settings_env(settings),
                          cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout)["model_version"]


@pytest.mark.slow
def test_promoted_adapter_is_served_without_restart_and_rolled_back(tmp_path):
    from model.registry import record_gate, register_candidate, rollback

    settings = load_settings(data_dir=tmp_path / "data", max_new_tokens=8)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    seed_tickets(settings, db)
    adapter = settings.adapters_dir / "lora-test"
    _make_adapter(settings, adapter)

    worker = WorkerProcess(settings, name="pickup")
    try:
        worker.wait_ready(db)
        assert _ask_version(settings) == "smollm2-135m-instruct"
        with db.session() as session:
            register_candidate(session=session, name="lora-test", base_model=settings.base_model,
                               adapter_path=adapter, dataset_hash=None, config={}, metrics={})
            record_gate(session=session, name="lora-test", passed=True, report={"test": True})
        time.sleep(2.5)  # workers re-read the registry every 2 s
        assert _ask_version(settings) == "smollm2-135m-instruct+lora-test"
        with db.session() as session:
            rollback(session=session)
        time.sleep(2.5)
        assert _ask_version(settings) == "smollm2-135m-instruct"
    finally:
        worker.stop()
