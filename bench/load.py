"""Load benchmark: N simulated users against a real worker, batched against one-at-a-time in the same run.

  python -m bench.load [--users 16] [--seconds 90] [--modes 16,1] [--max-new-tokens 64] [--threads one|new]
                       [--broker auto] [--json]

Each user is a closed loop on the real path: intake (anonymize, store, queue) -> broker -> worker
process -> SQL -> the user sees the reply, then asks the next question; a share of events is delivered
twice, as a platform retry would. Each mode starts its own `supportbot worker --concurrency C` on a fresh
data dir (C=16 lets the batcher merge 16 conversations per forward pass; C=1 answers one at a time).

Reported per mode: answered (within the window), lost (sent, still unanswered after the drain),
duplicated (extra user rows or extra replies for one event), regenerated (questions the model answered
more than once), p50/p95 latency as the user saw it, answers per minute, mean batch size (the worker's
own Prometheus histogram). The last line is the batched/one-at-a-time throughput ratio (goal >= 4x at 16
users on the CPU default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "spine_tickets.jsonl"
QUESTIONS = [
    "Our printer keeps jamming on every page and shows error E-502. What should I do?",
    "The VPN disconnects every few minutes when I work from home.",
    "The badge reader at the warehouse door shows a red light and does not open.",
    "My laptop dock does not detect the external monitors.",
    "The CNC mill shows alarm LIC017 spindle overload.",
    "Printer on floor 3 jams again with E-502 after the last repair.",
]


@dataclass
class ModeResult:
    concurrency: int
    users: int
    seconds: float
    sent: int = 0
    answered: int = 0  # within the window
    lost: int = 0
    duplicated: int = 0
    regenerated: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    mean_batch: float | None = None  # rows per engine step
    mean_generation_s: float | None = None  # per request, in the engine
    mean_stored_to_answered_s: float | None = None  # the worker's view: question stored -> answer stored

    @property
    def per_minute(self) -> float:
        return self.answered / (self.seconds / 60.0)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(q * len(values)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker_concurrency": self.concurrency,
            "users": self.users,
            "seconds": self.seconds,
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "regenerated": self.regenerated,
            "failed": self.failed,
            "p50_s": _round(self.percentile(0.5)),
            "p95_s": _round(self.percentile(0.95)),
            "answers_per_min": round(self.per_minute, 2),
            "mean_batch": _round(self.mean_batch),
            "mean_generation_s": _round(self.mean_generation_s),
            "mean_stored_to_answered_s": _round(self.mean_stored_to_answered_s),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env(settings, metrics_port: int, torch_threads: int, weights: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env.update(
        SUPPORTBOT_DATA_DIR=str(settings.data_dir),
        SUPPORTBOT_MODEL_CACHE=str(settings.model_cache_dir),
        SUPPORTBOT_MAX_NEW_TOKENS=str(settings.max_new_tokens),
        SUPPORTBOT_RATE_LIMIT_PER_MINUTE="0",
        SUPPORTBOT_METRICS_PORT=str(metrics_port),
        SUPPORTBOT_TORCH_THREADS=str(torch_threads),
        SUPPORTBOT_CPU_WEIGHTS=weights,
        PYTHONPATH=str(ROOT),
    )
    if settings.broker_url:
        env["SUPPORTBOT_BROKER_URL"] = settings.broker_url
    return env


def _wait_ready(db, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 600) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from core.schema import WorkerHeartbeat

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited:\n{log.read_text()[-3000:]}")
        with db.session() as session:
            for row in session.scalars(select(WorkerHeartbeat)).all():
                if row.name.startswith(f"{name}@") and row.pid == proc.pid and row.state.get("ready"):
                    return
        time.sleep(0.3)
    raise SystemExit(f"worker not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")


def _histogram_means(port: int, names: tuple[str, ...]) -> dict[str, float | None]:
    """Means of the worker's own Prometheus histograms (sum / count)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return dict.fromkeys(names)
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            values[parts[0]] = float(parts[1])
    means: dict[str, float | None] = {}
    for name in names:
        count = values.get(f"{name}_count")
        means[name] = values[f"{name}_sum"] / count if count else None
    return means


def run_mode(
    args: argparse.Namespace, concurrency: int, folder: Path, broker_url: str | None, weights: str
) -> ModeResult:
    from sqlalchemy import func, select

    from bot.cli import make_intake
    from core.conversations import answer_for
    from core.db import Database, upgrade
    from core.schema import Message, MessageRole, MessageStatus
    from core.settings import load_settings
    from core.types import Inbound
    from retrieval.ingest import ingest_file
    from workers.app import app

    settings = load_settings(
        data_dir=folder / "data",
        max_new_tokens=args.max_new_tokens,
        broker_url=broker_url,
        rate_limit_per_minute=0,
        environment="test",
    )
    upgrade(settings.db_url)
    db = Database.from_settings(settings)
    ingest_file(settings=settings, db=db, path=args.tickets)
    metrics_port = _free_port()
    name = f"load{concurrency}"
    log = settings.data_dir / f"worker-{name}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bot.cli",
            "worker",
            "--name",
            name,
            "--concurrency",
            str(concurrency),
            "--queues",
            "answer,light",
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=_worker_env(settings, metrics_port, args.torch_threads, weights),
        cwd=ROOT,
    )
    result = ModeResult(concurrency=concurrency, users=args.users, seconds=args.seconds)
    try:
        _wait_ready(db, proc, name, log)
        intake = make_intake(settings, db)
        app._after_fork()  # a fresh producer pool for this mode's broker (one process, several brokers)
        intake.receive(
            Inbound(
                platform="bench",
                channel="c",
                thread="warm",
                user_external_id="warm",
                text="warm up the anonymizer",
                event_id="warm",
            )
        )
        lock = threading.Lock()
        start = time.monotonic()
        stop_at = start + args.seconds
        rng = random.Random(concurrency)

        def user(index: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                event = f"u{index}-{n}"
                question = f"{QUESTIONS[(index + n) % len(QUESTIONS)]} (desk {index}, try {n})"
                inbound = Inbound(
                    platform="bench",
                    channel="c",
                    # One thread per user: every question after the first carries the earlier turns
                    # (up to SUPPORTBOT_HISTORY_TURNS) in its prompt. "new": each question opens its own.
                    thread=f"u{index}" if args.threads == "one" else f"u{index}-{n}",
                    user_external_id=f"user-{index}",
                    text=question,
                    event_id=event,
                )
                sent_at = time.monotonic()
                receipt = intake.receive(inbound)
                with lock:
                    result.sent += 1
                if rng.random() < args.duplicate_share:
                    intake.receive(inbound)  # the platform retries the same event
                while True:
                    with db.session() as session:
                        reply = answer_for(session=session, message_id=receipt.message_id)
                    if reply is not None:
                        done = time.monotonic()
                        if done <= stop_at:
                            with lock:
                                result.answered += 1
                                result.latencies_s.append(done - sent_at)
                        break
                    if time.monotonic() > stop_at + args.drain_s:
                        return
                    time.sleep(0.1)
                n += 1

        threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + args.drain_s + 60)
        means = _histogram_means(metrics_port, ("supportbot_batch_size", "supportbot_generation_seconds",
                                                "supportbot_answer_latency_seconds"))
        result.mean_batch = means["supportbot_batch_size"]
        result.mean_generation_s = means["supportbot_generation_seconds"]
        result.mean_stored_to_answered_s = means["supportbot_answer_latency_seconds"]
        with db.session() as session:
            questions = session.scalars(
                select(Message).where(
                    Message.role == MessageRole.user, Message.idempotency_key.like("bench:u%")
                )
            ).all()
            replies = dict(
                session.execute(
                    select(Message.reply_to_id, func.count())
                    .where(Message.reply_to_id.in_([q.id for q in questions]))
                    .group_by(Message.reply_to_id)
                ).all()
            )
        result.lost = sum(1 for q in questions if not replies.get(q.id))
        result.duplicated = (len(questions) - result.sent) + sum(max(0, n - 1) for n in replies.values())
        result.regenerated = sum(1 for q in questions if (q.attempts or 0) > 1)
        result.failed = sum(1 for q in questions if q.status == MessageStatus.failed)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def render(results: list[ModeResult]) -> str:
    header = (
        f"{'worker':>10} {'users':>5} {'sent':>5} {'answered':>8} {'lost':>4} {'dup':>3} {'regen':>5} "
        f"{'failed':>6} {'p50 s':>7} {'p95 s':>7} {'ans/min':>8} {'batch':>5}"
    )
    lines = [header]
    for r in results:
        d = r.as_dict()
        lines.append(
            f"{'c=' + str(r.concurrency):>10} {r.users:>5} {r.sent:>5} {r.answered:>8} {r.lost:>4} {r.duplicated:>3} "
            f"{r.regenerated:>5} {r.failed:>6} {_fmt(d['p50_s']):>7} {_fmt(d['p95_s']):>7} {r.per_minute:>8.1f} "
            f"{_fmt(d['mean_batch']):>5}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=16, help="concurrent simulated users")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long users keep asking, per mode")
    parser.add_argument(
        "--modes", default="16,1", help="worker concurrencies to compare; the first is 'batched'"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="answer length (settings default: 160)"
    )
    parser.add_argument(
        "--drain-s", type=float, default=600.0, help="after the window, wait this long for answers"
    )
    parser.add_argument("--duplicate-share", type=float, default=0.1, help="share of events delivered twice")
    parser.add_argument(
        "--threads",
        choices=["one", "new"],
        default="one",
        help="one: each user asks every question in one chat thread, so prompts carry the earlier turns "
        "(the heavier case: each prompt prefills up to six turns of unrelated history); new: each question "
        "opens its own thread, as a new problem in a channel does",
    )
    parser.add_argument(
        "--broker",
        choices=["auto", "redis", "file"],
        default="auto",
        help="auto: redis when redis-server is installed, else the embedded file broker",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="worker torch threads (0: torch's default). On a CPU shared with other jobs, 1 avoids "
        "OpenMP oversubscription, which can slow the model down more than tenfold",
    )
    parser.add_argument("--weights", default="auto", help="SUPPORTBOT_CPU_WEIGHTS of the batched worker")
    parser.add_argument(
        "--baseline-weights",
        default="auto",
        help="SUPPORTBOT_CPU_WEIGHTS of the one-at-a-time worker (the last mode): fp16 is faster than bf16 "
        "for one row at a time, so '--baseline-weights fp16' gives that baseline its best form",
    )
    parser.add_argument("--tickets", type=Path, default=FIXTURE, help="tickets to index (JSONL or CSV)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    modes = [int(m) for m in args.modes.split(",") if m.strip()]

    use_redis = args.broker == "redis" or (args.broker == "auto" and shutil.which("redis-server"))
    if args.broker == "redis" and not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (apt-get install redis-server) or use --broker file")
    with tempfile.TemporaryDirectory(prefix="supportbot-load-") as tmp:
        from tests.conftest import RedisServer

        redis_server = RedisServer(Path(tmp)) if use_redis else None
        results = []
        try:
            for i, concurrency in enumerate(modes):
                url = redis_server.url(i) if redis_server else None
                weights = args.baseline_weights if i == len(modes) - 1 and i > 0 else args.weights
                print(
                    f"-- worker --concurrency {concurrency}: {args.users} users for {args.seconds:g} s "
                    f"({'redis' if url else 'file broker'}, max_new_tokens {args.max_new_tokens}, "
                    f"torch threads {args.torch_threads or 'default'}, threads: {args.threads}, "
                    f"weights {weights})",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(run_mode(args, concurrency, Path(tmp) / f"mode-{concurrency}", url, weights))
        finally:
            if redis_server:
                redis_server.stop()
    ratio = (
        results[0].per_minute / results[-1].per_minute
        if len(results) > 1 and results[-1].per_minute
        else None
    )
    if args.json:
        print(
            json.dumps({"modes": [r.as_dict() for r in results], "threads": args.threads,
                        "weights": args.weights, "baseline_weights": args.baseline_weights,
                        "throughput_ratio": _round(ratio)}, indent=2)
        )
    else:
        print(render(results))
        if ratio is not None:
            print(
                f"batched (c={results[0].concurrency}) / one-at-a-time (c={results[-1].concurrency}) "
                f"answers per minute: {ratio:.2f}x (goal >= 4x at 16 users)"
            )
    healthy = all(r.lost == 0 and r.duplicated == 0 for r in results)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
