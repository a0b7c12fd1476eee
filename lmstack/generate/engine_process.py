"""The continuous batcher in a process of its own, for servers: `ProcessBatcher` has BackgroundBatcher's API
(`submit` -> a blocking StepStream, `run`, `active`, `queued`, `speculative_stats`, `close`) but decodes in a
spawned child process, so the server's event loop and stream threads never hold the decode loop's GIL.

Why: with the engine on a thread, the HTTP side (uvicorn's send path, SSE framing, the stream threads) holds the one
GIL for ~0.4 ms per token while the decode loop needs it ~0.6 ms per step between native calls; on a small CPU box
one stream through the server measured ~0.75-0.8x the in-process decode speed. In its own process (as vLLM's engine
core) the decode loop is the only Python there.

How: the model (and a draft model) is handed to the child once with torch.multiprocessing, which moves each weight
into shared memory: both processes read the same bytes, nothing is copied per process. Requests go down one pipe
((rid, prompt, params, stop ids, top_logprobs, constrained)), and after every engine step the child sends up one
message with that step's tokens and end-of-request events for all rows, plus the batch counters and the prefix-cache
and speculative stats (so /metrics reads them without a round trip). A reader thread hands each token to its
request's StepStream. Structured-output matchers (Rust parser state) cannot cross a pipe: the caller's matcher is
only its check that the constraint compiles, and the child builds its own from the same params and stop ids with
the tokenizer it was given at start. `run(fn)` (scoring, embeddings, beam search) runs in this process on one
thread of its own, reading the same shared weights. CPU models only (CUDA tensors would need IPC handles; the
thread engine serves GPUs). If the child dies, every stream in flight ends with an LMStackError and so does every
later submit.
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

import torch
import torch.multiprocessing as tmp

from ..errors import LMStackError
from .background import StepStream
from .engine import fit_context, stop_set
from .sampling import SamplingParams

START_TIMEOUT_S = 600.0  # the child imports torch and maps the weights: seconds, even for a big model


class _Handle:
    """The parent's side of one request, as StepStream expects a Request: `finished`, `cancelled`, the callbacks."""
    __slots__ = ("rid", "finished", "cancelled", "on_step", "on_done")

    def __init__(self, rid: int):
        self.rid, self.finished, self.cancelled = rid, False, False
        self.on_step = self.on_done = None


class _PrefixStats:
    """Stands in for the child's PrefixCache where the server reads it: `stats()` (the last counters it sent)."""

    def __init__(self, engine: "ProcessBatcher"):
        self._engine = engine

    def stats(self) -> dict:
        return dict(self._engine._prefix_stats or {})


class ProcessBatcher:
    """BackgroundBatcher's API with the decode loop in a spawned process (see the module docstring). model: a CPU
    model (its weights move to shared memory). prefix_cache_bytes: the child's PrefixCache budget (0/None: none).
    tokenizer / vocab_size: for structured-output requests (the child builds their matchers). threads: the child's
    torch threads (default: this process's)."""

    def __init__(self, model, max_batch: int = 16, prefix_cache_bytes: int | None = None, draft=None,
                 num_speculative: int = 4, tokenizer=None, vocab_size: int | None = None, threads: int | None = None):
        if next(model.parameters()).device.type != "cpu":
            raise LMStackError("the engine process serves CPU models; use the thread engine (--engine thread) on a GPU")
        self.model, self.block = model, model.config.block_size
        self.prefix_cache = _PrefixStats(self) if prefix_cache_bytes else None
        self._prefix_stats: dict | None = None
        self._spec_stats: dict | None = None
        self._active = self._queued = 0
        self._handles: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _handles, _dead and the request pipe
        self._dead: LMStackError | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmstack-model")
        ctx = tmp.get_context("spawn")
        child_in, self._tx = ctx.Pipe(duplex=False)
        self._rx, child_out = ctx.Pipe(duplex=False)
        cfg = dict(max_batch=max_batch, prefix_cache_bytes=prefix_cache_bytes or 0, num_speculative=num_speculative,
                   threads=threads or torch.get_num_threads(), vocab_size=vocab_size or model.config.vocab_size)
        self._proc = ctx.Process(target=_child_main, args=(child_in, child_out, model, draft, tokenizer, cfg),
                                 name="lmstack-engine", daemon=True)
        self._proc.start()
        child_in.close()
        child_out.close()
        self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="lmstack-engine-reader", daemon=True)
        self._reader.start()
        atexit.register(self.close)

    # ---------------------------------------------------------------------------------------------- the API
    def submit(self, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
               truncate: str | None = None, top_logprobs: int = 0, matcher=None) -> StepStream:
        """As BackgroundBatcher.submit (the same checks, raised at once); matcher: the caller's, only checked."""
        if not prompt:
            raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
        if top_logprobs < 0:
            raise LMStackError(f"top_logprobs must be >= 0, got {top_logprobs}")
        prompt = fit_context(list(prompt), params.max_new_tokens, self.block, truncate)
        if params.constraint is not None and matcher is None:
            raise LMStackError("structured output needs a matcher: constrain.new_matcher(params, tokenizer, vocab)")
        h = _Handle(next(self._ids))
        stream = StepStream(h, lambda: self._cancel(h))
        stops = sorted(stop_set(eos_id))
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._handles[h.rid] = h
            self._tx.send(("submit", h.rid, prompt, params, stops, top_logprobs, matcher is not None))
        return stream

    def run(self, fn: Callable, *args) -> Future:
        """Run other model work (scoring, embeddings, beam search) in this process, one call at a time."""
        return self._worker.submit(fn, *args)

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return self._queued

    def speculative_stats(self) -> dict | None:
        return None if self._spec_stats is None else dict(self._spec_stats)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self) -> None:
        atexit.unregister(self.close)
        with self._lock:
            if self._dead is None:
                try:
                    self._tx.send(("close",))
                except OSError:
                    pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._fail(LMStackError("the generation engine was shut down"))
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------------- internals
    def _cancel(self, h: _Handle) -> None:
        with self._lock:
            if self._dead is None and h.rid in self._handles:
                self._tx.send(("cancel", h.rid))

    def _wait_ready(self) -> None:
        while not self._rx.poll(0.25):
            if not self._proc.is_alive() and not self._rx.poll(0):
                raise LMStackError(f"the engine process exited at start (exit code {self._proc.exitcode}); its "
                                   "error is printed above. The thread engine (--engine thread) runs in-process")
        try:
            msg = self._rx.recv()
        except EOFError:
            msg = ("error", "it closed its pipe")
        if msg[0] != "ready":
            self._proc.join(timeout=5)
            raise LMStackError(f"the engine process failed to start: {msg[1]} (the thread engine, --engine thread, "
                               "runs in-process)")
        self._active, self._queued, self._prefix_stats, self._spec_stats = msg[1:]

    def _read(self) -> None:
        while True:
            try:
                events, self._active, self._queued, self._prefix_stats, self._spec_stats = self._rx.recv()
            except (EOFError, OSError):
                code = self._proc.exitcode if not self._proc.is_alive() else None
                self._fail(LMStackError("the generation engine process exited"
                                        + (f" (exit code {code})" if code is not None else "")))
                return
            for rid, step, error in events:
                h = self._handles.get(rid)
                if h is None:
                    continue
                if step is not None:
                    h.on_step(step)
                else:
                    with self._lock:
                        self._handles.pop(rid, None)
                    h.finished = True
                    h.on_done(error)

    def _fail(self, error: LMStackError) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = error
            handles, self._handles = list(self._handles.values()), {}
        self._active = self._queued = 0
        for h in handles:
            if not h.finished:
                h.finished = True
                h.on_done(error)


# -------------------------------------------------------------------------------------------------- the child
def _child_main(rx, tx, model, draft, tokenizer, cfg: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent closes the child
    torch.set_num_threads(cfg["threads"])
    try:
        core = _make_core(model, draft, cfg)
    except Exception as e:  # reported to the parent, which raises it
        tx.send(("error", f"{type(e).__name__}: {e}"))
        return
    child = _Child(rx, tx, core, tokenizer, cfg["vocab_size"])
    tx.send(("ready",) + child.stats())  # the counters /metrics reads before the first request
    child.loop()
    os._exit(0)  # no interpreter teardown of torch's thread pools (see BackgroundBatcher's atexit note)


def _make_core(model, draft, cfg: dict):
    from .batching import ContinuousBatcher
    from .prefix_cache import PrefixCache
    pc = PrefixCache(budget_bytes=cfg["prefix_cache_bytes"]) if cfg["prefix_cache_bytes"] else None
    return ContinuousBatcher(model, cfg["max_batch"], prefix_cache=pc, draft=draft,
                             num_speculative=cfg["num_speculative"])


class _Child:
    """The child's loop: read requests between steps (block when idle), step, send the step's events."""

    def __init__(self, rx, tx, core, tokenizer, vocab_size: int):
        self.rx, self.tx, self.core, self.tokenizer, self.vocab = rx, tx, core, tokenizer, vocab_size
        self.reqs: dict = {}
        self.events: list = []

    def loop(self) -> None:
        while True:
            while self.rx.poll(None if not self.core.has_work() else 0):
                try:
                    msg = self.rx.recv()
                except EOFError:  # the parent is gone
                    return
                if msg[0] == "close" or not self._handle(msg):
                    return
            if self.core.has_work():
                try:
                    self.core.step()
                except Exception as e:  # an engine failure ends the requests in flight, not the engine
                    self.core.fail_all(e)
            if self.events:
                self._send()

    def _handle(self, msg) -> bool:
        if msg[0] == "cancel":
            r = self.reqs.get(msg[1])
            if r is not None:
                r.cancelled = True
        elif msg[0] == "submit":
            self._submit(*msg[1:])
        return True

    def _submit(self, rid, prompt, params, stops, top_logprobs, constrained) -> None:
        from .batching import Request
        from .constrain import new_matcher
        ev = self.events
        try:
            matcher = new_matcher(params, self.tokenizer, self.vocab, stops) if constrained else None
            req = Request(prompt, params, set(stops), top_logprobs, matcher=matcher)
            req.on_step = lambda s: ev.append((rid, s, None))
            req.on_done = lambda e: (self.reqs.pop(rid, None), ev.append((rid, None, _portable(e))))
            self.reqs[rid] = req
            self.core.add(req)
        except Exception as e:
            self.reqs.pop(rid, None)
            ev.append((rid, None, _portable(e)))

    def stats(self) -> tuple:
        """(active, queued, prefix-cache stats or None, speculative stats or None): what every message carries."""
        core, pc = self.core, self.core.prefix_cache
        return core.active, core.queued, pc.stats() if pc is not None else None, core.speculative_stats()

    def _send(self) -> None:
        self.tx.send((self.events,) + self.stats())
        self.events.clear()


def _portable(e: BaseException | None) -> BaseException | None:
    """`e` if it survives a pickle round trip, else an LMStackError with its text (what the parent can re-raise)."""
    if e is None:
        return None
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return LMStackError(f"{type(e).__name__}: {e}")
