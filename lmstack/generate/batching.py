"""Continuous batching: requests join one running decode batch as rows free up, and leave it the step they finish.

`ContinuousBatcher` is the step-driven core (no threads): `add` queues a request, `step` admits waiting requests
into free rows (prefill, first token) and then runs ONE decode forward pass for every active row. `generate_batch`
drives it to completion for a fixed list of prompts; `BackgroundBatcher` (background.py) runs it on its own thread
for the server,
with `submit` returning a blocking, cancellable token stream per request. So the CLI, evaluation and the server share
one decoding path (the same `sample_next` pipeline, the same padded forward pass).

Layout of the shared KV cache (per layer: (max_batch, n_kv_head, C, head_dim)). All active rows are written at the
same slot `pos` each step; row r holds its tokens in slots [start[r], pos), so a row that joined later simply starts
later. A padding mask hides slots before start[r], and every row passes its own position ids (pos - start[r]) to the
position embeddings, so a row decodes exactly as it would alone. When `pos` reaches the end of the cache the rows are
shifted left by the smallest start (their common empty prefix) or the cache grows, up to the context window; a
prompt longer than `pos` shifts the batch right to make room. A finished row is swap-removed (the last row moves
into its place), so the forward pass only ever covers active rows.

Models that carry state instead of keys/values (LSTM, GRU, gated CNN: `model.new_cache`) keep one StateCache of
max_batch rows instead: each row's state is its own whatever its length, so there are no slots, masks or shifts. A
joiner is prefilled alone (a pad would enter its state) and its state copied into its row; a finished row is
swap-removed the same way; a decode step feeds every row its pending token from its own state.

Speculative decoding (`draft=`: a draft model or a Drafter such as NgramDrafter, speculative.py): while exactly one
row is active, a step is one speculative round instead (`RowSpeculator`): the row moves to slot 0 (so no padding
mask is needed and packed models take the fused seq-mode layer), its pending token and k drafts are written at
slots pos..pos+k in one forward pass, `verify_drafts` accepts some, and `pos` advances past the accepted ones only:
the rejected slots lie beyond `pos`, where the next write lands. With two or more rows, or nothing proposed, the
step is the plain batched decode.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..errors import LMStackError
from ..models.kv_cache import KVCache, is_state_cache_model
from ..models.utils import eval_mode
from .engine import TokenStep, fit_context, make_generator, prefill_logits, stop_set
from .prefix_cache import PrefixCache, check_prefix_cache_model
from .sampling import SamplingParams, sample_next
from .speculative import RowSpeculator


@dataclass
class Request:
    """One generation: the prompt (already fitted to the context window), its sampling settings, and where its
    tokens go. `on_step(TokenStep)` is called for every token (the stop token included), `on_done(error or None)`
    exactly once at the end. Set `cancelled` (from any thread) to end it at the next step."""
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int] = field(default_factory=set)
    top_logprobs: int = 0
    on_step: Callable[[TokenStep], None] = lambda s: None
    on_done: Callable[[BaseException | None], None] = lambda e: None
    generator: torch.Generator | None = None
    cancelled: bool = False
    matcher: Any = None  # structured output: the generation's constrain.Matcher (None: unconstrained)
    # decoding state
    history: list[int] = field(default_factory=list)
    generated: int = 0
    pending: int = -1  # the last sampled token, fed at the next decode step
    finished: bool = False

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(error)


PREFILL_BATCH_TOKENS = 4096  # offline batches (all prompts known at once): prefill them together, for throughput


def _simple_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.needs_history and not p.logit_bias


class ContinuousBatcher:
    """Step-driven continuous batching over `model` with at most `max_batch` rows decoding at once."""

    def __init__(self, model, max_batch: int = 16, prefill_tokens: int | None = None,
                 prefix_cache: PrefixCache | None = None, draft=None, num_speculative: int = 4):
        if max_batch < 1:
            raise LMStackError(f"max_batch must be >= 1, got {max_batch}")
        if prefix_cache is not None:  # plain KV caches only: a clear error for sliding-window / stateful models
            check_prefix_cache_model(model)
        # reused prompt-prefix keys/values (prefix_cache.py); with one, joiners are prefilled one at a time
        self.prefix_cache = prefix_cache
        self.model, self.max_batch = model, max_batch
        cfg = model.config
        self.block = cfg.block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.shape = (cfg.n_layer, cfg.kv_heads, cfg.head_dim)
        # LSTM / GRU / gated CNN: one state row per request (see the module docstring)
        self.state = model.new_cache(max_batch, self.block) if is_state_cache_model(model) else None
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cap = 0            # C: cache slots per row
        self.row_cap = 0        # cache rows allocated (grown by doubling up to max_batch: one stream does not pay for 16)
        self.pos = 0            # the next slot every active row writes
        self.rows: list[Request] = []
        self.starts: list[int] = []
        self._view_key: tuple | None = None  # (rows, k buffers, slots, the KVCache view of them): see _view
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # guards `waiting` (add may come from other threads)
        # joiners prefilled in one forward pass: rows x longest prompt at most this (one request always fits). On a GPU
        # a batched prefill costs about what one does (launch-bound); on a CPU the rows' compute adds up and every
        # joiner would wait for the whole batch (measured: higher time to first token), so one at a time there.
        self.prefill_tokens = prefill_tokens if prefill_tokens is not None else (
            4096 if self.device.type == "cuda" else 0)
        self.steps_run = 0
        # speculative rounds while one row decodes alone (module docstring); None: plain decoding only
        self.speculator = RowSpeculator(model, draft, num_speculative) if draft is not None else None

    # ---- public -----------------------------------------------------------------------------------
    def add(self, req: Request) -> Request:
        if not req.prompt:
            raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
        if len(req.prompt) + req.params.max_new_tokens > self.block:
            raise LMStackError(f"prompt of {len(req.prompt)} tokens + max_new_tokens={req.params.max_new_tokens} "
                               f"exceeds the context window of {self.block} tokens (fit it with fit_context first)")
        if req.generator is None:
            req.generator = make_generator(req.params.seed)
        with self.lock:
            self.waiting.append(req)
        return req

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def speculative_stats(self) -> dict | None:
        """RowSpeculator.stats() (proposed / accepted drafts, rounds, acceptance rate); None without a drafter."""
        return None if self.speculator is None else self.speculator.stats()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows, then one decode step for all active rows."""
        with eval_mode(self.model, *(self.speculator.models if self.speculator is not None else ())):
            self._drop_cancelled()
            while len(self.rows) < self.max_batch:
                joining = []
                with self.lock:  # as many waiting requests as there are free rows, within the prefill budget
                    while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                        req = self.waiting[0]
                        longest = max([len(req.prompt)] + [len(r.prompt) for r in joining])
                        if joining and longest * (len(joining) + 1) > self.prefill_tokens:
                            break
                        self.waiting.popleft()
                        if req.cancelled:
                            req._finish()
                            continue
                        joining.append(req)
                if not joining:
                    break
                self._admit(joining)
            if self.rows:
                self._decode()

    def fail_all(self, error: BaseException) -> None:
        """End every active and waiting request with `error` and reset the batch (after an unexpected failure)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for r in self.rows + waiting:
            r._finish(error)
        self.rows, self.starts, self.pos = [], [], 0

    # ---- internals ----------------------------------------------------------------------------------
    def _emit(self, req: Request, token: int, logprob: float, top: list) -> None:
        """Record and hand out one sampled token; finish the request when it ends."""
        if req.finished:  # ended earlier in this speculative round (a consumer that failed)
            return
        step = TokenStep(token, logprob, top)
        req.history.append(token)
        req.generated += 1
        req.pending = token
        try:
            if req.matcher is not None:
                req.matcher.advance(token)
            req.on_step(step)
        except Exception as e:  # a consumer that cannot take tokens any more ends its request, nothing else
            req.cancelled = True
            req._finish(e)
            return
        p = req.params
        if ((p.stop_at_eos and token in req.stop_ids) or req.generated >= p.max_new_tokens
                or (req.matcher is not None and req.matcher.done)):
            req._finish()

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """logits: (n, V) raw logits, one row per request, on the model's device. They stay there: greedy rows take
        an argmax in place, sampled rows go through the sampling pipeline, and only the chosen ids, their logprobs
        and any requested top-n alternatives are copied to the host."""
        logits = logits.float()  # no copy when already float32
        n = len(reqs)
        easy = [i for i, r in enumerate(reqs) if _simple_greedy(r.params) and r.matcher is None]
        if len(easy) == n:
            toks = logits.argmax(-1)
        else:
            toks = torch.zeros(n, dtype=torch.long, device=logits.device)
            if easy:
                idx = torch.tensor(easy, device=logits.device)
                toks[idx] = logits[idx].argmax(-1)
            for i, r in enumerate(reqs):
                if not _simple_greedy(r.params) or r.matcher is not None:
                    toks[i] = sample_next(logits[i:i + 1], r.params, r.generator, ids=[r.history],
                                          prompt_len=len(r.prompt), eos_ids=r.stop_ids,
                                          allowed=None if r.matcher is None else r.matcher.allowed())[0]
        self._emit_all(reqs, logits, toks)

    def _emit_all(self, reqs: list[Request], logits: torch.Tensor, toks: torch.Tensor) -> None:
        """Emit toks[i] for reqs[i] with its logprob (and top alternatives) under the raw float32 logits[i]."""
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, toks.view(-1, 1)).squeeze(-1).tolist()
        tok_list = toks.tolist()
        tops: list[list] = [[] for _ in reqs]
        k = max((r.top_logprobs for r in reqs), default=0)
        if k:
            v, ix = logp.topk(min(k, logp.shape[-1]), dim=-1)
            v, ix = v.tolist(), ix.tolist()
            tops = [list(zip(ix[i][:r.top_logprobs], v[i][:r.top_logprobs])) for i, r in enumerate(reqs)]
        for i, r in enumerate(reqs):
            self._emit(r, tok_list[i], chosen[i], tops[i])

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill the joining requests together (left-padded: a padding mask hides the pads and every row has its
        own positions), sample each one's first token, and give each a row in the batch."""
        for r in reqs:
            r.history = list(r.prompt)
            if r.params.max_new_tokens == 0:
                r._finish()
        reqs = [r for r in reqs if not r.finished]
        if not reqs:
            return
        if self.state is not None:
            return self._admit_stateful(reqs)
        if self.prefix_cache is not None and len(reqs) > 1:  # each joiner alone, from its own cached prefix
            for r in reqs:
                self._admit([r])
            return
        lens = [len(r.prompt) for r in reqs]
        B, Lm = len(reqs), max(lens)
        # the full cache, also for sliding-window models: rows are copied into the batch's own slot layout (slot =
        # position), which a rolling ring does not have; the batch's band mask hides the old keys instead
        cache = KVCache.for_model(self.model, B, Lm)
        ids = torch.zeros(B, Lm, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, Lm - lens[b]:] = torch.tensor(r.prompt)
        ids = ids.to(self.device)
        if B == 1:  # with a prefix cache: only the prompt past its longest cached prefix runs
            logits = prefill_logits(self.model, ids, cache) if self.prefix_cache is None else \
                self.prefix_cache.prefill(self.model, reqs[0].prompt, ids, cache)
        else:
            pads = torch.tensor([Lm - n for n in lens], device=self.device)
            mask = torch.arange(Lm, device=self.device)[None, :] >= pads[:, None]
            positions = (torch.arange(Lm, device=self.device)[None, :] - pads[:, None]).clamp(min=0)
            logits = prefill_logits(self.model, ids, cache, padding_mask=mask, positions=positions)
        self._sample(reqs, logits)
        keep = [b for b, r in enumerate(reqs) if not (r.finished or r.cancelled)]
        for b, r in enumerate(reqs):
            if b not in keep:
                r._finish()
        if not keep:
            return
        if not self.rows:
            self.pos = 0
        need, rows = max(lens[b] for b in keep), len(self.rows) + len(keep)
        if need > self.pos:  # not enough slots before `pos`: shift the batch right (room for the next write too)
            self._relayout(need - self.pos, max(self.cap, need + 1), rows)
        elif rows > self.row_cap:
            self._relayout(0, self.cap, rows)
        for b in keep:
            row, s = len(self.rows), self.pos - lens[b]
            for layer in range(self.shape[0]):
                self.k[layer][row, :, s:self.pos] = cache.k[layer][b, :, Lm - lens[b]:]
                self.v[layer][row, :, s:self.pos] = cache.v[layer][b, :, Lm - lens[b]:]
            self.rows.append(reqs[b])
            self.starts.append(s)

    def _admit_stateful(self, reqs: list[Request]) -> None:
        """Prefill each joiner alone into a fresh state, sample its first token, copy the state into its row."""
        for r in reqs:
            cache = self.model.new_cache(1, len(r.prompt))
            ids = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
            self._sample([r], self.model(ids, cache=cache, pos=0)[:, -1])
            if r.finished or r.cancelled:
                r._finish()
                continue
            self.state.copy_rows([len(self.rows)], cache, [0])
            self.rows.append(r)
            self.starts.append(0)

    def _relayout(self, delta: int, cap: int, rows: int = 0) -> None:
        """Move every active row's slots by `delta` into a cache of `cap` slots and at least `rows` rows (allocated
        anew; zeros, so a masked slot never holds a NaN that 0-weight attention would still multiply)."""
        n_layer, H, D = self.shape
        cap = max(cap, 1)
        if rows > self.row_cap:
            self.row_cap = min(self.max_batch, max(rows, 2 * self.row_cap))
        new_k = [torch.zeros(self.row_cap, H, cap, D, dtype=self.dtype, device=self.device) for _ in range(n_layer)]
        new_v = [torch.zeros(self.row_cap, H, cap, D, dtype=self.dtype, device=self.device) for _ in range(n_layer)]
        n = len(self.rows)
        if n:
            lo = min(self.starts)
            assert lo + delta >= 0 and self.pos + delta <= cap
            for layer in range(n_layer):
                new_k[layer][:n, :, lo + delta:self.pos + delta] = self.k[layer][:n, :, lo:self.pos]
                new_v[layer][:n, :, lo + delta:self.pos + delta] = self.v[layer][:n, :, lo:self.pos]
        self.k, self.v, self.cap = new_k, new_v, cap
        self.starts = [s + delta for s in self.starts]
        self.pos += delta

    def _ensure_room(self) -> None:
        """Make slot `pos` writable: drop the rows' common empty prefix, or grow (doubling, up to the window)."""
        lo = min(self.starts) if self.rows else self.pos
        if self.pos + 1 <= self.cap and not (lo >= 32 and lo >= self.pos - lo):
            return
        need = self.pos - lo + 1
        cap = self.cap if need <= self.cap else min(max(need, 2 * self.cap, 64), max(self.block, need))
        self._relayout(-lo, cap)

    def _drop_cancelled(self) -> None:
        for r in sorted((i for i, q in enumerate(self.rows) if q.cancelled or q.finished), reverse=True):
            self._remove(r)

    def _remove(self, r: int) -> None:
        req, last = self.rows[r], len(self.rows) - 1
        req._finish()
        if r != last:  # swap-remove: the last row moves into this one's place
            if self.state is not None:
                self.state.move_row(last, r)
            else:
                s = self.starts[last]
                for layer in range(self.shape[0]):
                    self.k[layer][r, :, s:self.pos] = self.k[layer][last, :, s:self.pos]
                    self.v[layer][r, :, s:self.pos] = self.v[layer][last, :, s:self.pos]
            self.rows[r], self.starts[r] = self.rows[last], self.starts[last]
        self.rows.pop()
        self.starts.pop()
        if not self.rows:
            self.pos = 0

    def _decode(self) -> None:
        if self.speculator is not None and len(self.rows) == 1 and self.speculator.eligible(self.rows[0]):
            drafts, q = self.speculator.propose(self.rows[0])
            if drafts:
                return self._speculate(drafts, q)
        if self.state is not None:  # every row continues from its own state: no slots, masks or positions
            toks = torch.tensor([[r.pending] for r in self.rows], dtype=torch.long, device=self.device)
            logits = self.model(toks, cache=self.state.view(len(self.rows)), pos=0)[:, -1]
            self.steps_run += 1
            self._sample(list(self.rows), logits)
            self._drop_cancelled()
            return
        self._ensure_room()
        n, pos = len(self.rows), self.pos
        view = self._view(n)
        toks = torch.tensor([[r.pending] for r in self.rows], dtype=torch.long, device=self.device)
        if any(self.starts):  # rows that joined later or are shorter: a padding mask and per-row positions
            starts = torch.tensor(self.starts, device=self.device)
            mask = torch.arange(pos + 1, device=self.device)[None, :] >= starts[:, None]
            logits = self.model(toks, cache=view, pos=pos, padding_mask=mask, positions=(pos - starts)[:, None])
        else:  # every row starts at slot 0 (one generation, or prompts of one length): no mask, one position
            logits = self.model(toks, cache=view, pos=pos)
        logits = logits[:, -1]
        self.pos += 1
        self.steps_run += 1
        self._sample(list(self.rows), logits)
        self._drop_cancelled()

    def _view(self, n: int) -> KVCache:
        """The first n rows of the cache as a KVCache, kept while n and the buffers stay (slicing every layer's k and
        v cost ~0.1 ms a step)."""
        key = self._view_key
        if key is None or key[0] != n or key[1] is not self.k or key[2] != self.cap:
            view = KVCache.__new__(KVCache)
            view.k, view.v, view.max_len = [t[:n] for t in self.k], [t[:n] for t in self.v], self.cap
            self._view_key = (n, self.k, self.cap, view)
        return self._view_key[3]

    def _speculate(self, drafts: list[int], q) -> None:
        """One speculative round for the only active row (module docstring)."""
        r, s = self.rows[0], self.starts[0]
        if s:  # without a padding mask the row's attention starts at slot 0: move its slots there
            for layer in range(self.shape[0]):
                self.k[layer][0, :, :self.pos - s] = self.k[layer][0, :, s:self.pos].clone()
                self.v[layer][0, :, :self.pos - s] = self.v[layer][0, :, s:self.pos].clone()
            self.starts[0], self.pos = 0, self.pos - s
        T = 1 + len(drafts)
        if self.pos + T > self.cap:
            self._relayout(0, max(self.pos + T, min(max(2 * self.cap, 64), self.block)))
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_len = [t[:1] for t in self.k], [t[:1] for t in self.v], self.cap
        ids = torch.tensor([[r.pending] + drafts], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=view, pos=self.pos)[0].float()  # (T, V): a causal chunk after slot pos
        self.steps_run += 1
        new = self.speculator.verify(r, logits, drafts, q)
        self.pos += len(new)  # the cache is valid through the pending token and the accepted drafts
        self._emit_all([r] * len(new), logits[:len(new)], torch.tensor(new, device=logits.device))
        self._drop_cancelled()


def generate_batch(model, prompts: list[list[int]], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
                   truncate: str | None = None, top_logprobs: int = 0,
                   max_batch: int | None = None) -> list[list[TokenStep]]:
    """Generate for several prompts of different lengths with continuous batching: one forward pass per step for
    all unfinished rows; a row stops at EOS (its EOS step is included) or after max_new_tokens. With more prompts
    than `max_batch` (default: all at once), later prompts take the rows earlier ones free up.

    Every row gets its own random generator, seeded `seed + i` for prompt i (so prompt 0 samples exactly what
    `stream_steps(prompt, seed=seed)` does; greedy rows give the same tokens as each prompt generated alone).
    Returns, per prompt, the list of TokenSteps."""
    if not prompts:
        return []
    stop_ids = stop_set(eos_id)
    if any(not p for p in prompts):
        raise LMStackError("a prompt is empty; give at least one token (e.g. the BOS/EOS token) per prompt")
    if top_logprobs < 0:
        raise LMStackError(f"top_logprobs must be >= 0, got {top_logprobs}")
    fitted = [fit_context(list(p), params.max_new_tokens, model.config.block_size, truncate) for p in prompts]
    out: list[list[TokenStep]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    batcher = ContinuousBatcher(model, max_batch or len(prompts), prefill_tokens=PREFILL_BATCH_TOKENS)
    for i, p in enumerate(fitted):
        seed = None if params.seed is None else params.seed + i
        batcher.add(Request(p, params, stop_ids, top_logprobs, on_step=out[i].append,
                            on_done=lambda e: e is not None and errors.append(e), generator=make_generator(seed)))
    while batcher.has_work():
        batcher.step()
    if errors:
        raise errors[0]
    return out
