"""Batch generation across in-flight requests.

Worker threads each hold one conversation; instead of taking turns on the model, they drop their
prompt here and one loop runs them together: a request that arrives while a batch is generating
waits for the next one, so the model stays busy and every forward pass serves several users.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from core.errors import GenerationTimeout

from model.runtime import Generation, LanguageModel
from workers.observability import BATCH_SIZE, GENERATION_SECONDS

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, model: LanguageModel, *, max_batch: int = 16, gather_s: float = 0.01) -> None:
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s  # short wait so requests arriving together share the first pass
        self._requests: queue.Queue[tuple[list[dict[str, str]], int | None, Future[Generation]]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def generate(
        self, messages: Sequence[dict[str, str]], *, max_new_tokens: int | None = None, timeout_s: float | None = None
    ) -> Generation:
        """Queue one prompt and wait for its generation. Past ``timeout_s`` the caller gets GenerationTimeout
        (the thread pool has no Celery time limits, so this is the task's own hard stop)."""
        future: Future[Generation] = Future()
        self._requests.put((list(messages), max_new_tokens, future))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout as err:
            future.cancel()
            raise GenerationTimeout(f"no answer within {timeout_s:g} s") from err

    def _loop(self) -> None:
        while True:
            batch = [self._requests.get()]
            try:
                while len(batch) < self.max_batch:
                    batch.append(self._requests.get(timeout=self.gather_s))
            except queue.Empty:
                pass
            batch = [b for b in batch if b[2].set_running_or_notify_cancel()]
            if not batch:
                continue
            max_new = max((b[1] or self.model.settings.max_new_tokens) for b in batch)
            try:
                results = self.model.generate([b[0] for b in batch], max_new_tokens=max_new)
            except BaseException as err:  # each waiting request gets the error, the loop goes on
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            BATCH_SIZE.observe(len(batch))
            GENERATION_SECONDS.observe(results[0].seconds if results else 0.0)
            for (_, _, future), result in zip(batch, results):
                future.set_result(result)
