"""Retraining from chat and on schedule: what admins ask for in Slack or Telegram, and the run behind it.

A retrain reads top to bottom (``run_retrain``, on the ``train`` queue):
1. export what was rated (or resolved by a technician) since the active model was trained;
2. train a LoRA candidate on it (``model.train.run_training``, the settings' ``retrain_config``);
3. evaluate the base, the active adapter and the candidate on the export's validation conversations;
4. the promotion gate: the candidate must beat the active adapter (the base when none) by
   ``retrain_gate_margin`` in validation loss. A losing candidate is marked refused at once; a winning
   one stays a candidate until an admin presses Promote (``promote_evaluated``): nothing is promoted
   without both the gate and an admin.

The report (a dict, stored with the candidate as ``metrics["evaluation"]``) goes back to whoever asked:
the metrics table, the loss curve (``loss.png`` of the adapter folder) and the gate's verdict.

This module imports no torch at import time: the chat adapters use its status, models and promote
functions; only ``run_retrain`` loads the model, inside a worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.schema import ModelStatus, ModelVersion, Rating, RunStatus, TrainingRun
from core.settings import Settings
from model import registry

log = logging.getLogger(__name__)

BASE = "base"
GATE_METRIC = "val_loss"
EVALUATION_KEY = "evaluation"
EXPORTS_DIR = "exports"
# Admin commands understood in both chats (and the words the Slack slash command takes).
COMMANDS = ("status", "retrain", "models", "promote", "rollback")


# What there is ------------------------------------------------------------------------------------


def trained_at(*, session: Session) -> datetime | None:
    """When the active adapter was trained (registered); None while the base model serves."""
    current = registry.active(session=session)
    return current.created_at if current is not None else None


def last_run_at(*, session: Session) -> datetime | None:
    return session.scalar(select(func.max(TrainingRun.created_at)))


def new_ratings(*, session: Session, since: datetime | None) -> int:
    query = select(func.count(Rating.id))
    if since is not None:
        query = query.where(Rating.created_at > since)
    return int(session.scalar(query) or 0)


def run_in_progress(*, session: Session) -> TrainingRun | None:
    return session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status.in_([RunStatus.queued, RunStatus.running]))
        .order_by(TrainingRun.id.desc())
    ).first()


def latest_candidate(*, session: Session) -> ModelVersion | None:
    """The newest version that is not serving (a candidate, or one the gate refused)."""
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.status.in_([ModelStatus.candidate, ModelStatus.refused]))
        .order_by(ModelVersion.id.desc())
    ).first()


def evaluation_of(version: ModelVersion | None) -> dict[str, Any] | None:
    return (version.metrics or {}).get(EVALUATION_KEY) if version is not None else None


def status(*, session: Session) -> dict[str, Any]:
    """What an admin sees first: active model, latest candidate and its evaluation, new ratings."""
    current = registry.active(session=session)
    candidate = latest_candidate(session=session)
    running = run_in_progress(session=session)
    evaluation = evaluation_of(candidate)
    return {
        "active": registry.describe(current) if current is not None else None,
        "candidate": registry.describe(candidate) if candidate is not None else None,
        "candidate_evaluation": evaluation,
        "promotable": bool(candidate is not None and candidate.status == ModelStatus.candidate and evaluation
                           and evaluation["gate"]["passed"]),  # fmt: skip
        "new_ratings": new_ratings(session=session, since=last_run_at(session=session)),
        "running": {"run": running.id, "status": running.status.value, **_progress(running)} if running else None,
    }


def _progress(run: TrainingRun) -> dict[str, Any]:
    metrics = run.metrics or {}
    return {k: metrics[k] for k in ("step", "total_steps") if k in metrics}


# The run ------------------------------------------------------------------------------------------


def run_retrain(*, settings: Settings, database: Any, requested_by: str) -> dict[str, Any]:
    """Export the new ratings, train a candidate, evaluate it and judge it at the gate. Returns the report.

    The outcome is in ``report["status"]``: ``evaluated`` (``gate.passed`` says whether Promote is
    offered), ``nothing_new`` (no conversation rated since the active model) or ``failed`` (``error``).
    """
    from bot.privacy import Anonymizer
    from model.evaluate import evaluate
    from model.export import export
    from model.train import VALIDATION_FILE, new_run, run_training
    from model.train_config import TrainConfig
    from workers.train_tasks import _tokenizer

    report: dict[str, Any] = {"requested_by": requested_by, "status": "failed"}
    with database.session() as session:
        since = trained_at(session=session)
        current = registry.active_adapter(session=session)
    report["since"] = since.isoformat(timespec="seconds") if since else None
    out = Path(settings.data_dir) / EXPORTS_DIR / f"retrain-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{time.time_ns() % 10**6}"
    try:
        with database.session() as session:
            summary = export(session=session, out_dir=out, scrub=Anonymizer.from_settings(settings).scrub,
                             tokenizer=_tokenizer(settings), since=since)  # fmt: skip
    except InputError as err:
        log.info("retrain: nothing new to train on: %s", err)
        return {**report, "status": "nothing_new", "error": str(err)}
    counts = summary.counts
    report["data"] = {"dir": str(out), "train": counts.get("examples_train", 0),
                      "validation": counts.get("examples_validation", 0),
                      "conversations": counts.get("conversations_rated", 0)}  # fmt: skip
    config = TrainConfig.from_dict({"progress_bar": False, **settings.retrain_config})
    try:
        with database.session() as session:
            run_id = new_run(session=session, settings=settings, data_dir=out, config=config).id
        report["run"] = run_id
        trained = run_training(settings=settings, database=database, run_id=run_id, progress_bar=False)
        name = str(trained["version"])
        with database.session() as session:
            candidate = registry.get(session=session, name=name)
            adapter_path = str(candidate.adapter_path)
        models: list[tuple[str, str | None]] = [(BASE, None)]
        if current is not None:
            models.append((current[1], current[0]))
        models.append((name, adapter_path))
        evaluation = evaluate(settings=settings, data=out / VALIDATION_FILE, models=models, generate=False,
                              limit=settings.retrain_eval_limit, max_seq_len=config.max_seq_len)  # fmt: skip
    except Exception as err:  # the admin hears why; the active model is untouched
        log.exception("retrain failed")
        return {**report, "error": f"{type(err).__name__}: {err}"[:1000]}
    reference = current[1] if current is not None else BASE
    scores = {label: row["val_loss"] for label, row in evaluation["models"].items()}
    gate = registry.Gate(metric=GATE_METRIC, margin=settings.retrain_gate_margin)
    passed, why = gate.passes(scores[name], scores[reference])
    metrics = trained.get("metrics") or {}
    report.update(
        status="evaluated",
        version=name,
        loss_image=str(Path(adapter_path) / "loss.png"),
        table=[{"model": label, "role": _role(label, name, reference), "val_loss": score}
               for label, score in scores.items()],  # fmt: skip
        training={k: metrics.get(k) for k in ("steps", "train_loss", "val_loss", "base_val_loss") if k in metrics},
        evaluated_on=evaluation["conversations"],
        gate={"passed": passed, "why": why, "metric": GATE_METRIC, "margin": gate.margin, "reference": reference,
              "candidate_score": scores[name], "reference_score": scores[reference]},  # fmt: skip
    )
    with database.session() as session:
        version = registry.get(session=session, name=name)
        version.metrics = {**(version.metrics or {}), EVALUATION_KEY: report}
        if not passed:  # refused at once: no button, no later promotion of this one without a new evaluation
            registry.record_gate(session=session, name=name, passed=False, report=report["gate"])
    return report


def _role(label: str, candidate: str, reference: str) -> str:
    if label == candidate:
        return "candidate"
    return "active" if label == reference and label != BASE else BASE


# Acting on it -------------------------------------------------------------------------------------


def promote_evaluated(*, session: Session, name: str) -> ModelVersion:
    """Promote a candidate whose retrain evaluation passed the gate against what still serves now."""
    version = registry.get(session=session, name=name)
    if version.status == ModelStatus.active:
        raise InputError(f"{name} is already the active model")
    evaluation = evaluation_of(version)
    if version.status != ModelStatus.candidate or not evaluation:
        raise InputError(f"{name} has no passed evaluation to promote on ({version.status.value}); retrain, or "
                         f"`supportbot models promote {name}` runs the gate on the host")  # fmt: skip
    gate = evaluation["gate"]
    if not gate["passed"]:
        raise InputError(f"{name} did not pass the gate: {gate['why']}")
    current = registry.active(session=session)
    serving = current.name if current is not None else BASE
    if serving != gate["reference"]:
        raise InputError(f"{name} was judged against {gate['reference']}, but {serving} serves now; retrain to "
                         "judge it again")  # fmt: skip
    return registry.record_gate(session=session, name=name, passed=True, report={**gate, "promoted_via": "chat"})


def rollback(*, session: Session) -> str:
    """Back to the adapter active before (or the base); returns what serves now."""
    previous = registry.rollback(session=session)
    return previous.name if previous is not None else BASE


# Words for the chats ------------------------------------------------------------------------------


def table_text(report: dict[str, Any]) -> str:
    """The metrics table in fixed width (a code block in Slack, <pre> in Telegram)."""
    lines = [f"{'model':<34} {'role':<10} {'val_loss':>9}"]
    for row in report.get("table", []):
        lines.append(f"{row['model'][:34]:<34} {row['role']:<10} {row['val_loss']:>9.4f}")
    training = report.get("training") or {}
    if training:
        lines.append("")
        lines.append("training: " + ", ".join(f"{k} {_num(v)}" for k, v in training.items()))
    data = report.get("data") or {}
    if data:
        lines.append(f"data: {data.get('train', 0)} train / {data.get('validation', 0)} validation conversations "
                     f"rated since {report.get('since') or 'the start'}")  # fmt: skip
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def status_text(info: dict[str, Any]) -> str:
    from core import texts

    active = info["active"]
    candidate = info["candidate"]
    lines = [texts.ADMIN_ACTIVE.format(name=active["name"], since=active["promoted_at"]) if active
             else texts.ADMIN_ACTIVE_BASE]  # fmt: skip
    if candidate:
        evaluation = info["candidate_evaluation"]
        verdict = evaluation["gate"]["why"] if evaluation else texts.ADMIN_NOT_EVALUATED
        lines.append(texts.ADMIN_CANDIDATE.format(name=candidate["name"], status=candidate["status"], verdict=verdict))
    else:
        lines.append(texts.ADMIN_NO_CANDIDATE)
    lines.append(texts.ADMIN_NEW_RATINGS.format(count=info["new_ratings"]))
    if info["running"]:
        lines.append(texts.ADMIN_RUNNING.format(**{"step": "?", "total_steps": "?", **info["running"]}))
    return "\n".join(lines)


def models_text(*, session: Session) -> str:
    from core import texts

    rows = [registry.describe(v) for v in registry.list_versions(session=session)][-15:]
    if not rows:
        return texts.ADMIN_NO_MODELS
    lines = []
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if isinstance(r["val_loss"], float) else "-"
        lines.append(f"{r['name']:<32} {r['status']:<9} val_loss {loss}")
    return "\n".join(lines)


def report_text(report: dict[str, Any]) -> str:
    """The report's words (the table goes in a code block beside them)."""
    from core import texts

    if report["status"] == "nothing_new":
        text = texts.ADMIN_NOTHING_NEW.format(since=report.get("since") or "the start")
    elif report["status"] != "evaluated":
        text = texts.ADMIN_RETRAIN_FAILED.format(run=report.get("run", "-"), error=report.get("error", "unknown"))
    else:
        gate = report["gate"]
        verdict = texts.ADMIN_GATE_PASSED if gate["passed"] else texts.ADMIN_GATE_REFUSED
        text = texts.ADMIN_REPORT.format(name=report["version"], run=report.get("run"), verdict=verdict,
                                         why=gate["why"])  # fmt: skip
    # The beat's reports reach every admin; say why one arrived unasked.
    return (texts.ADMIN_SCHEDULED + text) if str(report.get("requested_by", "")).startswith("beat:") else text


# One admin command, whichever chat it came from ---------------------------------------------------

# The privileged action (core/roles.py) each command is checked against.
ACTION_OF = {"status": "models.view", "models": "models.view", "retrain": "retrain",
             "promote": "models.promote", "rollback": "models.rollback"}  # fmt: skip


@dataclass(frozen=True)
class ChatOutcome:
    """What to tell the admin; ``retrain`` asks the caller to queue a retrain reporting to them."""

    text: str
    retrain: bool = False
    refused: bool = False
    promoted: str | None = None


def chat_command(*, session: Session, settings: Settings, actor: str, text: str) -> ChatOutcome:
    """Check the person's role (audited either way), then do what ``text`` ("promote NAME", ...) asks."""
    from core import texts
    from core.roles import FAILED, SUCCEEDED, PermissionDenied, authorize, record

    words = text.split()
    command = words[0].lower() if words else ""
    if command not in ACTION_OF:
        return ChatOutcome(texts.ADMIN_HELP)
    try:
        role = authorize(session=session, actor=actor, action=ACTION_OF[command], settings=settings,
                         detail=" ".join(words)[:200])  # fmt: skip
    except PermissionDenied as err:
        return ChatOutcome(texts.ADMIN_REFUSED.format(why=err), refused=True)
    if command == "status":
        return ChatOutcome(status_text(status(session=session)))
    if command == "models":
        return ChatOutcome(models_text(session=session))
    if command == "retrain":
        running = run_in_progress(session=session)
        if running is not None:
            return ChatOutcome(texts.ADMIN_RETRAIN_BUSY.format(status=running.status.value, run=running.id))
        return ChatOutcome(texts.ADMIN_RETRAIN_QUEUED, retrain=True)
    try:
        if command == "promote":
            if len(words) < 2:
                raise InputError(texts.ADMIN_PROMOTE_NEEDS_NAME)
            name = promote_evaluated(session=session, name=words[1]).name
            outcome = ChatOutcome(texts.ADMIN_PROMOTED.format(name=name), promoted=name)
        else:
            outcome = ChatOutcome(texts.ADMIN_ROLLED_BACK.format(name=rollback(session=session)))
    except InputError as err:
        session.rollback()
        record(session=session, actor=actor, role=role, action=ACTION_OF[command], result=FAILED, detail=str(err))
        return ChatOutcome(str(err))
    session.commit()  # the change is made before it is announced and audited as done
    record(session=session, actor=actor, role=role, action=ACTION_OF[command], result=SUCCEEDED, detail=outcome.text)
    return outcome
