"""`supportbot rate | export | train | models` and `supportbot eval answers`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from core.commands import Groups, add
from core.errors import InputError, TrainingError
from core.settings import Settings


def register(groups: Groups) -> None:
    p = add(groups, "root", "rate", rate_command, "rate an assistant answer good or bad")
    p.add_argument("message_id", type=int, help="the answer's message id (shown under each answer)")
    p.add_argument("value", choices=["good", "bad"])
    p.add_argument("--reason", default=None, help="why (optional)")
    p.add_argument("--user-id", type=int, default=None, help="who rates (a users.id); re-rating replaces")

    p = add(groups, "root", "export", export_command, "export rated conversations as fine-tuning data")
    p.add_argument("--out", type=Path, required=True, help="folder for train/validation JSONL and the card")
    p.add_argument("--validation-percent", type=int, default=10, help="share of conversations held back")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--from-dialogues", type=Path, help="bootstrap from a dialogues JSONL (speaker/text turns)"
    )
    source.add_argument(
        "--from-tickets", type=Path, help="bootstrap from resolved tickets JSONL (title -> fix)"
    )
    p.add_argument("--limit", type=int, default=None, help="with --from-*: only the first N rows")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = add(groups, "root", "train", train_command, "fine-tune a LoRA adapter (QLoRA) on exported data")
    p.add_argument("--data", type=Path, help="an export folder (train.jsonl, validation.jsonl)")
    p.add_argument("--from-tickets", action="store_true",
                   help="bootstrap: export the stored tickets as question -> fix conversations, train on them, "
                        "evaluate and promote through the gate (do this first, after `tickets ingest`)")
    p.add_argument("--local", action="store_true", help="train in this process instead of the `train` queue")
    p.add_argument("--no-wait", action="store_true", help="enqueue and return at once")
    p.add_argument("--wait-timeout", type=float, default=None, help="stop waiting after N seconds")
    p.add_argument(
        "--resume", type=int, metavar="RUN_ID", help="resume an interrupted run from its checkpoint"
    )
    p.add_argument("--promote", action="store_true", help="run the promotion gate when training succeeded")
    _gate_arguments(p)
    p.add_argument("--json", action="store_true")
    config_group = p.add_argument_group("training configuration")
    add_dataclass_arguments(config_group, _train_config_class())

    p = add(groups, "root", "models", models_command, "list, promote or roll back fine-tuned adapters")
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("name", nargs="?", help="promote: the candidate version name")
    p.add_argument(
        "--data", type=Path, default=None, help="promote: validation file (default: the training export's)"
    )
    p.add_argument("--limit", type=int, default=None, help="promote: evaluate on the first N conversations")
    _gate_arguments(p)
    p.add_argument("--json", action="store_true")

    p = add(
        groups,
        "eval",
        "answers",
        eval_answers_command,
        "validation loss and ROUGE of base, active, candidates",
    )
    p.add_argument("--data", type=Path, required=True, help="validation.jsonl (or an export folder)")
    p.add_argument(
        "--models",
        default="base,active,candidates",
        help="comma-separated: base, active, candidates, or version names",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-generate", action="store_true", help="validation loss only (fast)")
    p.add_argument("--json", action="store_true")


def _train_config_class() -> type:
    from model.train_config import TrainConfig

    return TrainConfig


def _gate_arguments(p: argparse.ArgumentParser) -> None:
    from model.registry import DEFAULT_GATE_MARGIN, DEFAULT_GATE_METRIC, LOWER_IS_BETTER

    p.add_argument(
        "--metric", default=DEFAULT_GATE_METRIC, choices=sorted(LOWER_IS_BETTER), help="gate metric"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_GATE_MARGIN,
        help="the candidate must beat the active adapter (or the base) by at least this much",
    )


def add_dataclass_arguments(parser: Any, cls: type) -> None:
    """One ``--flag`` per dataclass field, its help text from the field's metadata (TRL style)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
        if kind is bool:
            parser.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata.get('help', '')} (default {f.default})")  # fmt: skip
        else:
            parser.add_argument(flag, dest=f"cfg_{f.name}", type=kind, default=None, metavar=f.name.upper(),
                                help=f"{f.metadata.get('help', '')} (default {f.default})")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Any:
    cls = _train_config_class()
    values = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None})


def _database(settings: Settings) -> Any:
    from core.db import Database, upgrade

    upgrade(settings.db_url)  # idempotent; a fresh data dir works too
    return Database.from_settings(settings)


def _authorize(settings: Settings, database: Any, action: str, detail: str = "") -> None:
    """The operator on the host acts as the local admin (core/roles.py); the action is audited."""
    from core.roles import authorize, cli_actor

    with database.session() as session:
        authorize(session=session, actor=cli_actor(), action=action, settings=settings, detail=detail)


def _print(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if getattr(args, "json", False) else text)


# rate ---------------------------------------------------------------------------------------------


def rate_command(args: argparse.Namespace, settings: Settings) -> int:
    from core.conversations import get_or_create_user
    from core.roles import authorize, cli_actor
    from model.ratings import rate

    operator = cli_actor()
    with _database(settings).session() as session:
        user_id = args.user_id
        if user_id is None:  # the operator's own vote: one per person per answer, like a chat button
            user_id = get_or_create_user(session=session, platform=operator.platform, external_id=operator.external_id).id
        else:
            authorize(session=session, actor=operator, action="rate.on_behalf", settings=settings,
                      detail=f"message {args.message_id} {args.value} as users.id {user_id}")  # fmt: skip
        rating = rate(
            session=session,
            message_id=args.message_id,
            value=args.value,
            reason=args.reason,
            user_id=user_id,
        )
        word = "good" if rating.value > 0 else "bad"
    print(f"message {args.message_id} rated {word}")
    return 0


# export -------------------------------------------------------------------------------------------


def export_command(args: argparse.Namespace, settings: Settings) -> int:
    from bot.privacy import Anonymizer
    from model.export import export, export_file
    from workers.train_tasks import _tokenizer

    out = args.out.expanduser().resolve()
    if not out.is_dir():
        # An unwritable or impossible --out fails here, in one line (bot.cli), not after the slow loads.
        out.mkdir(parents=True, exist_ok=True)
    scrub = Anonymizer.from_settings(settings).scrub
    tokenizer = _tokenizer(settings)
    if args.from_dialogues or args.from_tickets:
        kind, path = (
            ("dialogues", args.from_dialogues) if args.from_dialogues else ("tickets", args.from_tickets)
        )
        summary = export_file(
            path=path, kind=kind, out_dir=out, scrub=scrub, tokenizer=tokenizer,
            validation_percent=args.validation_percent, limit=args.limit,
        )  # fmt: skip
    else:
        with _database(settings).session() as session:
            summary = export(
                session=session, out_dir=out, scrub=scrub, tokenizer=tokenizer,
                validation_percent=args.validation_percent,
            )  # fmt: skip
    c = summary.counts
    _print(
        args,
        summary.to_dict(),
        f"exported {c.get('examples_train', 0)} training and {c.get('examples_validation', 0)} validation "
        f"conversations to {out} (dataset {summary.dataset_hash[:12]}; see {out / 'README.md'})",
    )
    return 0


# train --------------------------------------------------------------------------------------------


def train_command(args: argparse.Namespace, settings: Settings) -> int:
    from core.schema import TrainingRun
    from model.train import new_run, run_training

    database = _database(settings)
    _authorize(settings, database, "train", f"resume run {args.resume}" if args.resume else f"data {args.data}")
    data, promote = args.data, args.promote
    if args.from_tickets:
        if data is not None or args.resume:
            raise InputError("--from-tickets makes its own data; leave out --data and --resume")
        data = _export_stored_tickets(settings, database)
        promote = True  # the first adapter still has to beat the base model at the gate
    if args.resume:
        run_id = args.resume
    else:
        if data is None:
            raise InputError("--data is required (an export folder), --from-tickets, or --resume RUN_ID")
        with database.session() as session:
            run_id = new_run(
                session=session, settings=settings, data_dir=data, config=config_from_args(args)
            ).id
    if args.local:
        result = run_training(settings=settings, database=database, run_id=run_id)
    else:
        from workers.app import configure
        from workers.train_tasks import train_task

        configure(settings)
        train_task.apply_async(args=[run_id])
        if args.no_wait:
            _print(
                args,
                {"run": run_id, "status": "queued"},
                f"training run {run_id} queued on the `train` queue",
            )
            return 0
        print(f"training run {run_id} queued; waiting for a worker on the `train` queue "
              "(`supportbot worker --queues train`; Ctrl-C stops waiting, not the run)", file=sys.stderr)  # fmt: skip
        result = _wait(database, run_id, args.wait_timeout)
        if result is None:
            return 3
    with database.session() as session:
        run = session.get(TrainingRun, run_id)
        status, error = run.status.value, run.error
    if status != "succeeded":
        raise TrainingError(f"training run {run_id} {status}: {error}")
    version = result.get("version") or result.get("metrics", {}).get("version")
    payload: dict[str, Any] = {
        "run": run_id,
        "status": status,
        "version": version,
        "metrics": result.get("metrics"),
    }
    if promote and version:
        payload["gate"] = _gate(settings, database, version, args)
    m = payload["metrics"] or {}
    text = (f"run {run_id} succeeded: candidate {version}, val_loss {m.get('val_loss')} "
            f"(base {m.get('base_val_loss')}), adapter and loss.png in {settings.adapters_dir / str(version)}")  # fmt: skip
    if "gate" in payload:
        text += f"\ngate: {'promoted' if payload['gate']['passed'] else 'refused'}: {payload['gate']['why']}"
    _print(args, payload, text)
    return 0


def _export_stored_tickets(settings: Settings, database: Any) -> Path:
    from datetime import datetime, timezone

    from bot.privacy import Anonymizer
    from model.export import export_store
    from retrieval.search import TicketIndex
    from workers.train_tasks import _tokenizer

    out = settings.data_dir / "exports" / f"tickets-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    index = TicketIndex.open(settings=settings, db=database)
    with database.session() as session:
        summary = export_store(session=session, index=index, out_dir=out,
                               scrub=Anonymizer.from_settings(settings).scrub, tokenizer=_tokenizer(settings))
    c = summary.counts
    print(f"exported {c.get('examples_train', 0)} training and {c.get('examples_validation', 0)} validation "
          f"conversations from the stored tickets to {out}", file=sys.stderr)
    return out


def _wait(database: Any, run_id: int, timeout: float | None) -> dict[str, Any] | None:
    from core.schema import TrainingRun

    started = time.monotonic()
    shown = None
    while True:
        with database.session() as session:
            run = session.get(TrainingRun, run_id)
            status, metrics = run.status.value, dict(run.metrics or {})
        if status in ("succeeded", "failed"):
            print(file=sys.stderr)
            return {"status": status, "metrics": metrics, "version": metrics.get("version")}
        line = f"run {run_id}: {status}"
        if metrics.get("total_steps"):
            line += f" step {metrics.get('step')}/{metrics['total_steps']} loss {metrics.get('loss', float('nan')):.3f}"
        if line != shown:
            print("\r" + line.ljust(60), end="", file=sys.stderr, flush=True)
            shown = line
        if timeout is not None and time.monotonic() - started > timeout:
            print(f"\nstopped waiting; run {run_id} is still {status}", file=sys.stderr)
            return None
        time.sleep(2)


# models -------------------------------------------------------------------------------------------


def _gate(settings: Settings, database: Any, name: str, args: argparse.Namespace) -> dict[str, Any]:
    from model.evaluate import gate_candidate
    from model.registry import Gate

    return gate_candidate(
        settings=settings, database=database, name=name, gate=Gate(metric=args.metric, margin=args.margin),
        data=getattr(args, "data_file", None), limit=getattr(args, "limit", None),
    )  # fmt: skip


def models_command(args: argparse.Namespace, settings: Settings) -> int:
    from model import registry

    database = _database(settings)
    if args.action == "list":
        with database.session() as session:
            rows = [registry.describe(v) for v in registry.list_versions(session=session)]
        lines = [f"{'name':<32} {'status':<10} {'val_loss':>9}  promoted_at"]
        for r in rows:
            vl = f"{r['val_loss']:.4f}" if isinstance(r["val_loss"], float) else "-"
            lines.append(f"{r['name']:<32} {r['status']:<10} {vl:>9}  {r['promoted_at'] or ''}")
        if not rows:
            lines.append("(no adapters yet: `supportbot train --data DIR`)")
        _print(args, rows, "\n".join(lines))
        return 0
    if args.action == "promote":
        if not args.name:
            raise InputError("promote needs the candidate's name (see `supportbot models list`)")
        args.data_file = args.data
        _authorize(settings, database, "models.promote", args.name)
        verdict = _gate(settings, database, args.name, args)
        _print(
            args, verdict, f"{args.name} {'promoted' if verdict['passed'] else 'refused'}: {verdict['why']}"
        )
        return 0 if verdict["passed"] else 1
    _authorize(settings, database, "models.rollback")
    with database.session() as session:
        previous = registry.rollback(session=session)
        name = previous.name if previous else None
    _print(args, {"active": name}, f"rolled back; now serving {name or 'the base model'}")
    return 0


# eval answers -------------------------------------------------------------------------------------


def eval_answers_command(args: argparse.Namespace, settings: Settings) -> int:
    from model.evaluate import evaluate, resolve_models

    with _database(settings).session() as session:
        models = resolve_models(
            session=session, wanted=[m.strip() for m in args.models.split(",") if m.strip()]
        )
    report = evaluate(
        settings=settings, data=args.data, models=models, generate=not args.no_generate,
        limit=args.limit, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    lines = [f"{report['conversations']} conversations, {report['answers_generated']} answers generated"]
    for label, r in report["models"].items():
        lines.append(
            f"{label:<32} val_loss {r['val_loss']:.4f}"
            + (
                f"  rouge1 {r['rouge1']:.4f} rouge2 {r['rouge2']:.4f} rougeL {r['rougeL']:.4f}"
                if "rouge1" in r
                else ""
            )
        )
    _print(args, report, "\n".join(lines))
    return 0
