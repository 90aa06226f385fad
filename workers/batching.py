"""Continuous batching across in-flight requests.

Worker threads each hold one conversation; instead of taking turns on the model, they drop their
prompt here and one loop feeds the model's engine (``model.engine``): a request joins the running batch
at the next step (after its prompt is prefilled, a chunk per step) and leaves as soon as it is done, so
nobody waits for a batch to finish or for its slowest member. Decoding one token costs little more
for sixteen rows than for one (reading the weights dominates), so every step serves every user.

The loop's thread is also the answer path's only torch thread: the model is loaded there, and other
OpenMP work (retrieval's search: embedding and FAISS; adapter swaps) is handed to it with ``call`` and
runs between steps. Every Python thread that runs a parallel op gets its own OpenMP team, and once a
process holds more OpenMP threads than cores, libgomp stops spin-waiting between ops: generation on a
second thread was 1.15x slower (``python -m bench.torch_threads``). A call that changes the weights
(``call(..., drain=True)``: an adapter swap) waits until the running requests are done, so an answer
is made by one model version from its first token to its last. One exception remains: the periodic
export's anonymizer scrub (light queue) runs MiniLM on its task thread; it is rare and short.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from core.errors import GenerationTimeout, ModelError
from model.engine import Request
from model.runtime import Generation, LanguageModel
from workers.observability import BATCH_SIZE, GENERATION_SECONDS

log = logging.getLogger(__name__)


@dataclass
class _Request:
    messages: list[dict[str, str]]
    max_new_tokens: int | None
    future: Future[Generation]
    engine_request: Request | None = None
    abandoned: bool = False  # the caller stopped waiting: free its row at the next step


T = TypeVar("T")


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]
    drain: bool = False


class Batcher:
    def __init__(
        self,
        model: LanguageModel | None = None,
        *,
        load: Callable[[], LanguageModel] | None = None,
        max_batch: int = 16,
    ) -> None:
        if (model is None) == (load is None):
            raise ValueError("Batcher needs a model or a function that loads one")
        self.model: LanguageModel = model  # type: ignore[assignment]  # set on the thread when load is given
        self._load = load
        self._loaded: Future[LanguageModel] = Future()
        if model is not None:
            self._loaded.set_result(model)
        self.max_batch = max_batch  # requests in the engine at once (at most the engine's own rows)
        self._requests: queue.Queue[_Request | _Call] = queue.Queue()
        self._held: list[_Request] = []  # arrived while the engine was full or draining
        self._draining: list[_Call] = []  # calls that change the weights, waiting for running requests
        self._active: list[_Request] = []
        self.steps = 0  # engine steps run
        self.rows = 0  # requests answered
        self.peak_rows = 0  # most requests decoded together in one step
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            self._loaded.result()  # the loading error, if that is what ended the thread
            raise ModelError("the model thread is not running")

    def loaded(self) -> LanguageModel:
        """The model, once the loop's thread has loaded it (its loading error, if that failed)."""
        return self._loaded.result()

    def call(self, fn: Callable[..., T], *args: Any, drain: bool = False, **kwargs: Any) -> T:
        """Run ``fn`` on the torch thread, between steps, and return its result. With ``drain`` it runs
        once the running requests are done (for anything that changes the weights)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        self._check_alive()
        future: Future[T] = Future()
        self._requests.put(_Call(lambda: fn(*args, **kwargs), future, drain))
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
        request = _Request(list(messages), max_new_tokens, future)
        self._requests.put(request)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout as err:
            request.abandoned = True  # queued: never started; running: its row is freed at the next step
            future.cancel()
            raise GenerationTimeout(f"no answer within {timeout_s:g} s") from err

    def _take(self, block: bool) -> None:
        """Move what arrived into the engine (or hold it); run plain calls at once."""
        while True:
            try:
                item = self._requests.get() if block else self._requests.get_nowait()
            except queue.Empty:
                return
            block = False
            if isinstance(item, _Call):
                if item.drain:
                    self._draining.append(item)
                else:
                    self._call(item)
            else:
                self._held.append(item)

    def _admit(self) -> None:
        engine = self.model.engine
        while self._held and not self._draining and len(self._active) < min(self.max_batch, engine.max_batch):
            item = self._held.pop(0)
            if item.abandoned or not item.future.set_running_or_notify_cancel():
                continue
            try:
                item.engine_request = self.model.request(item.messages, max_new_tokens=item.max_new_tokens)
                engine.add(item.engine_request)
            except BaseException as err:  # noqa: BLE001 - this caller gets it; the loop goes on
                item.future.set_exception(err)
                continue
            self._active.append(item)

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
                self._take(block=not self._active and not self._held and not self._draining)
                if self._draining and not self._active:
                    for call in self._draining:
                        self._call(call)
                    self._draining.clear()
                self._admit()
                if self._active:
                    self._step()
            except BaseException:  # the loop is every conversation's only way to the model: it must live
                log.exception("batcher loop error")

    def _step(self) -> None:
        engine = self.model.engine
        for item in [a for a in self._active if a.abandoned]:
            engine.cancel(item.engine_request)  # type: ignore[arg-type]
            self._active.remove(item)
        if not self._active:
            return
        with self.model._lock:
            engine.step()
        self.steps += 1
        if engine.running:
            BATCH_SIZE.observe(len(engine.running))
            self.peak_rows = max(self.peak_rows, len(engine.running))
        for item in [a for a in self._active if a.engine_request.done]:  # type: ignore[union-attr]
            self._active.remove(item)
            self.rows += 1
            try:
                result = self.model.result(item.engine_request)  # type: ignore[arg-type]
            except BaseException as err:  # noqa: BLE001 - a clear timeout or model error for this caller
                item.future.set_exception(err)
                continue
            GENERATION_SECONDS.observe(result.seconds)
            item.future.set_result(result)
