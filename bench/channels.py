"""Channels benchmark: N employees ask at once through each chat adapter, beside `supportbot ask`.

  python -m bench.channels [--users 16] [--max-new-tokens 32] [--json]

One real worker (`supportbot worker --concurrency N`) and the real adapter processes (`supportbot
slack --port P` over HTTP, `supportbot telegram` long polling) run against local fakes of the Slack
and Telegram APIs (tests/fake_platforms.py). For each channel, N simulated employees send one question
each at the same moment:
- Slack: a signed app_mention event; first visible response = the "Working on it" placeholder
  (chat.postMessage in the thread), final = the chat.update that puts the answer in its place;
- Telegram: a private message update; first visible = the "typing…" chat action, final = the answer
  (sendMessage replying to the question);
- console: the path `supportbot ask` takes (intake -> queue -> worker -> SQL), in-process threads;
  it has no first visible response of its own (the terminal prints "thinking" before anything runs).
Times are from the moment the event is sent (Slack, console) or pushed to getUpdates (Telegram), to the
moment the fake API received the call. Reported: p50/p95 of both, per channel. Goal: first visible
response p95 <= 1 s. Nothing here is tuned; the questions are fixed text.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Our printer keeps jamming on every page and shows error E-502. What should I do?",
    "The VPN disconnects every few minutes when I work from home.",
    "The badge reader at the warehouse door shows a red light and does not open.",
    "My laptop dock does not detect the external monitors.",
    "The CNC mill shows alarm LIC017 spindle overload.",
    "Printer on floor 3 jams again with E-502 after the last repair.",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


def summary(name: str, first: list[float], final: list[float], users: int) -> dict[str, Any]:
    return {"channel": name, "users": users, "answered": len(final),
            "first_p50_s": percentile(first, 0.5), "first_p95_s": percentile(first, 0.95),
            "final_p50_s": percentile(final, 0.5), "final_p95_s": percentile(final, 0.95)}


def first_call_after(fake, method: str, since: float, match) -> float | None:  # type: ignore[no-untyped-def]
    for (path, payload), at in zip(list(fake.calls), list(fake.call_times)):
        if path.endswith("/" + method) and at >= since and match(payload):
            return at
    return None


def wait_all(fake, pending: dict[str, Any], timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p["final"] is None for p in pending.values()):
        for item in pending.values():
            for key, (method, match) in item["watch"].items():
                if item[key] is None:
                    at = first_call_after(fake, method, item["sent"], match)
                    if at is not None:
                        item[key] = at - item["sent"]
        time.sleep(0.05)


def run_slack(fake, port: int, users: int, timeout: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from tests.fake_platforms import BOT_USER, SLACK_SECRET

    pending: dict[str, Any] = {}
    barrier = threading.Barrier(users)

    def employee(index: int) -> None:
        channel, ts = f"CBENCH{index:04d}", f"{time.time():.6f}"
        body = json.dumps({"type": "event_callback", "team_id": "T0TEAM", "event_id": f"EvB{index}", "event": {
            "type": "app_mention", "user": f"UB{index:05d}", "channel": channel, "ts": ts,
            "text": f"<@{BOT_USER}> {QUESTIONS[index % len(QUESTIONS)]}"}})
        stamp = str(int(time.time()))
        signature = hmac.new(SLACK_SECRET.encode(), f"v0:{stamp}:{body}".encode(), hashlib.sha256).hexdigest()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=body.encode(), headers={
            "Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={signature}"})
        barrier.wait()
        pending[channel] = {"sent": time.monotonic(), "first": None, "final": None, "watch": {
            "first": ("chat.postMessage", lambda p, c=channel: p.get("channel") == c),
            "final": ("chat.update", lambda p, c=channel: p.get("channel") == c and "rate_good" in str(p.get("blocks"))),
        }}
        with urllib.request.urlopen(request, timeout=30):
            pass

    threads = [threading.Thread(target=employee, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_all(fake, pending, timeout)
    return summary("slack", [p["first"] for p in pending.values() if p["first"] is not None],
                   [p["final"] for p in pending.values() if p["final"] is not None], users)


def run_telegram(fake, users: int, timeout: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    pending: dict[str, Any] = {}
    now = int(time.time())
    for index in range(users):
        chat = 900000 + index
        message_id = 10 + index

        def replies(p: dict, c: int = chat, m: int = message_id) -> bool:
            parameters = p.get("reply_parameters")
            parameters = json.loads(parameters) if isinstance(parameters, str) else (parameters or {})
            return int(p.get("chat_id", 0)) == c and int(parameters.get("message_id", 0)) == m and "reply_markup" in p

        pending[str(chat)] = {"sent": time.monotonic(), "first": None, "final": None, "watch": {
            "first": ("sendChatAction", lambda p, c=chat: int(p.get("chat_id", 0)) == c),
            "final": ("sendMessage", replies)}}
        fake.push_update({"update_id": 50000 + index, "message": {
            "message_id": message_id, "date": now, "text": QUESTIONS[index % len(QUESTIONS)],
            "chat": {"id": chat, "type": "private", "first_name": "E"},
            "from": {"id": chat, "is_bot": False, "first_name": "E"}}})
    wait_all(fake, pending, timeout)
    return summary("telegram", [p["first"] for p in pending.values() if p["first"] is not None],
                   [p["final"] for p in pending.values() if p["final"] is not None], users)


def run_console(settings, db, users: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from bot.cli import make_intake
    from bot.console import Console

    intake = make_intake(settings, db)
    finals: list[float] = []
    barrier = threading.Barrier(users)

    def employee(index: int) -> None:
        console = Console(settings=settings, db=db, intake=intake)
        console.user = f"u-bench-{index}"
        barrier.wait()
        started = time.monotonic()
        console.ask(QUESTIONS[index % len(QUESTIONS)])
        finals.append(time.monotonic() - started)

    threads = [threading.Thread(target=employee, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary("console (supportbot ask path)", [], finals, users)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="per channel")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--channels", default="slack,telegram,console", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    wanted = set(args.channels.split(","))
    sys.path.insert(0, str(ROOT))

    from core.db import Database, upgrade
    from core.settings import load_settings
    from retrieval.ingest import ingest_file
    from tests.conftest import WorkerProcess, free_port
    from tests.fake_platforms import SLACK_SECRET, SLACK_TOKEN, TELEGRAM_TOKEN, AdapterProcess, FakePlatforms

    with tempfile.TemporaryDirectory() as tmp:
        fake = FakePlatforms()
        settings = load_settings(data_dir=Path(tmp) / "data", max_new_tokens=args.max_new_tokens,
                                 rate_limit_per_minute=0)
        upgrade(settings.db_url)
        db = Database.from_settings(settings)
        ingest_file(settings=settings, db=db, path=ROOT / "tests" / "fixtures" / "spine_tickets.jsonl")
        env = {"SUPPORTBOT_SLACK_BOT_TOKEN": SLACK_TOKEN, "SUPPORTBOT_SLACK_SIGNING_SECRET": SLACK_SECRET,
               "SUPPORTBOT_SLACK_API_URL": fake.slack_url, "SUPPORTBOT_TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
               "SUPPORTBOT_TELEGRAM_API_URL": fake.telegram_url, "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0"}
        worker = WorkerProcess(settings, name="bench", concurrency=args.users, env=env)
        port = free_port()
        slack = AdapterProcess(["slack", "--port", str(port)], settings=settings, env=env, name="bench-slack")
        telegram = AdapterProcess(["telegram"], settings=settings, env=env, name="bench-telegram")
        try:
            slack.wait_http(port)
            worker.wait_ready(db, timeout=900)
            fake.wait_for("getUpdates", timeout=600)
            runs = {"slack": lambda: run_slack(fake, port, args.users, args.timeout),
                    "telegram": lambda: run_telegram(fake, args.users, args.timeout),
                    "console": lambda: run_console(settings, db, args.users)}
            results = [run() for name, run in runs.items() if name in wanted]
        finally:
            for process in (slack, telegram):
                process.stop()
            worker.stop()
            fake.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'channel':32} {'users':>5} {'answered':>8} {'first p50':>9} {'first p95':>9} {'final p50':>9} {'final p95':>9}")
        for r in results:
            print(f"{r['channel']:32} {r['users']:>5} {r['answered']:>8} {_fmt(r['first_p50_s'])} {_fmt(r['first_p95_s'])} "
                  f"{_fmt(r['final_p50_s'])} {_fmt(r['final_p95_s'])}")
    return 0


def _fmt(value: float | None) -> str:
    return f"{value:>8.2f}s" if value is not None else f"{'-':>9}"


if __name__ == "__main__":
    sys.exit(main())
