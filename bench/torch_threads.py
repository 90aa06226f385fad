"""Why a worker generates slower than a script: torch work spread over several Python threads.

  python -m bench.torch_threads [--runs 4] [--max-new-tokens 64] [--json]

The same prompt is generated (after a retrieval search, as a worker does) in three placements, each
reported as a ratio against the first, measured in the same run:
1. everything on the main thread (what a script does; the baseline);
2. model loaded and warmed up on the main thread, search and generation on a second thread (what a
   Celery worker did before: the model loaded on one thread, the batcher thread generated);
3. everything (load, search, generation) on one dedicated thread (what a worker does now).

Every Python thread that runs a parallel torch op gets its own OpenMP team. Once the process holds more
OpenMP threads than cores, libgomp cuts its spin-wait before sleeping, and each of the hundreds of small
decode-step ops pays a wake-up. On the 2-core dev machine 2. measured 1.15x and 3. 1.00x of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "Our printer keeps jamming on every page and shows error E-502. What should I do?"
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "spine_tickets.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from core.db import Database, upgrade
    from core.settings import load_settings
    from model.prompt import build_messages
    from model.runtime import LanguageModel
    from retrieval.ingest import ingest_file
    from retrieval.search import TicketIndex
    from workers.answering import prompt_tickets

    tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    settings = load_settings(data_dir=tmp / "data", max_new_tokens=args.max_new_tokens)
    upgrade(settings.db_url)
    db = Database.from_settings(settings)

    def load() -> tuple[LanguageModel, TicketIndex, list[dict[str, str]]]:
        ingest_file(settings=settings, db=db, path=FIXTURE)
        model = LanguageModel(settings)
        index = TicketIndex.open(settings=settings, db=db)
        hits = prompt_tickets(index.search(QUESTION, k=settings.retrieval_k), settings.min_confidence)
        messages = build_messages(question=QUESTION, tickets=hits)
        model.generate([messages])  # warm-up
        return model, index, messages

    def timed(model: LanguageModel, index: TicketIndex, messages: list[dict[str, str]]) -> float:
        samples = []
        for _ in range(args.runs):
            index.search(QUESTION, k=settings.retrieval_k)
            started = time.perf_counter()
            model.generate([messages])
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    # 3. first, in a fresh process state: once the main thread has run torch ops its team exists for good.
    with ThreadPoolExecutor(1) as dedicated:
        loaded = dedicated.submit(load).result()
        one_thread = dedicated.submit(timed, *loaded).result()
    # 1. and 2.
    loaded = load()
    main_thread = timed(*loaded)
    with ThreadPoolExecutor(1) as second:
        split = second.submit(timed, *loaded).result()

    result = {
        "generate_s_main_thread": round(main_thread, 3),
        "generate_s_second_thread_over_main": round(split / main_thread, 3),
        "generate_s_one_dedicated_thread_over_main": round(one_thread / main_thread, 3),
        "runs": args.runs,
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
