"""Structured logs that carry conversation and message ids, and Prometheus metrics of the workers."""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from core.settings import Settings

message_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("message_id", default=None)
conversation_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "conversation_id", default=None
)

ANSWERS = Counter("supportbot_answers_total", "Answers stored, by outcome", ["status"])
FAILURES = Counter("supportbot_failures_total", "Answer tasks that failed, by kind", ["kind"])
ANSWER_LATENCY = Histogram(
    "supportbot_answer_latency_seconds",
    "Question stored to answer stored",
    buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
GENERATION_SECONDS = Histogram(
    "supportbot_generation_seconds",
    "Model generation time per batch",
    buckets=(0.1, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
BATCH_SIZE = Histogram(
    "supportbot_batch_size", "Conversations per generation batch", buckets=(1, 2, 4, 8, 16, 32)
)
COMPOSITION = Counter(
    "supportbot_answer_composition_total",
    "Answers whose model text was dropped for the tickets' fix (fallback) or that the output check changed (flagged)",
    ["kind"],
)
SWEEPER = Counter("supportbot_sweeper_total", "What the sweeper did to unanswered messages", ["action"])

_metrics_started = False


@contextmanager
def message_context(*, message_id: int | None, conversation_id: int | None = None) -> Iterator[None]:
    """Log records inside carry these ids (threads pool: contextvars are per task thread)."""
    t1 = message_id_var.set(message_id)
    t2 = conversation_id_var.set(conversation_id)
    try:
        yield
    finally:
        message_id_var.reset(t1)
        conversation_id_var.reset(t2)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.message_id = message_id_var.get()
        record.conversation_id = conversation_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "message_id": getattr(record, "message_id", None),
            "conversation_id": getattr(record, "conversation_id", None),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class QueueDepthCollector(Collector):
    """Queue depths read from the broker at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):  # type: ignore[no-untyped-def]
        from workers.status import queue_depths

        gauge = GaugeMetricFamily("supportbot_queue_depth", "Tasks waiting per queue", labels=["queue"])
        for name, depth in queue_depths(self.settings).items():
            if depth is not None:
                gauge.add_metric([name], depth)
        yield gauge


def start_metrics(settings: Settings) -> None:
    """Serve /metrics on ``settings.metrics_port`` (once per process; 0 keeps it off)."""
    global _metrics_started
    if not settings.metrics_port or _metrics_started:
        return
    REGISTRY.register(QueueDepthCollector(settings))
    start_http_server(settings.metrics_port, addr="127.0.0.1")
    _metrics_started = True
