"""Cold start of a worker and of the command line, before and after the lazy paths, in one run.

  python -m bench.cold_start [--before REV] [--runs 3] [--json]

"before" is a git worktree of REV (default: the commit before the cold-start work, see BEFORE_REV) in a
temp dir, or a folder given as --before (this checkout with the cold-start changes taken out, so the
two differ in nothing else), run with the same Python and venv; "after" is this checkout. Both measure, alternating, on
the same machine in the same run:

1. worker ready: `supportbot worker` process start -> its heartbeat row says ready (model and index
   loaded), the model already converted and cached, 20 tickets in the index (goal <= 5 s);
2. `supportbot --help`: process start -> exit (goal <= 0.5 s);
3. `supportbot anonymize` of one line: process start -> exit.

4. the floor: a bare ``python -c "import torch; from transformers import AutoModelForCausalLM"``, the
   imports any worker that runs the model through transformers pays before it does anything (no
   supportbot code at all), so "worker ready" can be read against what this machine allows.

Then, for "after", where a worker's start goes (imports, model, index, anonymizer), from timers around
each step in one fresh process (`--breakdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last commit before issue 15's cold-start work (lazy CLI).
BEFORE_REV = "5407665"
SEED = ROOT / "tests" / "fixtures" / "spine_tickets.jsonl"
LINE = "Priya Raman's laptop at 10.2.3.4 shows E-502, call +1 415 555 0100\n"


def _env(tree: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env.update(
        SUPPORTBOT_DATA_DIR=str(data_dir),
        PYTHONPATH=str(tree),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _cli(tree: Path, data_dir: Path, *argv: str, stdin: str = "") -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", *argv], cwd=tree, env=_env(tree, data_dir), input=stdin,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: supportbot {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return took


FLOOR = "import torch; from transformers import AutoModelForCausalLM, BitsAndBytesConfig"


def _floor() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return time.perf_counter() - started


def _worker_ready(tree: Path, data_dir: Path, timeout: float = 600.0) -> float:
    """Process start -> a heartbeat row of this pid that says ready."""
    log = open(data_dir / "bench-worker.log", "ab")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "worker", "--name", "bench", "--concurrency", "1"],
        cwd=tree, env=_env(tree, data_dir), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        db = data_dir / "supportbot.db"
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {(data_dir / 'bench-worker.log').read_text()[-2000:]}")
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=5) as conn:
                        rows = conn.execute("SELECT pid, state FROM worker_heartbeats").fetchall()
                except sqlite3.OperationalError:  # table not there yet, or locked for a moment
                    rows = []
                if any(pid == proc.pid and json.loads(state or "{}").get("ready") for pid, state in rows):
                    return time.perf_counter() - started
            time.sleep(0.05)
        raise RuntimeError("worker not ready in time")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _prepare(tree: Path, data_dir: Path) -> None:
    """Untimed: schema, tickets and index, and the model conversion cache."""
    _cli(tree, data_dir, "db", "upgrade")
    _cli(tree, data_dir, "tickets", "ingest", str(SEED))
    _cli(tree, data_dir, "model", "prepare")


def breakdown() -> dict[str, float]:
    """Where a worker's start goes, step by step, in this (fresh) process of the "after" tree."""
    timings: dict[str, float] = {}

    def step(name: str, fn):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        return out

    step("import celery + workers.tasks", lambda: __import__("workers.tasks"))
    step("import torch", lambda: __import__("torch"))
    step("import workers.answering (faiss, retrieval)", lambda: __import__("workers.answering"))
    # transformers is no longer imported: its model classes pulled in modeling_utils, and with it
    # torch.distributed.tensor, torch._dynamo, accelerate and scipy.optimize (1.9 s here). The worker reads
    # the Llama and MiniLM folders itself (model/llama.py, model/tokens.py, retrieval/bert.py).
    step("import model.runtime (engine, plain Llama reader)", lambda: __import__("model.runtime"))
    from core.db import open_database
    from core.settings import load_settings
    from model.runtime import LanguageModel
    from retrieval.search import TicketIndex

    settings = load_settings()
    db = step("database (migrate check)", lambda: open_database(settings))
    step("language model load (cached conversion)", lambda: LanguageModel(settings))
    step("ticket index load (embedder + FAISS)", lambda: TicketIndex.open(settings=settings, db=db))
    from bot.privacy import Anonymizer

    step("anonymizer load (not on the worker's answer path)", lambda: Anonymizer.from_settings(settings))
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE_REV,
                        help="git revision measured as 'before' (checked out to a temp worktree), or a folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.breakdown:
        print(json.dumps(breakdown()))
        return 0

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        given = Path(args.before)
        before_tree = given if given.is_dir() else Path(tmp) / "before"
        if not given.is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT,
                           check=True, capture_output=True)  # fmt: skip
        try:
            trees = {"before": before_tree, "after": ROOT}
            dirs = {name: Path(tmp) / f"data-{name}" for name in trees}
            for name, tree in trees.items():
                _prepare(tree, dirs[name])
            results: dict[str, dict[str, list[float]]] = {n: {"worker_ready_s": [], "help_s": [], "anonymize_s": []}
                                                          for n in trees}  # fmt: skip
            floor: list[float] = []
            for run in range(args.runs):
                order = list(trees) if run % 2 == 0 else list(reversed(trees))  # neither always goes first
                for name in order:
                    tree, data = trees[name], dirs[name]
                    results[name]["help_s"].append(_cli(tree, data, "--help"))
                    results[name]["anonymize_s"].append(_cli(tree, data, "anonymize", stdin=LINE))
                    results[name]["worker_ready_s"].append(_worker_ready(tree, data))
                floor.append(_floor())
            parts = subprocess.run(
                [sys.executable, "-m", "bench.cold_start", "--breakdown"], cwd=ROOT, env=_env(ROOT, dirs["after"]),
                capture_output=True, text=True, timeout=900, check=True,
            ).stdout  # fmt: skip
        finally:
            if not given.is_dir():
                subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT,
                               capture_output=True)  # fmt: skip

    medians = {name: {k: round(statistics.median(v), 3) for k, v in r.items()} for name, r in results.items()}
    report = {
        "before_rev": args.before,
        "runs": args.runs,
        "median": medians,
        "after_over_before": {k: round(medians["after"][k] / medians["before"][k], 3) for k in medians["after"]},
        "goals": {"worker_ready_s": 5.0, "help_s": 0.5},
        "import_floor_s": round(statistics.median(floor), 3),
        "all": results,
        "worker_start_breakdown_s": json.loads(parts.strip().splitlines()[-1]),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"cold start, median of {args.runs} (before = {args.before}, after = this checkout; "
          f"load {report['load_avg_1m']} on {report['cpus']} CPUs)")  # fmt: skip
    for key, label in (("worker_ready_s", "worker ready"), ("help_s", "supportbot --help"),
                       ("anonymize_s", "supportbot anonymize (1 line)")):  # fmt: skip
        b, a = medians["before"][key], medians["after"][key]
        goal = report["goals"].get(key)
        print(f"  {label:32s} before {b:7.2f} s  after {a:7.2f} s  after/before {a / b:5.2f}"
              + (f"  (goal <= {goal:g} s)" if goal else ""))  # fmt: skip
    print(f"  import floor (torch + transformers' model classes, no supportbot code): "
          f"{report['import_floor_s']:.2f} s; worker ready after/floor "
          f"{medians['after']['worker_ready_s'] / report['import_floor_s']:.2f}")  # fmt: skip
    print("where a worker's start goes (after, one process):")
    for name, took in report["worker_start_breakdown_s"].items():
        print(f"  {name:60s} {took:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
