"""The `supportbot` command line. Wiring happens here, once: settings -> database -> intake -> queue."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from core.commands import Groups, add
from core.errors import SupportbotError

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger("supportbot")

# Modules that add their own subcommands (see core/commands.py), with the top-level commands each adds
# and their help for `supportbot --help`. A command imports only its own module and `--help` none:
# importing all of them costs about half a second (sqlalchemy, the anonymizer's secret detectors).
# tests/test_cli_fresh.py checks this table against what the modules really register.
COMMAND_MODULES: dict[str, dict[str, str]] = {
    "retrieval.cli": {
        "tickets": "Resolved tickets: ingest, update, delete, reindex",
        "retrieval": "Retrieval model maintenance",
    },
    "bot.privacy.cli": {
        "anonymize": "Read messages from stdin (one per line) and write them anonymized, one per line",
    },
    "model.cli": {
        "rate": "rate an assistant answer good or bad",
        "export": "export rated conversations as fine-tuning data",
        "train": "fine-tune a LoRA adapter (QLoRA) on exported data",
        "models": "list, promote or roll back fine-tuned adapters",
    },
    "bot.web.cli": {
        "web": "serve the web console (quality, conversations, models)",
    },
    "workers.eval_cli": {},  # only `eval rag`
    "workers.desk_cli": {  # and `eval summaries`
        "escalations": "the escalation desk: list, show, claim, resolve, reopen",
    },
}
GROUP_OF_ALL_MODULES = "eval"  # every module adds evaluations to it

NO_SCHEMA = "the database has no tables yet ({url}); run `supportbot db upgrade` first"
NO_DATABASE = "cannot use the database ({url}): {reason}"
BAD_PATH = "cannot use {path}: {reason}"
BAD_SETTING = "invalid setting {name}: {reason}"
UNEXPECTED = "unexpected error {ref} ({kind}); details in {where}, or run again with --verbose to see them here"


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
    from core.db import open_database

    return open_database(settings)  # migrated first: the console must work on a fresh data dir


# --- commands -----------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from alembic.util import CommandError

    from core.db import downgrade, upgrade

    settings.ensure_dirs()
    try:
        if args.action == "upgrade":
            upgrade(settings.db_url, args.revision or "head")
        else:
            downgrade(settings.db_url, args.revision or "-1")
    except CommandError as err:  # an unknown revision, or nothing left to downgrade
        raise SupportbotError(f"database {args.action} to {args.revision or 'the default'}: {err}") from err
    print(f"database {args.action} done ({_safe_url(settings.db_url)})")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_model_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from model.embedded import resolve_base

    path = resolve_base(settings)
    print(f"base model ready: {path}")
    from model.compiled import prepare_for

    print(prepare_for(settings, path))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from core.db import Database, upgrade
    from workers.app import configure

    upgrade(settings.db_url)
    if "answer" in args.queues.split(","):
        from bot.outbound import require_delivery

        # Loudly, now: a worker without a platform's token would store answers nobody ever receives.
        require_delivery(settings=settings, db=Database.from_settings(settings))
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

    _database(settings)  # a fresh data dir has nothing to report, but no missing tables either
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that command's module is imported (the rest are named)."""
    parser = argparse.ArgumentParser(prog="supportbot", description="Self-hosted support assistant")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    root = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: Groups = {"root": root}

    p = add(groups, "root", "db", cmd_db, "database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("--revision", default=None, help="target revision (upgrade: head, downgrade: -1)")

    p = add(groups, "root", "model", cmd_model_prepare, "prepare the base model (convert the embedded GGUF once, compile the one-row decode layer)")
    p.add_argument("action", choices=["prepare"])

    p = add(groups, "root", "worker", cmd_worker, "start a Celery worker")
    p.add_argument("--queues", default="answer,light", help="comma-separated: answer, light, train")
    p.add_argument("--concurrency", type=int, default=int(os.environ.get("SUPPORTBOT_WORKER_CONCURRENCY", 8)))
    p.add_argument("--name", default="supportbot")
    # No flag is needed for recovery: every worker runs the sweeper, one at a time (workers/leader.py).
    p.add_argument("--beat", action="store_true", help="also run the periodic training-data export")
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

    ev = add(groups, "root", "eval", _no_subcommand, "evaluations")
    groups["eval"] = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    for name, commands in COMMAND_MODULES.items():
        if only is not None and only not in commands and only != GROUP_OF_ALL_MODULES:
            for command, help in commands.items():  # listed in --help, imported when named
                root.add_parser(command, help=help)
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            if getattr(err, "name", None) != name:
                raise
            continue  # a part not built yet; its commands are simply absent
        module.register(groups)
    return parser


def _no_subcommand(args: argparse.Namespace, settings: Settings) -> int:  # argparse requires one first
    return 2


def command_of(argv: list[str]) -> str | None:
    """The command word of ``argv`` (the root parser has only flags without values before it)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    parser = build_parser(only=command or "")
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        from core.settings import load_settings

        settings = load_settings()
        setup_logging(settings, verbose=args.verbose)
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        line, code = explain(err, settings=settings, verbose=args.verbose)
        print(f"supportbot {command}: {line}" if command else f"supportbot: {line}", file=sys.stderr)
        return code


def explain(err: Exception, *, settings: Settings | None, verbose: bool = False) -> tuple[str, int]:
    """One line for the user and an exit code: 2 for errors of input or set-up, 1 for the unexpected.

    A user's mistake (a bad path, a fresh database, a wrong setting) is told in its own words; anything
    else gets a reference, its traceback in DATA_DIR/errors.log, and on screen only with --verbose.
    """
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if isinstance(err, SupportbotError):
        return str(err), 2
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        name = "SUPPORTBOT_" + "_".join(str(part) for part in first["loc"]).upper()
        return BAD_SETTING.format(name=name, reason=first["msg"]), 2
    if isinstance(err, OSError) and err.filename is not None:
        return BAD_PATH.format(reason=err.strerror or type(err).__name__, path=err.filename), 2
    if isinstance(err, (OperationalError, ProgrammingError)) and settings is not None:
        url = _safe_url(settings.db_url)
        reason = str(err.orig).splitlines()[0] if err.orig is not None else str(err).splitlines()[0]
        if "no such table" in reason or "does not exist" in reason:
            return NO_SCHEMA.format(url=url), 2
        if isinstance(err, OperationalError):
            return NO_DATABASE.format(url=url, reason=reason), 2
    ref = uuid.uuid4().hex[:8]
    details = "".join(traceback.format_exception(err))
    if verbose:
        print(details, file=sys.stderr, end="")
    where = _log_unexpected(ref, details, settings)
    return UNEXPECTED.format(ref=ref, kind=type(err).__name__, where=where), 1


def _log_unexpected(ref: str, details: str, settings: Settings | None) -> str:
    """Keep the traceback of an unexpected error where a person can find it by its reference."""
    if settings is not None:
        path = settings.data_dir / "errors.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as out:
                out.write(f"--- {datetime.now(timezone.utc).isoformat()} ref {ref}\n{details}")
            return str(path)
        except OSError:
            pass
    return "no log (the data dir is not writable)"


if __name__ == "__main__":
    sys.exit(main())
