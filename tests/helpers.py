"""Small test helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable

import redis

from core.settings import Settings


class BrokerWatch:
    """Every command the Redis broker receives while the block runs (MONITOR): where leaks would show."""

    def __init__(self, url: str) -> None:
        # No read timeout: MONITOR is silent while a worker boots, and redis-py 8 gives up after 5 s.
        self.client = redis.Redis.from_url(url, socket_timeout=None)
        self.commands: list[str] = []
        self._stop = threading.Event()
        self._listening = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        try:
            with self.client.monitor() as monitor:
                self._listening.set()
                for command in monitor.listen():
                    self.commands.append(command["command"])
                    if self._stop.is_set():
                        return
        except Exception as err:  # noqa: BLE001 - surfaced by __exit__: a dead watch must not pass as "clean"
            self.error = err
            self._listening.set()

    def __enter__(self) -> BrokerWatch:
        self.client.flushdb()
        self._thread.start()
        self._listening.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.ping()  # wakes the monitor loop so it sees the stop flag
        self._thread.join(5)
        if self.error is not None:
            raise AssertionError(f"the broker watch died: {self.error!r}") from self.error

    @property
    def text(self) -> str:
        return "\n".join(self.commands)


def module_cli(settings: Settings, module: str) -> Callable[..., int]:
    """``run("tickets", "ingest", path)``: one module's commands as the CLI parses them, in this process."""
    import importlib

    parser = argparse.ArgumentParser()
    root = parser.add_subparsers(dest="command")
    eval_parser = root.add_parser("eval")
    importlib.import_module(module).register({"root": root, "eval": eval_parser.add_subparsers(dest="eval_command")})

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args, settings)

    return run


def retrieval_cli(settings: Settings) -> Callable[..., int]:
    return module_cli(settings, "retrieval.cli")
