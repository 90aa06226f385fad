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

from model.runtime import Generation, LanguageModel

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, model: LanguageModel, *, max_batch: int = 16, gather_s: float = 0.02) -> None:
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s  # short wait so requests arriving together share the first pass
        self._requests: queue.Queue[tuple[list[dict[str, str]], int | None, Future[Generation]]] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def generate(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int | None = None) -> Generation:
        future: Future[Generation] = Future()
        self._requests.put((list(messages), max_new_tokens, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self._requests.get()]
            try:
                while len(batch) < self.max_batch:
                    batch.append(self._requests.get(timeout=self.gather_s))
            except queue.Empty:
                pass
            max_new = max((b[1] or self.model.settings.max_new_tokens) for b in batch)
            try:
                results = self.model.generate([b[0] for b in batch], max_new_tokens=max_new)
            except BaseException as err:  # each waiting request gets the error, the loop goes on
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            if len(batch) > 1:
                log.debug("generated a batch of %d", len(batch))
            for (_, _, future), result in zip(batch, results):
                future.set_result(result)
