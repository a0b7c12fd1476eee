"""The continuous batcher on a thread of its own, for servers: `BackgroundBatcher.submit` from any thread returns a
blocking `StepStream` of the request's TokenSteps; `run(fn)` runs other model work (scoring, embeddings, beam
search) on the same thread between decode steps, so the model is never entered from two threads at once."""
from __future__ import annotations

import atexit
import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterable, Iterator

from ..errors import LMStackError
from .batching import ContinuousBatcher, Request
from .engine import TokenStep, fit_context, stop_set
from .prefix_cache import PrefixCache
from .sampling import SamplingParams

_END = object()


class StepStream:
    """The tokens of one submitted request, as a blocking iterator of TokenSteps (ends after the stop token or
    max_new_tokens; re-raises an engine error). `cancel()` (any thread) ends the generation and the iteration."""

    def __init__(self, req: Request, wake: Callable[[], None]):
        self.req, self._wake = req, wake
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        req.on_step = self._q.put
        req.on_done = lambda e: self._q.put(_END if e is None else e)

    def __iter__(self) -> Iterator[TokenStep]:
        return self

    def __next__(self) -> TokenStep:
        item = self._q.get()
        if item is _END:
            self._q.put(_END)  # stay ended
            raise StopIteration
        if isinstance(item, BaseException):
            self._q.put(_END)
            raise item
        return item

    def cancel(self) -> None:
        if not self.req.finished:
            self.req.cancelled = True
            self._q.put(_END)
            self._wake()

    close = cancel


class BackgroundBatcher:
    """A ContinuousBatcher on its own daemon thread: `submit` from any thread, tokens arrive as they are decoded.
    `run(fn)` executes other model work (scoring, embeddings, beam search) on the same thread between decode
    steps, so the model is never entered from two threads at once. prefix_cache: reuse the keys/values of prompt
    prefixes seen before (ContinuousBatcher; plain Transformer KV caches only). draft / num_speculative:
    speculative decoding while one generation decodes alone (a draft model or a Drafter such as NgramDrafter;
    ContinuousBatcher); `speculative_stats()` counts its drafts."""

    def __init__(self, model, max_batch: int = 16, prefix_cache: PrefixCache | None = None, draft=None,
                 num_speculative: int = 4):
        self.core = ContinuousBatcher(model, max_batch, prefix_cache=prefix_cache, draft=draft,
                                      num_speculative=num_speculative)
        self.model = model
        self._cv = threading.Condition()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lmstack-batcher", daemon=True)
        self._thread.start()
        # a batcher still running when the interpreter exits is stopped first: a daemon thread that has run torch's
        # parallel kernels, left to the interpreter's teardown, aborted the process about half the time
        # ("terminate called without an active exception", exit code 134)
        atexit.register(self.close)

    def submit(self, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
               truncate: str | None = None, top_logprobs: int = 0, matcher=None) -> StepStream:
        """Queue one generation; raises ContextLengthError / LMStackError at once for a request that cannot run.
        matcher: its structured-output state (constrain.new_matcher), required when params carry a constraint."""
        if not prompt:
            raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
        if top_logprobs < 0:
            raise LMStackError(f"top_logprobs must be >= 0, got {top_logprobs}")
        prompt = fit_context(list(prompt), params.max_new_tokens, self.core.block, truncate)
        if params.constraint is not None and matcher is None:
            raise LMStackError("structured output needs a matcher: constrain.new_matcher(params, tokenizer, vocab)")
        req = Request(prompt, params, stop_set(eos_id), top_logprobs, matcher=matcher)
        stream = StepStream(req, self._wake)
        self.core.add(req)
        self._wake()
        return stream

    def run(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        with self._cv:
            self._calls.append((lambda: fn(*args), fut))
            self._cv.notify()
        return fut

    @property
    def active(self) -> int:
        return self.core.active

    @property
    def queued(self) -> int:
        return self.core.queued

    def speculative_stats(self) -> dict | None:
        return self.core.speculative_stats()

    def close(self) -> None:
        atexit.unregister(self.close)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)
        self.core.fail_all(LMStackError("the generation engine was shut down"))

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._calls and not self.core.has_work():
                    self._cv.wait()
                if self._stop:
                    return
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            if self.core.has_work():
                try:
                    self.core.step()
                except Exception as e:  # an engine failure ends the requests in flight, not the server
                    self.core.fail_all(e)
