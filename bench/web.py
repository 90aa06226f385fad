"""How fast the web console's overview page answers with 10,000 conversations in the database.

    python -m bench.web [--conversations 10000] [--baseline 100] [--requests 60]

Two SQLite databases are seeded with bulk inserts (the same mix of answered, escalated, fallback and
failed questions, ratings and latencies over the last 30 days): the baseline with ``--baseline``
conversations, the measured one with ``--conversations``. Each is served by uvicorn on a free port, the
way `supportbot web` serves it, and the overview page is fetched by a logged-in client over HTTP: as
shipped (its numbers refreshed in the background every OVERVIEW_TTL_S) and recomputed on every request
(the aggregate queries in the request). The goal is p95 <= 300 ms at 10,000 conversations; the ratio to
the baseline (and the SQL alone) shows what the size costs. Results go to bench/results/web.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from core.db import Database, upgrade
from core.schema import (
    Conversation,
    Escalation,
    EscalationStatus,
    Message,
    MessageRole,
    MessageStatus,
    Rating,
    User,
)
from core.settings import Settings, load_settings

GOAL_P95_MS = 300.0
HAS_CLAIMS = hasattr(Escalation, "claimed_at")  # the desk's column (migration 0003)
QUESTIONS = [
    "The label printer on line {n} jams on every page",
    "VPN client drops every few minutes on laptop {n}",
    "Monitor {n} flickers after the docking station update",
    "Scanner {n} shows error E-{n} at start-up",
]
FIXES = [
    "Open tray 2, pull the stuck sheet out and restart the printer.",
    "Update the VPN client and switch the protocol to IKEv2.",
    "Replace the DisplayPort cable and set the refresh rate to 60 Hz.",
    "Clean the scanner glass and recalibrate from the service menu.",
]


def seed(database: Database, *, conversations: int, days: int = 30, rng_seed: int = 0) -> dict[str, int]:
    """Bulk-insert ``conversations`` one-question conversations spread over the last ``days`` days.

    Mix (fixed by the seed): 70 % answered, 10 % fallback answers, 12 % escalated, 5 % failed, 3 % still
    queued; about half the answers rated, four in five of those 👍.
    """
    rng = random.Random(rng_seed)
    now = datetime.now(timezone.utc)
    with database.session() as session:
        next_user = (session.scalar(select(func.max(User.id))) or 0) + 1
        next_conv = (session.scalar(select(func.max(Conversation.id))) or 0) + 1
        next_msg = (session.scalar(select(func.max(Message.id))) or 0) + 1
    platforms = ["slack", "telegram", "console"]
    users = [
        {"id": next_user + i, "platform": platforms[i % 3], "external_id": f"bench-{next_user + i}",
         "role": "employee", "created_at": now - timedelta(days=days)}
        for i in range(200)
    ]  # fmt: skip
    convs: list[dict[str, Any]] = []
    msgs: list[dict[str, Any]] = []
    ratings: list[dict[str, Any]] = []
    escalations: list[dict[str, Any]] = []
    counts = dict.fromkeys(("answered", "fallback", "escalated", "failed", "queued"), 0)
    for i in range(conversations):
        user = users[rng.randrange(len(users))]
        at = now - timedelta(seconds=rng.uniform(0, days * 86400 - 60))
        conv_id, q_id, a_id = next_conv + i, next_msg + 2 * i, next_msg + 2 * i + 1
        kind = rng.choices(["answered", "fallback", "escalated", "failed", "queued"], [70, 10, 12, 5, 3])[0]
        counts[kind] += 1
        topic = rng.randrange(len(QUESTIONS))
        convs.append({"id": conv_id, "platform": user["platform"], "channel": "C1", "thread": f"bench-{conv_id}",
                      "user_id": user["id"], "created_at": at})  # fmt: skip
        q_status = {"failed": MessageStatus.failed, "queued": MessageStatus.queued}.get(kind, MessageStatus.answered)
        msgs.append(_message(q_id, conv_id, user["id"], MessageRole.user, QUESTIONS[topic].format(n=i % 97), q_status, at,
                             error="the model did not answer in time" if kind == "failed" else None))  # fmt: skip
        if kind in ("failed", "queued"):
            continue
        latency = rng.lognormvariate(1.0, 0.5) * 1000.0
        answered = at + timedelta(milliseconds=latency)
        msgs.append(
            _message(a_id, conv_id, None, MessageRole.assistant, FIXES[topic], MessageStatus.sent, answered,
                     reply_to=q_id, latency_ms=latency, fallback=kind == "fallback", sources=[f"T-{topic}"])
        )  # fmt: skip
        if kind == "escalated":
            status = rng.choice(list(EscalationStatus))
            claimed = answered + timedelta(minutes=rng.uniform(2, 90))
            row = {
                "conversation_id": conv_id, "message_id": q_id, "status": status.value, "summary": "needs a technician",
                "created_at": answered, "resolved_at": claimed + timedelta(hours=rng.uniform(0.5, 30))
                if status == EscalationStatus.resolved else None,
            }  # fmt: skip
            if HAS_CLAIMS:
                row["claimed_at"] = claimed if status != EscalationStatus.open else None
            escalations.append(row)
        if rng.random() < 0.5:
            ratings.append({"message_id": a_id, "user_id": user["id"], "value": 1 if rng.random() < 0.8 else -1,
                            "reason": None, "created_at": answered + timedelta(minutes=2)})  # fmt: skip
    with database.session() as session:
        session.execute(insert(User), users)
        session.execute(insert(Conversation), convs)
        session.execute(insert(Message), msgs)
        if escalations:
            session.execute(insert(Escalation), escalations)
        if ratings:
            session.execute(insert(Rating), ratings)
    return {**counts, "ratings": len(ratings), "messages": len(msgs)}


def _message(msg_id: int, conv_id: int, user_id: int | None, role: MessageRole, text: str, status: MessageStatus,
             at: datetime, *, reply_to: int | None = None, latency_ms: float | None = None, fallback: bool = False,
             sources: list[str] | None = None, error: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "id": msg_id, "conversation_id": conv_id, "user_id": user_id, "role": role.value, "text": text,
        "status": status.value, "idempotency_key": f"bench:{msg_id}", "reply_to_id": reply_to, "created_at": at,
        "updated_at": at, "answered_at": at if role == MessageRole.assistant else None, "latency_ms": latency_ms,
        "model_version": "smollm2-135m-instruct" if role == MessageRole.assistant else None,
        "sources": sources or [], "attempts": 1, "error": error, "meta": {}, "fallback": fallback, "flagged": False,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The console app under uvicorn on a thread, and a logged-in HTTP client."""

    def __init__(self, settings: Settings, database: Database, *, overview_ttl_s: float) -> None:
        import httpx
        import uvicorn

        from bot.web.app import create_app
        from bot.web.auth import create_account

        with database.session() as session:
            create_account(session=session, name="bench", password="bench-password-123")  # made, or reset for the second server
        self.port = _free_port()
        app = create_app(settings=settings, database=database, overview_ttl_s=overview_ttl_s)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", follow_redirects=False)
        page = self.client.get("/login").text
        token = page.split('name="csrf_token" value="')[1].split('"')[0]
        done = self.client.post("/login", data={"csrf_token": token, "name": "bench", "password": "bench-password-123"})
        assert done.status_code == 303, done.text

    def time_page(self, path: str, requests: int) -> list[float]:
        for _ in range(5):  # warm-up: templates compiled, connections pooled
            assert self.client.get(path).status_code == 200
        timings = []
        for _ in range(requests):
            started = time.perf_counter()
            response = self.client.get(path)
            timings.append((time.perf_counter() - started) * 1000.0)
            assert response.status_code == 200 and "<svg" in response.text
        return timings

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _summary(timings: list[float]) -> dict[str, float]:
    ordered = sorted(timings)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[max(0, int(round(0.95 * len(ordered))) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
    }


def measure(size: int, requests: int, folder: Path) -> dict[str, Any]:
    from bot.web import queries
    from bot.web.app import OVERVIEW_TTL_S

    settings = load_settings(data_dir=folder / f"data-{size}", environment="development",
                             web_secret_key="bench-" + "k" * 40)  # fmt: skip
    settings.ensure_dirs()
    upgrade(settings.db_url)
    database = Database(settings.db_url)
    started = time.perf_counter()
    mix = seed(database, conversations=size)
    seed_s = time.perf_counter() - started
    sql = []
    for _ in range(requests):
        t0 = time.perf_counter()
        with database.session() as session:
            queries.overview(session=session, days=30)
        sql.append((time.perf_counter() - t0) * 1000.0)
    pages = {}
    # cold: every request runs the aggregate queries; served: the console as shipped (OVERVIEW_TTL_S).
    for label, ttl in (("page_cold", 0.0), ("page", OVERVIEW_TTL_S)):
        served = Served(settings, database, overview_ttl_s=ttl)
        try:
            pages[label] = _summary(served.time_page("/", requests))
        finally:
            served.close()
    database.engine.dispose()
    return {"conversations": size, "seed_s": round(seed_s, 2), "mix": mix, **pages, "sql": _summary(sql)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/results/web.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        baseline = measure(args.baseline, args.requests, Path(tmp))
        measured = measure(args.conversations, args.requests, Path(tmp))
    ratio = measured["page"]["p95_ms"] / baseline["page"]["p95_ms"] if baseline["page"]["p95_ms"] else None
    cold = measured["page_cold"]["p95_ms"] / baseline["page_cold"]["p95_ms"] if baseline["page_cold"]["p95_ms"] else None
    result = {
        "baseline": baseline,
        "measured": measured,
        "p95_ratio_to_baseline": round(ratio, 2) if ratio else None,
        "cold_p95_ratio_to_baseline": round(cold, 2) if cold else None,
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "goal_p95_ms": GOAL_P95_MS,
        "meets_goal": measured["page"]["p95_ms"] <= GOAL_P95_MS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for row in (baseline, measured):
        print(f"{row['conversations']:>6} conversations: overview page p50 {row['page']['p50_ms']} ms, "
              f"p95 {row['page']['p95_ms']} ms; recomputed on every request p50 {row['page_cold']['p50_ms']} ms, "
              f"p95 {row['page_cold']['p95_ms']} ms (SQL alone p95 {row['sql']['p95_ms']} ms); seeded in {row['seed_s']} s")  # fmt: skip
    print(f"p95 ratio {result['p95_ratio_to_baseline']}x the baseline (recomputed: {result['cold_p95_ratio_to_baseline']}x); "
          f"load average {result['load_average'][0]:.1f} on {result['cpus']} CPUs; goal p95 <= {GOAL_P95_MS:.0f} ms: "
          f"{'met' if result['meets_goal'] else 'NOT met'} (details in {args.out})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
