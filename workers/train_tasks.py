"""Celery tasks of the learning loop: training (queue ``train``) and the periodic export (queue ``light``).

Tasks take ids, own their database session, and are idempotent: a redelivered training task resumes
its run from the last checkpoint; the export writes a new folder only when the data changed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from core.errors import InputError
from workers.app import app, settings

log = logging.getLogger(__name__)

EXPORTS_DIR = "exports"
LATEST_FILE = "LATEST"


@app.task(name="supportbot.train", acks_late=True, ignore_result=True)
def train_task(run_id: int) -> dict[str, Any]:
    """Train the adapter of one TrainingRun (created by ``supportbot train``) and register it."""
    from core.db import Database
    from model.train import run_training

    current = settings()
    return run_training(
        settings=current, database=Database.from_settings(current), run_id=run_id, progress_bar=False
    )


@app.task(name="supportbot.light.export", ignore_result=True)
def export_task() -> dict[str, Any]:
    """Export rated conversations to ``DATA_DIR/exports/<time>-<hash>`` (for Celery beat)."""
    from core.db import Database

    current = settings()
    return export_snapshot(settings=current, database=Database.from_settings(current))


def export_snapshot(*, settings: Any, database: Any) -> dict[str, Any]:
    """A new export folder when the rated data changed since the last one; ``LATEST`` names the newest."""
    from bot.privacy import Anonymizer
    from model.export import export

    root = Path(settings.data_dir) / EXPORTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    try:
        with database.session() as session:
            summary = export(
                session=session,
                out_dir=tmp,
                scrub=Anonymizer.from_settings(settings).scrub,
                tokenizer=_tokenizer(settings),
            )
    except InputError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("export skipped: %s", err)
        return {"status": "empty", "reason": str(err)}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    short = summary.dataset_hash[:12]
    existing = [p for p in root.iterdir() if p.is_dir() and p.name.endswith(short)]
    if existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"status": "unchanged", "out_dir": str(existing[0]), "dataset_hash": summary.dataset_hash}
    target = root / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{short}"
    tmp.rename(target)
    (root / LATEST_FILE).write_text(target.name + "\n")
    log.info("exported %s conversations to %s", summary.counts.get("examples_train", 0), target)
    return {
        "status": "written",
        "out_dir": str(target),
        "dataset_hash": summary.dataset_hash,
        "counts": summary.counts,
    }


def _tokenizer(settings: Any) -> Any:
    """The base model's tokenizer for the card's token statistics; the card goes without when missing."""
    try:
        from transformers import AutoTokenizer

        from model.embedded import resolve_base

        return AutoTokenizer.from_pretrained(resolve_base(settings), local_files_only=True)
    except Exception as err:  # a card without token counts beats no export
        log.warning("no tokenizer for the dataset card: %s", err)
        return None
