"""`supportbot escalations list|show|claim|resolve|reopen` (a desk without any chat platform) and
`supportbot eval summaries`. Heavy imports (the ticket index, the model) happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.commands import Groups, add

if TYPE_CHECKING:
    from core.settings import Settings

STATUSES = ["active", "open", "claimed", "resolved"]


def register(groups: Groups) -> None:
    p = add(groups, "root", "escalations", _no_action, "the escalation desk: list, show, claim, resolve, reopen")
    groups["escalations"] = p.add_subparsers(dest="desk_action", metavar="ACTION", required=True)

    p = add(groups, "escalations", "list", _list, "escalations, newest first")
    p.add_argument("--status", choices=STATUSES, default=None, help="only these (active: open or claimed)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")

    p = add(groups, "escalations", "show", _show, "one escalation with its conversation and desk notes")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")

    p = add(groups, "escalations", "claim", _claim, "take an escalation (technicians only)")
    p.add_argument("id", type=int)
    p.add_argument("--as", dest="who", default=None, metavar="PLATFORM:ID",
                   help='who claims, e.g. "slack:U1" (a technician by core/roles.py); default: you, cli:USER')
    p.add_argument("--json", action="store_true")

    p = add(groups, "escalations", "resolve", _resolve, "close with the fix: it becomes a technician ticket")
    p.add_argument("id", type=int)
    p.add_argument("--as", dest="who", default=None, metavar="PLATFORM:ID",
                   help="the technician; default: you, cli:USER")
    p.add_argument("--text", required=True, help="the repair that fixed it")
    p.add_argument("--hours", default=None, help="hours the repair took")
    p.add_argument("--machine", default=None, help="the machine or device repaired")
    p.add_argument("--json", action="store_true")

    p = add(groups, "escalations", "reopen", _reopen, "reopen a resolved escalation")
    p.add_argument("id", type=int)
    p.add_argument("--as", dest="who", default=None, metavar="PLATFORM:ID",
                   help="a technician, or the employee who asked; default: you, cli:USER")
    p.add_argument("--reason", default=None, help="why (anonymized before it is stored)")
    p.add_argument("--json", action="store_true")

    p = add(groups, "eval", "summaries", _eval_summaries,
            "ROUGE of escalation summaries against reference summaries, beside the lead baseline")
    p.add_argument("--data", type=Path, required=True, help="dialogues JSONL (turns + summaries), TweetSumm format")
    p.add_argument("--split", choices=["all", "tune", "report"], default="all",
                   help="half of the file by id hash: tune (choices were made on it), report (held out)")
    p.add_argument("--methods", default="extractive",
                   help="comma-separated: extractive (what the desk uses), model (the base LM writes it)")
    p.add_argument("--limit", type=int, default=None, help="only the first N dialogues of the split")
    p.add_argument("--json", action="store_true")


def _actor(args: argparse.Namespace) -> str:
    """Who acts: --as, else the operator at this terminal (core/roles.py counts `cli:` as an admin)."""
    from core.roles import cli_actor

    return args.who or cli_actor().qualified


def _no_action(args: argparse.Namespace, settings: Settings) -> int:  # argparse requires one first
    return 2


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, ensure_ascii=False, indent=2, default=str) if args.json else text)


def _db(settings: Settings):  # type: ignore[no-untyped-def]
    """Migrated first: the desk commands work on a fresh data dir."""
    from core.db import Database, upgrade

    settings.ensure_dirs()
    upgrade(settings.db_url)
    return Database.from_settings(settings)


def _line(row: dict[str, Any]) -> str:
    first = (row["summary"] or "").splitlines()[0][:80] if row["summary"] else ""
    who = f" · {row['technician']}" if row["technician"] else ""
    severity = f" · {row['severity']}" if row["severity"] else ""
    return f"#{row['id']:<5} {row['status']:<9}{severity}{who} · {row['place']} · {first}"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from core import desk

    db = _db(settings)
    with db.session() as session:
        rows = [desk.describe(session=session, escalation=e)
                for e in desk.listing(session=session, status=args.status, limit=args.limit)]
    _print(args, rows, "\n".join(_line(r) for r in rows) if rows else "no escalations")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from core import desk

    db = _db(settings)
    with db.session() as session:
        escalation = desk.get(session=session, escalation_id=args.id)
        data = desk.describe(session=session, escalation=escalation, with_messages=True)
    lines = [_line(data), "", data["summary"] or "(no summary)", ""]
    if data["reason"]:
        lines.insert(2, f"why: {data['reason']}")
    for m in data["messages"]:
        lines.append(f"  [{m['id']}] {'note' if m['note'] else m['role']}: {m['text']}")
    if data["resolution"]:
        lines += ["", f"resolution ({data['ticket_id']}): {data['resolution']}"]
    _print(args, data, "\n".join(lines))
    return 0


def _claim(args: argparse.Namespace, settings: Settings) -> int:
    from core import desk

    db = _db(settings)
    with db.session() as session:
        user = desk.user_by_key(session=session, key=_actor(args))
        escalation, _posts = desk.claim(session=session, settings=settings, escalation_id=args.id,
                                        technician_id=user.id)
        data = desk.describe(session=session, escalation=escalation)
    _print(args, data, f"escalation #{data['id']} claimed by {data['technician']}")
    return 0


def _resolve(args: argparse.Namespace, settings: Settings) -> int:
    from core import desk
    from retrieval.search import TicketIndex

    db = _db(settings)
    with db.session() as session:
        desk.get(session=session, escalation_id=args.id)  # a wrong id is said before the index loads
    index = TicketIndex.open(settings=settings, db=db)
    with db.session() as session:
        user = desk.user_by_key(session=session, key=_actor(args))
        resolution = desk.resolve(session=session, settings=settings, index=index, escalation_id=args.id,
                                  technician_id=user.id, text=args.text, hours=args.hours, machine=args.machine)
        data = desk.describe(session=session, escalation=resolution.escalation)
    _print(args, data, f"escalation #{data['id']} resolved; the fix is ticket {data['ticket_id']} "
                       "(searchable now, and the training target in the next export)")
    return 0


def _reopen(args: argparse.Namespace, settings: Settings) -> int:
    from core import desk

    anonymize = None
    if args.reason:
        from retrieval.ingest import ticket_anonymizer

        anonymizer = ticket_anonymizer(settings)

        def anonymize(text: str, scope: str) -> str:
            return anonymizer(text).text

    db = _db(settings)
    with db.session() as session:
        user = desk.user_by_key(session=session, key=_actor(args))
        escalation, _posts = desk.reopen(session=session, settings=settings, escalation_id=args.id, by_id=user.id,
                                         reason=args.reason, anonymize=anonymize)
        data = desk.describe(session=session, escalation=escalation)
    _print(args, data, f"escalation #{data['id']} reopened ({data['status']})")
    return 0


def _eval_summaries(args: argparse.Namespace, settings: Settings) -> int:
    from core.errors import InputError
    from model.summaries import evaluate_summaries, read_dialogues, render, select_split

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"extractive", "model"})
    if unknown:
        raise InputError(f"unknown --methods {', '.join(unknown)} (extractive, model)")
    dialogues = select_split(read_dialogues(args.data), args.split)[: args.limit]
    if not dialogues:
        raise InputError(f"no dialogues in the {args.split} split of {args.data}")
    batch_generate = None
    if "model" in methods:
        from model.runtime import LanguageModel

        model = LanguageModel(settings)

        def batch_generate(prompts: list[list[dict[str, str]]]) -> list[str]:
            out: list[str] = []
            for start in range(0, len(prompts), settings.batch_max):
                out += [g.text for g in model.generate(prompts[start:start + settings.batch_max])]
            return out

    report = evaluate_summaries(dialogues, methods=methods, batch_generate=batch_generate)
    report.update(data=str(args.data), split=args.split, base_model=settings.base_model if "model" in methods else None)
    _print(args, report, render(report))
    sys.stdout.flush()
    return 0
