"""The `supportbot` command line. Wiring happens here, once: settings -> database -> intake -> queue."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any

from core.commands import Groups, add
from core.errors import SupportbotError
from core.settings import Settings, load_settings

log = logging.getLogger("supportbot")

# Modules that add their own subcommands (see core/commands.py).
COMMAND_MODULES = ("retrieval.cli", "bot.privacy.cli", "model.cli", "workers.desk_cli", "bot.web.cli")


def setup_logging(settings: Settings, *, verbose: bool = False) -> None:
    from workers.observability import ContextFilter, JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [m=%(message_id)s c=%(conversation_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("supportbot").setLevel(logging.INFO)
    # Library chatter a user cannot act on (optional CPU kernels, progress bars, default hostnames).
    for noisy in ("bitsandbytes", "kombu", "presidio-analyzer", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows it for "Loading weights"
    try:
        from bot.privacy.logs import install_log_redaction

        install_log_redaction(handler)
    except ImportError:  # pragma: no cover - privacy package missing means a broken install
        log.error("log redaction unavailable: bot.privacy is not installed")


def make_intake(settings: Settings, db):  # type: ignore[no-untyped-def]
    """The one place adapters get their intake: anonymizer + Celery enqueue, configured from settings."""
    from bot.intake import Intake
    from bot.privacy import Anonymizer
    from workers.app import configure
    from workers.tasks import enqueue_answer

    configure(settings)
    anonymizer = Anonymizer.from_settings(settings)
    return Intake(
        settings=settings,
        db=db,
        anonymize=lambda text, scope: anonymizer.anonymize(text, scope=scope).text,
        enqueue=enqueue_answer,
        known_names=anonymizer.add_known_names,
    )


def _database(settings: Settings):  # type: ignore[no-untyped-def]
    from core.db import Database, upgrade

    upgrade(settings.db_url)  # idempotent; the console must work on a fresh data dir
    return Database.from_settings(settings)


# --- commands -----------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from core.db import downgrade, upgrade

    settings.ensure_dirs()
    if args.action == "upgrade":
        upgrade(settings.db_url, args.revision or "head")
    else:
        downgrade(settings.db_url, args.revision or "-1")
    print(f"database {args.action} done ({_safe_url(settings.db_url)})")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_model_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from model.embedded import resolve_base

    path = resolve_base(settings)
    print(f"base model ready: {path}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from core.db import upgrade
    from workers.app import configure

    upgrade(settings.db_url)
    app = configure(settings)
    argv = [
        "worker",
        "--loglevel",
        args.loglevel,
        "-Q",
        args.queues,
        # Threads: tasks share one model in this process and the batcher merges their generation.
        "--pool",
        "threads",
        "--concurrency",
        str(args.concurrency),
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"{args.name}@%h",
    ]
    if args.beat:
        argv.append("--beat")
        argv += ["--schedule", str(settings.data_dir / "celerybeat-schedule")]
    app.worker_main(argv)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from workers.status import collect

    report = collect(settings)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from workers.status import render

        print(render(report))
    return 0


def _console(settings: Settings, thread: str | None = None):  # type: ignore[no-untyped-def]
    from bot.console import Console, SessionWorker

    db = _database(settings)
    intake = make_intake(settings, db)
    worker = SessionWorker(settings, db)
    return Console(settings=settings, db=db, intake=intake, thread=thread), worker


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    text: Any = args.text
    if text == "-":
        text = sys.stdin.buffer.read()
    console, worker = _console(settings, args.thread)
    try:
        worker.ensure(quiet=args.json)
        reply = console.ask(text)
    finally:
        worker.stop()
    if args.json:
        print(json.dumps(reply.as_json(), ensure_ascii=False))
    else:
        print(reply.answer)
        print(f"\n[message {reply.message_id} · {reply.model_version} · {reply.latency_ms or 0:.0f} ms]")
    return 0 if reply.status != "failed" else 1


def cmd_slack(args: argparse.Namespace, settings: Settings) -> int:
    from bot.slack import serve

    db = _database(settings)
    # Socket Mode when SUPPORTBOT_SLACK_APP_TOKEN is set; otherwise the HTTP Events API on --port.
    serve(settings=settings, intake=make_intake(settings, db), port=args.port)
    return 0


def cmd_telegram(args: argparse.Namespace, settings: Settings) -> int:
    from bot.telegram import serve

    db = _database(settings)
    # A webhook when SUPPORTBOT_TELEGRAM_WEBHOOK_URL is set; otherwise long polling.
    serve(settings=settings, intake=make_intake(settings, db))
    return 0


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from bot.chat import run_chat

    console, worker = _console(settings, args.thread)
    try:
        worker.ensure()
        return run_chat(console, settings=settings)
    finally:
        worker.stop()


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supportbot", description="Self-hosted support assistant")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    root = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: Groups = {"root": root}

    p = add(groups, "root", "db", cmd_db, "database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("--revision", default=None, help="target revision (upgrade: head, downgrade: -1)")

    p = add(groups, "root", "model", cmd_model_prepare, "prepare the base model (convert the embedded GGUF once)")
    p.add_argument("action", choices=["prepare"])

    p = add(groups, "root", "worker", cmd_worker, "start a Celery worker")
    p.add_argument("--queues", default="answer,light", help="comma-separated: answer, light, train")
    p.add_argument("--concurrency", type=int, default=int(os.environ.get("SUPPORTBOT_WORKER_CONCURRENCY", 8)))
    p.add_argument("--name", default="supportbot")
    p.add_argument("--beat", action="store_true", help="also run the periodic jobs (sweeper, export)")
    p.add_argument("--loglevel", default="INFO")

    p = add(groups, "root", "status", cmd_status, "workers, queue depths, active model, recent errors")
    p.add_argument("--json", action="store_true")

    p = add(groups, "root", "ask", cmd_ask, "ask one question and wait for the answer")
    p.add_argument("text", help='the question ("-" reads it from stdin)')
    p.add_argument("--json", action="store_true", help="print answer, sources, latency and ids as JSON")
    p.add_argument("--thread", default=None, help="continue an earlier console conversation")

    p = add(groups, "root", "slack", cmd_slack, "serve the Slack adapter (Events API over HTTP)")
    p.add_argument("--port", type=int, default=3000)
    add(groups, "root", "telegram", cmd_telegram, "serve the Telegram adapter (long polling)")

    p = add(groups, "root", "chat", cmd_chat, "interactive console chat")
    p.add_argument("--thread", default=None)

    ev = add(groups, "root", "eval", lambda a, s: (parser.parse_args(["eval", "-h"]), 2)[1], "evaluations")
    groups["eval"] = ev.add_subparsers(dest="eval_command", metavar="WHAT")

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            if getattr(err, "name", None) != name:
                raise
            continue  # a part not built yet; its commands are simply absent
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings, verbose=args.verbose)
        return int(args.func(args, settings) or 0)
    except SupportbotError as err:
        print(f"supportbot: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
