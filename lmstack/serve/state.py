"""ServerState: everything the routes share — the LM and its served name, the engine (one decode loop: a
BackgroundBatcher thread or a ProcessBatcher process), the pool of threads that consume its token streams,
admission (requests in flight; 429 past the limit), the metrics and the request limits. Routes are plain functions
of (state, request)."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import Request

from ..errors import ContextLengthError, LMStackError
from ..generate import BackgroundBatcher, NgramDrafter, PrefixCache, is_ngram_spec, prefix_cache_unsupported
from ..generate.constrain import new_matcher
from ..generate.engine_process import ProcessBatcher
from ..lm import load
from .metrics import Metrics
from .protocol import APIError, check_bearer, parse_body


ENGINES = ("thread", "process")  # where the decode loop runs: a thread of this process, or a process of its own


class NoTokens:
    """The token stream of a max_tokens=0 choice."""

    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration

    def cancel(self) -> None:
        pass

    close = cancel


class Admit:
    """Count a request as active for its lifetime (`with state.admit():`); 429 when the server is full."""

    def __init__(self, state: "ServerState"):
        self.state = state

    def __enter__(self):
        s = self.state
        if s.active >= s.max_batch + s.max_queue:
            raise APIError(429, f"server busy: {s.active} requests in flight; retry later",
                           "rate_limit_error", code="rate_limit_exceeded")
        s.active += 1
        return self

    def __exit__(self, *exc):
        self.state.active -= 1


def make_prefix_cache(model, budget_mb: float | None) -> PrefixCache | None:
    """The server's prefix cache: `budget_mb` MiB, or None when turned off (None / 0) or the model cannot use one."""
    if budget_mb is not None and budget_mb < 0:
        raise LMStackError(f"prefix cache budget must be >= 0 MiB, got {budget_mb} (0 or --no-prefix-cache: off)")
    if not budget_mb or prefix_cache_unsupported(model) is not None:
        return None
    return PrefixCache(budget_bytes=int(budget_mb * 1024 * 1024))


def load_drafter(lm, draft_model: str | None, ngram_max: int = 3, ngram_min: int = 2, **load_kw):
    """The server's speculative drafter (`--draft-model`): None without one, prompt lookup for 'ngram' / '[ngram]',
    else the model at that path (lmstack.load with `load_kw`), whose tokenizer must be `lm`'s (LMStackError naming
    the first difference)."""
    if draft_model is None:
        return None
    if is_ngram_spec(draft_model):
        return NgramDrafter(ngram_max=ngram_max, ngram_min=ngram_min)
    return lm.speculative_drafter(load(draft_model, **load_kw))


class ServerState:
    """The shared state of one app (see the module docstring). api_key: required as `Authorization: Bearer KEY` on
    every /v1 route. max_batch + max_queue: requests admitted at once; max_batch also caps the choices of one
    request. max_body_bytes: larger bodies get 413. max_n: the largest `n`. prefix_cache_mb: the byte budget (MiB)
    of the engine's prefix cache (keys/values of prompt prefixes reused across requests); None or 0 turns it off,
    and it is off for models that cannot use one (sliding-window or stateful: `prefix_cache_unsupported`).
    draft / num_speculative: speculative decoding in the engine while one generation decodes alone (a Drafter or a
    draft model: `load_drafter`); its counters are in /metrics."""

    def __init__(self, lm, model_name: str, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_body_bytes: int = 4 * 1024 * 1024, max_n: int = 16, prefix_cache_mb: float | None = 256,
                 draft=None, num_speculative: int = 4, engine: str = "thread"):
        self.lm, self.model_name, self.api_key = lm, model_name, api_key
        self.max_batch, self.max_queue, self.max_body_bytes, self.max_n = max_batch, max_queue, max_body_bytes, max_n
        self.tokenizer = lm.tokenizer
        self.block = lm.config.block_size
        self.vocab = lm.config.vocab_size
        self.eos = {self.tokenizer.eos_id} - {None}
        self.created = int(time.time())
        self.metrics = Metrics()
        self.active = 0  # requests admitted and not finished (changed on the event loop only)
        self.prefix_cache = make_prefix_cache(lm.model, prefix_cache_mb)
        if engine not in ENGINES:
            raise LMStackError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "process":
            budget = self.prefix_cache.budget_bytes if self.prefix_cache is not None else 0
            self.engine = ProcessBatcher(lm.model, max_batch=max_batch, prefix_cache_bytes=budget, draft=draft,
                                         num_speculative=num_speculative, tokenizer=lm.tokenizer, vocab_size=self.vocab)
            self.prefix_cache = self.engine.prefix_cache  # the child's counters
        else:
            self.engine = BackgroundBatcher(lm.model, max_batch=max_batch, prefix_cache=self.prefix_cache,
                                            draft=draft, num_speculative=num_speculative)
        self.metrics.speculative = self.engine.speculative_stats
        # threads that wait for tokens and turn them into text/SSE chunks (blocking waits, little CPU)
        self.consumers = ThreadPoolExecutor(max_workers=max_batch + max_queue + 4, thread_name_prefix="lmstack-stream")

    def close(self) -> None:
        self.engine.close()
        self.consumers.shutdown(wait=False, cancel_futures=True)

    def admit(self) -> Admit:
        return Admit(self)

    # ---------------------------------------------------------------------------------------------- requests
    def check_auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization", ""), self.api_key)

    async def read_body(self, request: Request) -> dict:
        """The authorised request's JSON body (413 past max_body_bytes, even while it streams in)."""
        self.check_auth(request)
        limit = self.max_body_bytes
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        return parse_body(bytes(raw), self.model_name)

    # -------------------------------------------------------------------------------------------- model work
    @staticmethod
    async def _mapped(fut):
        try:
            return await fut
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except LMStackError as e:
            raise APIError(400, str(e)) from None

    async def on_worker(self, fn: Callable, *args):
        """Run model work on the engine thread (between decode steps)."""
        return await self._mapped(asyncio.wrap_future(self.engine.run(fn, *args)))

    async def on_consumer(self, fn: Callable, *args):
        """Run a blocking consumer of engine streams on the stream thread pool."""
        return await self._mapped(asyncio.get_running_loop().run_in_executor(self.consumers, fn, *args))

    def submit_all(self, choices, handles: list) -> list:
        """Submit every choice (.ids, .params, .stop_ids, .top_n, .truncate) now, so they decode together; each
        stream is also put in `handles` (for cancelling on disconnect). All are cancelled if one submit fails."""
        out = []
        try:
            for c in choices:
                h = NoTokens() if c.params.max_new_tokens == 0 else \
                    self.engine.submit(c.ids, c.params, c.stop_ids, c.truncate, c.top_n,
                                       matcher=new_matcher(c.params, self.tokenizer, self.vocab, c.stop_ids))
                handles.append(h)
                out.append(h)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return out
