"""Build labelled retrieval sets (tickets.jsonl + queries.jsonl for ``supportbot eval retrieval``).

    python -m retrieval.labelled maintnet ../shared/data/tickets/maintnet_dev.jsonl OUT_DIR
    python -m retrieval.labelled pairs ../shared/data/tickets/dellqa_dev.jsonl OUT_DIR \\
        --question-field question --answer-field solution

maintnet: a logbook has no queries, so we use repeat problems. Tickets are grouped when their repair
is the same (normalized text: case, punctuation and repeated sentences ignored) and the annotated part
is the same. One ticket per group of two or more becomes a query (its reported problem, the
``title``) and is removed from the corpus; the other members are its relevant tickets. The query's
own text is therefore never in the index; what must be found is a different report of the same
fault fixed the same way.

pairs: question -> accepted answer sets (the Dell forum file). Each answer becomes a ticket holding
only ``work_performed``; the question is the query and never enters a ticket, otherwise the
evaluation would find the question text itself.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path


def normalize_repair(text: str) -> str:
    sentences = [" ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split()) for s in re.split(r"[.;]", text)]
    return " | ".join(dict.fromkeys(s for s in sentences if s))


def build_maintnet(source: Path, out_dir: Path, *, seed: int = 0) -> dict[str, int]:
    rows = [json.loads(line) for line in source.open(encoding="utf-8") if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        part = (row.get("part") or "").strip().lower()
        repair = normalize_repair(row.get("work_performed") or "")
        if part and repair:
            groups[(repair, part)].append(row)
    rng = random.Random(seed)
    queries, query_ids = [], set()
    for key in sorted(groups):
        members = groups[key]
        if len(members) < 2:
            continue
        query = rng.choice(members)
        query_ids.add(query["ticket_id"])
        queries.append({"query": query["title"], "relevant": [m["ticket_id"] for m in members if m is not query]})
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "tickets.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            if row["ticket_id"] in query_ids:
                continue
            ticket = {"id": row["ticket_id"], "title": row.get("title", ""), "machine": row.get("part", ""),
                      "work_performed": row.get("work_performed", "")}
            out.write(json.dumps(ticket) + "\n")
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as out:
        for query in queries:
            out.write(json.dumps(query) + "\n")
    return {"tickets": len(rows) - len(query_ids), "queries": len(queries)}


def build_pairs(source: Path, out_dir: Path, *, question_field: str, answer_field: str) -> dict[str, int]:
    from retrieval.evaluate import read_pairs

    rows = read_pairs(source, question_field=question_field, answer_field=answer_field)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "tickets.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"id": row["id"], "work_performed": row["a"]}) + "\n")
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"query": row["q"], "relevant": [row["id"]]}) + "\n")
    return {"tickets": len(rows), "queries": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["maintnet", "pairs"])
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--answer-field", default="solution")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"skipped: {args.source} not found (the dev data lives in ../shared/data)")
        return 0
    if args.kind == "maintnet":
        counts = build_maintnet(args.source, args.out_dir, seed=args.seed)
    else:
        counts = build_pairs(args.source, args.out_dir, question_field=args.question_field,
                             answer_field=args.answer_field)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
