"""``supportbot tickets ...``, ``supportbot retrieval tune`` and ``supportbot eval retrieval``.

Handlers are ``func(args, settings) -> int``; heavy imports (torch, faiss) stay inside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.commands import Groups, add
from core.errors import SupportbotError
from core.settings import Settings

SEED_FILE = Path(__file__).resolve().parent / "data" / "seed_tickets.jsonl"


def register(groups: Groups) -> None:
    tickets = groups["root"].add_parser("tickets", help="Resolved tickets: ingest, update, delete, reindex")
    sub = tickets.add_subparsers(dest="tickets_command", required=True)
    groups = {**groups, "tickets": sub}

    p = add(groups, "tickets", "ingest", _ingest, "Load tickets from a JSONL or CSV file (idempotent by id)")
    p.add_argument("file", type=Path)
    p.add_argument("--map", action="append", default=[], metavar="SOURCE=FIELD",
                   help="read column SOURCE as our FIELD (id, title, machine, condition, work_performed, hours)")
    p.add_argument("--json", action="store_true", help="print the report, row by row, as JSON")
    p.add_argument("--strict", action="store_true",
                   help="store nothing unless every row is a clean add or update (no rejected, duplicate, "
                        "cut, masked or quarantined row)")

    p = add(groups, "tickets", "delete", _delete, "Delete tickets by id (SQL, index and quarantine)")
    p.add_argument("ids", nargs="+")

    p = add(groups, "tickets", "quarantine", _quarantine,
            "List tickets held aside because they read like instructions to an assistant")
    p.add_argument("--json", action="store_true")

    p = add(groups, "tickets", "release", _release, "Release quarantined tickets into the index (admin)")
    p.add_argument("ids", nargs="+")

    p = add(groups, "tickets", "rescreen", _rescreen,
            "Anonymize and screen tickets stored before this version (stored raw), then update the index")

    p = add(groups, "tickets", "reindex", _reindex, "Rebuild the search index from SQL")

    p = add(groups, "tickets", "seed", _seed, "Load the bundled example tickets when the store is empty")

    p = add(groups, "tickets", "list", _list, "Show stored tickets")
    p.add_argument("--limit", type=int, default=20)

    p = add(groups, "tickets", "search", _search, "Search the tickets like the bot does")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=None)

    retrieval = groups["root"].add_parser("retrieval", help="Retrieval model maintenance")
    rsub = retrieval.add_subparsers(dest="retrieval_command", required=True)
    groups = {**groups, "retrieval": rsub}
    p = add(groups, "retrieval", "tune", _tune,
            "Fine-tune the embedding model on the stored tickets; keep it only if it scores better")
    p.add_argument("--method", choices=["auto", "adapter", "full"], default="auto",
                   help="adapter: linear map on frozen MiniLM (seconds on CPU); full: all weights (minutes per "
                        "thousand tickets on CPU); auto: both, the better one on held-out tickets kept")
    p.add_argument("--epochs", type=int, default=None, help="full method: passes over the pairs")
    p.add_argument("--batch-size", type=int, default=None, help="full method: pairs per step")
    p.add_argument("--learning-rate", type=float, default=None, help="full method: learning rate")
    p.add_argument("--min-gain", type=float, default=None, help="MRR gain needed to keep the tuned model")
    p.add_argument("--hard-negatives", type=_count, default=None, metavar="N",
                   help="full method: each question also meets a wrong fix from BM25's top N for it (default 10); "
                        "0 is off")
    p.add_argument("--no-reindex", action="store_true", help="do not rebuild the index after keeping a model")

    p = add(groups, "eval", "retrieval", _eval, "Recall@k and MRR of ticket search on a labelled query set")
    p.add_argument("--tickets", type=Path, required=True, help="ticket file (JSONL/CSV) loaded into a temporary store")
    p.add_argument("--queries", type=Path, required=True, help='JSONL lines {"query": ..., "relevant": [ids]}')
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--map", action="append", default=[], metavar="SOURCE=FIELD")
    p.add_argument("--json", action="store_true")

    p = add(groups, "eval", "retrieval-cv", _eval_cv,
            "Cross-validated tuning on question -> answer pairs (tune on k-1 folds, test on the other)")
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="solution")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--max-folds", type=int, default=None, help="stop after this many folds (quicker estimate)")
    p.add_argument("--method", choices=["adapter", "full"], default="adapter")
    p.add_argument("--hard-negatives", type=_count, default=None, metavar="N",
                   help="full method: each question also meets a wrong fix from BM25's top N for it (default "
                        "as `retrieval tune`: 10); 0 is off")
    p.add_argument("--nested", action="store_true",
                   help="choose the adapter's settings inside each training fold (inner 3-fold CV), not fixed")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; 0 turns it off")
    return value


def _open(settings: Settings):  # type: ignore[no-untyped-def]
    from core.db import open_database

    return open_database(settings)  # migrated first: `tickets ingest` and `seed` work on a fresh data dir


def _fail(err: SupportbotError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.ingest import ingest_file, parse_mapping

    try:
        report = ingest_file(settings=settings, db=_open(settings), path=args.file,
                             mapping=parse_mapping(args.map), progress=sys.stderr.isatty(), strict=args.strict)
    except SupportbotError as err:
        return _fail(err)
    if args.json:
        print(json.dumps(report.details()))
    else:
        _print_rows(args.file, report)
    if not report.stored:
        print(f"error: no ticket from {args.file} was stored", file=sys.stderr)
        return 1
    return 0 if report.indexed else 1


def _print_rows(path: Path, report: Any) -> None:
    """One line per row that was not a plain add or update (at most 50 per kind), then the totals."""
    kinds = [
        ("rejected", [(e.line, e.reason) for e in report.skipped]),
        ("duplicate id", [(n.line, f"{n.id}: {n.detail}") for n in report.duplicate_rows]),
        ("cut to the stored limit", [(n.line, f"{n.id}: {n.detail}") for n in report.truncated]),
        ("masked", [(n.line, f"{n.id}: {n.detail}") for n in report.masked]),
        ("quarantined", [(n.line, f"{n.id}: {n.detail}") for n in report.quarantined]),
    ]
    for kind, rows in kinds:
        for line, detail in rows[:50]:
            print(f"{path}:{line}: {kind}: {detail}", file=sys.stderr)
        if len(rows) > 50:
            print(f"... and {len(rows) - 50} more {kind} rows", file=sys.stderr)
    s = report.summary()
    if report.indexed:
        index = "index up to date"
    elif report.index_error:
        index = f"index STALE: {report.index_error} (run `supportbot tickets reindex`)"
    else:
        index = "index unchanged"
    print(
        f"{s['added']} added, {s['updated']} updated, {s['unchanged']} unchanged, {s['skipped']} rejected, "
        f"{s['duplicates']} duplicate ids, {s['truncated_fields']} fields cut, {s['masked_fields']} fields masked, "
        f"{s['quarantined']} quarantined; {index}"
    )
    if s["quarantined"]:
        print("quarantined tickets are not searchable; review them with `supportbot tickets quarantine`",
              file=sys.stderr)


def _delete(args: argparse.Namespace, settings: Settings) -> int:
    from core.schema import QuarantinedTicket
    from retrieval import store
    from retrieval.search import TicketIndex

    try:
        db = _open(settings)
        with db.session() as session:
            held = store.delete_tickets(session=session, ids=args.ids, table=QuarantinedTicket)
        index = TicketIndex.open(settings=settings, db=db)
        deleted = index.delete(ids=args.ids)
    except SupportbotError as err:
        return _fail(err)
    missing = sorted(set(args.ids) - set(deleted) - set(held))
    print(f"deleted {len(deleted)}" + (f" and {len(held)} quarantined" if held else "")
          + (f"; not found: {', '.join(missing)}" if missing else ""))
    return 0


def _quarantine(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval import store

    with _open(settings).session() as session:
        rows = store.quarantined(session=session)
    if args.json:
        print(json.dumps([{"id": t.id, "reasons": reasons, "title": t.title, "work_performed": t.work_performed}
                          for t, reasons in rows]))
        return 0
    if not rows:
        print("no quarantined tickets")
    for ticket, reasons in rows:
        print(f"{ticket.id}\t{', '.join(reasons)}\t{(ticket.title or ticket.work_performed)[:80]}")
    return 0


def _rescreen(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from core.schema import Ticket
    from retrieval import store
    from retrieval.ingest import screen_ticket, store_screened, ticket_anonymizer
    from retrieval.search import TicketIndex

    db = _open(settings)
    anonymize = ticket_anonymizer(settings)
    try:
        with db.session() as session:
            tickets = [store.TicketIn.from_row(row) for row in session.scalars(select(Ticket))]
            screened = [screen_ticket(t, anonymize) for t in tickets]
            held = [s.ticket.id for s in screened if s.reasons]
            # Quarantined ones leave the ticket table: an admin vouches for them again with `release`.
            store.delete_tickets(session=session, ids=held)
            outcome = store_screened(session=session, screened=screened)
        TicketIndex.open(settings=settings, db=db)  # opening reconciles the index with SQL
    except SupportbotError as err:
        return _fail(err)
    print(f"{len(tickets)} tickets screened: {len(outcome.updated)} rewritten anonymized, "
          f"{len(held)} quarantined, {len(outcome.unchanged)} unchanged")
    return 0


def _release(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval import store
    from retrieval.search import TicketIndex

    db = _open(settings)
    try:
        with db.session() as session:
            outcome = store.release_quarantined(session=session, ids=args.ids)
        released = outcome.added + outcome.updated + outcome.unchanged
        if outcome.changed:
            TicketIndex.open(settings=settings, db=db)  # opening reconciles the index with SQL
    except SupportbotError as err:
        return _fail(err)
    missing = sorted(set(args.ids) - set(released))
    print(f"released {len(released)} into the index" + (f"; not quarantined: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


def _reindex(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.search import TicketIndex

    try:
        index = TicketIndex.open(settings=settings, db=_open(settings))
        result = index.rebuild(progress=sys.stderr.isatty())
    except SupportbotError as err:
        return _fail(err)
    print(json.dumps({**result, **index.status()}))
    return 0


def _seed(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval import store
    from retrieval.ingest import ingest_file

    db = _open(settings)
    with db.session() as session:
        count = store.count_tickets(session=session)
    if count:
        print(f"the ticket store already holds {count} tickets; nothing seeded")
        return 0
    try:
        report = ingest_file(settings=settings, db=db, path=SEED_FILE)
    except SupportbotError as err:
        return _fail(err)
    print(f"seeded {len(report.added)} example tickets")
    return 0 if report.indexed else 1


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from core.schema import Ticket

    with _open(settings).session() as session:
        for row in session.scalars(select(Ticket).order_by(Ticket.id).limit(args.limit)):
            hours = f"{row.hours:g} h" if row.hours is not None else "-"
            print(f"{row.id}\t{hours}\t{(row.title or row.condition or row.work_performed)[:80]}")
    return 0


def _search(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.search import TicketIndex

    try:
        result = TicketIndex.open(settings=settings, db=_open(settings)).search(args.query, k=args.k)
    except SupportbotError as err:
        return _fail(err)
    sure = "sure" if result.confidence >= settings.min_confidence else "NOT sure (would offer escalation)"
    print(f"confidence {result.confidence:.2f}: {sure}")
    for hit in result.hits:
        print(f"\n{hit.render(400)}\n(score {hit.score:.2f})")
    return 0


def _tune(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.tune import TuneConfig, tune

    overrides: dict[str, Any] = {
        name: value
        for name, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                            ("learning_rate", args.learning_rate), ("min_gain", args.min_gain),
                            ("hard_negatives", args.hard_negatives))
        if value is not None
    }
    overrides["method"] = args.method
    db = _open(settings)
    try:
        report = tune(settings=settings, db=db, config=TuneConfig(**overrides))
    except SupportbotError as err:
        return _fail(err)
    print(json.dumps(report.to_dict(), indent=2))
    if report.kept and not args.no_reindex:
        from retrieval.search import TicketIndex

        try:
            # The index remembers which model built it; opening with the new one rebuilds it.
            index = TicketIndex.open(settings=settings, db=db, progress=sys.stderr.isatty())
        except SupportbotError as err:
            return _fail(err)
        print(f"index rebuilt with the tuned model: {index.status()['tickets']} tickets")
    return 0


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.evaluate import evaluate
    from retrieval.ingest import parse_mapping

    for path in (args.tickets, args.queries):
        if not path.is_file():  # a missing input is the user's mistake, not a skipped evaluation
            print(f"error: {path} not found (the dev data lives in ../shared/data)", file=sys.stderr)
            return 2
    try:
        scores = evaluate(settings=settings, tickets=args.tickets, queries=args.queries, k=args.k,
                          mapping=parse_mapping(args.map))
    except SupportbotError as err:
        return _fail(err)
    core = {key: scores[key] for key in scores if key.startswith(("recall@", "mrr", "n"))}
    print(json.dumps(scores if args.json else core))
    return 0


def _eval_cv(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from retrieval.evaluate import adapter_grid, crossval
    from retrieval.tune import TuneConfig

    if not args.pairs.is_file():
        print(f"error: {args.pairs} not found (the dev data lives in ../shared/data)", file=sys.stderr)
        return 2
    config = TuneConfig(method=args.method)
    if args.hard_negatives is not None:
        config = replace(config, hard_negatives=args.hard_negatives)
    if args.nested and args.method != "adapter":
        print("error: --nested chooses adapter settings; use it with --method adapter", file=sys.stderr)
        return 2
    try:
        result = crossval(settings=settings, pairs_path=args.pairs, question_field=args.question_field,
                          answer_field=args.answer_field, folds=args.folds, k=args.k, tune_config=config,
                          max_folds=args.max_folds, grid=adapter_grid(config) if args.nested else None)
    except SupportbotError as err:
        return _fail(err)
    print(json.dumps(result if args.json else {"baseline": result.get("baseline_all"),
                                                "tuned_cv": result["tuned_mean"]}))
    return 0
