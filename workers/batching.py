"""Batch generation across in-flight requests.

Worker threads each hold one conversation; instead of taking turns on the model, they drop their
prompt here and one loop runs them together: a request that arrives while a batch is generating
waits for the next one, so the model stays busy and every forward pass serves several users.

Decoding one token costs about the same for one row as for sixteen (reading the weights dominates),
so the more rows share a pass, the more answers per minute. Requests do not arrive together, though:
after a batch, each worker thread stores its reply, takes its next task and runs retrieval before it
asks again. The loop therefore waits a little for stragglers, longer when the last batch was large and
slow (they are surely coming, and a straggler missed now waits a whole batch), not at all for a lone user.

The loop's thread is also the answer path's only torch thread: the model is loaded there, and other
OpenMP work (retrieval's search: embedding and FAISS; adapter swaps) is handed to it with ``call``.
Every Python thread that runs a parallel op gets its own OpenMP team, and once a process holds more
OpenMP threads than cores, libgomp stops spin-waiting between ops: generation on a second thread was
1.15x slower (``python -m bench.torch_threads``). One exception remains: the periodic export's
anonymizer scrub (light queue) runs MiniLM on its task thread; it is rare and short.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from core.errors import GenerationTimeout, ModelError
from model.runtime import Generation, LanguageModel
from workers.observability import BATCH_SIZE, GENERATION_SECONDS

log = logging.getLogger(__name__)


@dataclass
class _Request:
    messages: list[dict[str, str]]
    max_new_tokens: int | None
    future: Future[Generation]


T = TypeVar("T")


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


class Batcher:
    def __init__(
        self,
        model: LanguageModel | None = None,
        *,
        load: Callable[[], LanguageModel] | None = None,
        max_batch: int = 16,
        gather_s: float = 0.01,
        max_gather_s: float = 1.0,
        gather_share: float = 0.1,
    ) -> None:
        if (model is None) == (load is None):
            raise ValueError("Batcher needs a model or a function that loads one")
        self.model: LanguageModel = model  # type: ignore[assignment]  # set on the thread when load is given
        self._load = load
        self._loaded: Future[LanguageModel] = Future()
        if model is not None:
            self._loaded.set_result(model)
        self.max_batch = max_batch
        self.gather_s = gather_s  # short wait so requests arriving together share the first pass
        self.max_gather_s = max_gather_s  # never wait longer than this for stragglers
        self.gather_share = gather_share  # ...nor longer than this share of the last batch's time
        self._requests: queue.Queue[_Request | _Call] = queue.Queue()
        self._last_size = 0
        self._last_seconds = 0.0
        self.batches = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            self._loaded.result()  # the loading error, if that is what ended the thread
            raise ModelError("the model thread is not running")

    def loaded(self) -> LanguageModel:
        """The model, once the loop's thread has loaded it (its loading error, if that failed)."""
        return self._loaded.result()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the torch thread, between batches, and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        self._check_alive()
        future: Future[T] = Future()
        self._requests.put(_Call(lambda: fn(*args, **kwargs), future))
        return future.result()

    def generate(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> Generation:
        """Queue one prompt and wait for its generation. Past ``timeout_s`` the caller gets GenerationTimeout
        (the thread pool has no Celery time limits, so this is the task's own hard stop)."""
        if threading.current_thread() is self._thread:
            raise ModelError("generate() from the batcher's own thread would wait on itself")
        self._check_alive()
        future: Future[Generation] = Future()
        self._requests.put(_Request(list(messages), max_new_tokens, future))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout as err:
            future.cancel()  # still queued: dropped from the next batch; already running: result ignored
            raise GenerationTimeout(f"no answer within {timeout_s:g} s") from err

    def gather_window(self) -> float:
        """How long to wait for more requests after the first one of a batch arrived."""
        if self._last_size <= 1:
            return self.gather_s
        return min(self.max_gather_s, max(self.gather_s, self.gather_share * self._last_seconds))

    def _take_batch(self) -> list[_Request]:
        first = self._requests.get()
        while isinstance(first, _Call):
            self._call(first)
            first = self._requests.get()
        batch = [first]
        deadline = time.monotonic() + self.gather_window()
        while len(batch) < self.max_batch:
            try:
                item = self._requests.get_nowait()  # whatever queued up during the last batch
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._requests.get(timeout=left)
                except queue.Empty:
                    break
            if isinstance(item, _Call):
                # Run now: a straggler's retrieval done in the gather window lets its prompt join this batch.
                self._call(item)
            else:
                batch.append(item)
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    @staticmethod
    def _call(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as err:  # noqa: BLE001 - the caller gets it; the loop goes on
            call.future.set_exception(err)

    def _loop(self) -> None:
        if self._load is not None:
            try:
                self.model = self._load()
            except BaseException as err:  # noqa: BLE001 - raised to whoever waits in loaded()
                self._loaded.set_exception(err)
                return
            self._loaded.set_result(self.model)
        while True:
            try:
                batch = self._take_batch()
                if batch:
                    self._run(batch)
            except BaseException:  # the loop is every conversation's only way to the model: it must live
                log.exception("batcher loop error")

    def _run(self, batch: list[_Request]) -> None:
        max_new = max((r.max_new_tokens or self.model.settings.max_new_tokens) for r in batch)
        started = time.monotonic()
        try:
            results = self.model.generate([r.messages for r in batch], max_new_tokens=max_new)
        except BaseException as err:  # each waiting request gets the error, the loop goes on
            for r in batch:
                r.future.set_exception(err)
            return
        seconds = time.monotonic() - started
        self._last_size, self._last_seconds = len(batch), seconds
        self.batches += 1
        self.rows += len(batch)
        BATCH_SIZE.observe(len(batch))
        GENERATION_SECONDS.observe(seconds)
        log.debug("generated a batch of %d in %.2f s", len(batch), seconds)
        for r, result in zip(batch, results):
            if result.timed_out and not result.text:
                # The generation deadline passed before this row said anything: a clear timeout, not "".
                r.future.set_exception(
                    GenerationTimeout(f"no answer within {self.model.settings.generation_timeout_s:g} s")
                )
            else:
                r.future.set_result(result)
