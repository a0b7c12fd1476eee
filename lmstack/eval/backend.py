"""The local evaluation backend: log-likelihood requests (lm-evaluation-harness's `loglikelihood`), rolling
log-likelihood for perplexity, and greedy generation, over any model `lmstack.load` returns.

Tokenization follows lm-evaluation-harness's HF model exactly, so accuracies agree:
- trailing whitespace of the context moves to the front of the continuation;
- context+continuation are encoded together and split at the length of the context's own encoding (BPE merges
  across the boundary go to the continuation);
- text is encoded with the tokenizer's default special tokens (`add_special_tokens=True`, what transformers does
  when lm-eval's `add_bos_token` is unset); an empty context starts from the BOS token (else EOS);
- a row longer than the context window keeps its last `block_size + 1` tokens (left truncation).

Efficiency: all choices of one question share the context, which is run through the model once into a KV cache;
the cache is expanded to one row per choice and the continuations run as one right-padded batch (right padding
needs no mask: a causal row never attends to the pads after it). Only the positions that predict continuation
tokens go through the output head. Several questions can go together (`score_batch`, `--batch-size`): their
contexts run left-padded with a padding mask and per-row positions. The result equals scoring each choice from
scratch to float rounding.

Prefix reuse (on by default; `LocalBackend(prefix_cache=False)`, `lmstack eval --no-prefix-cache`): the questions of
a few-shot task all start with the same description and k solved examples. Every scored context's keys/values are
stored in whole 16-token blocks in generate/prefix_cache.py's `PrefixCache` (LRU under a byte budget, what the
server uses); a later context copies its longest cached prefix into its row and runs only its own tokens. Rows of
one batch that share a prefix not cached yet run it once first. Exact: a position's keys/values depend only on the
tokens up to it, so the log-likelihoods equal those without the cache to float rounding (tested to 1e-5, float32).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ContextLengthError, LMStackError
from ..generate.prefix_cache import PrefixCache, prefix_cache_unsupported
from ..models.kv_cache import KVCache, is_state_cache_model
from ..models.utils import eval_mode


def _gather(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(targets, device=logp.device)
    lp = logp.gather(-1, t[:, None]).squeeze(-1)
    return float(lp.double().sum()), bool((logp.argmax(-1) == t).all())


def _forward_logits(model, ids: list[int], first: int) -> torch.Tensor:
    """Logits at positions [first, len(ids)) of one sequence (the head runs only there)."""
    device = next(model.parameters()).device
    h = model(torch.tensor([ids], dtype=torch.long, device=device), return_hidden=True)
    return model.lm_head(h[0, first:])


class ScoreStats:
    """Counters of `score_batch` calls: context tokens asked for, context tokens run through the model (pads not
    counted), and context tokens whose keys/values came from the prefix cache instead."""

    def __init__(self):
        self.questions = self.context_tokens = self.computed_tokens = self.reused_tokens = 0

    def as_dict(self) -> dict:
        return {"questions": self.questions, "context_tokens": self.context_tokens,
                "computed_tokens": self.computed_tokens, "reused_tokens": self.reused_tokens}


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token lists."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _warm_shared_prefixes(model, prefix_cache: PrefixCache, ctxs: list[list[int]]) -> int:
    """Rows of one batch that share a prefix the cache lacks (the first questions of a few-shot task): run each
    such prefix once, alone, after its cached part, and store it, so the rows copy it instead of each running it.
    A row's shared prefix: the longest it has in common with another row, in whole blocks, one token short of the
    row. Returns the tokens run."""
    bt, ran = prefix_cache.block_tokens, 0
    order = sorted(range(len(ctxs)), key=lambda b: ctxs[b])  # the longest common prefix is with a neighbour
    device = next(model.parameters()).device
    for j, b in enumerate(order):
        c = ctxs[b]
        n = max([common_prefix_len([c, ctxs[o]]) for o in (order[j - 1:j] + order[j + 1:j + 2])] or [0])
        n = min(n, len(c) - 1) // bt * bt
        if n == 0:
            continue
        p, ks, vs = prefix_cache.lookup(c[:n + 1])  # a lookup leaves one token uncached: ask with one more
        if p >= n:
            continue
        kv = KVCache.for_model(model, 1, n)
        for layer in range(len(ks)):
            kv.k[layer][0, :, :p], kv.v[layer][0, :, :p] = ks[layer], vs[layer]
        model(torch.tensor([c[p:n]], dtype=torch.long, device=device), cache=kv, pos=p, return_hidden=True)
        prefix_cache.insert(c[:n], [k[0] for k in kv.k], [v[0] for v in kv.v])
        ran += n - p
    return ran


def _row_prefixes(prefix_cache: PrefixCache, ctxs: list[list[int]]) -> list[tuple[int, list, list]]:
    """Per row (p, keys, values): the longest prefix of whole blocks the cache holds. Rows with the same cached
    prefix (a few-shot task's questions) share one lookup, so its blocks are concatenated once per batch, and the
    same tensors (rows group by them when copying). At least one token of every row is left to run: its logits
    predict the continuation."""
    out, seen = [], {}
    for c in ctxs:
        n = prefix_cache.match_len(c)
        key = tuple(c[:n])
        if key not in seen:
            seen[key] = prefix_cache.lookup(c[:n + 1]) if n else (0, [], [])
        out.append(seen[key])
    return out


def _insert_rows(prefix_cache: PrefixCache, ctxs: list[list[int]], ps: list[int], cache: KVCache, Lc: int) -> None:
    """Store each row's context blocks for later questions. Row b's own tokens (positions [p_b, len_b)) sit at slots
    [Lc - (len_b - p_b), Lc), after the pads; its cached prefix's blocks are only touched (no copy)."""
    bt = prefix_cache.block_tokens
    for b, (c, p) in enumerate(zip(ctxs, ps)):
        if len(c) // bt <= p // bt:
            continue  # no whole block beyond the cached part
        at = Lc - (len(c) - p)
        prefix_cache.insert(c, [k[b] for k in cache.k], [v[b] for v in cache.v], start=p, offset=at)


def score_choices(model, context_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                  prefix_cache: PrefixCache | None = None) -> list[tuple[float, bool]]:
    """[(sum log P(cont_i | context), is_greedy_i)] for every continuation, sharing one pass over the context.
    Rows that do not fit the context window are scored alone with lm-eval's left truncation."""
    return score_batch(model, [(context_ids, continuations)], prefix_cache=prefix_cache)[0]


@torch.inference_mode()
def score_batch(model, items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                prefix_cache: PrefixCache | None = None, stats: ScoreStats | None = None
                ) -> list[list[tuple[float, bool]]]:
    """`score_choices` for several questions at once: their contexts run as one left-padded batch (padding mask,
    per-row positions) into a KV cache, which is expanded to one row per choice; all choices of all questions then
    run as one right-padded batch. One question alone takes the unpadded path.

    With a `prefix_cache`, each context's longest prefix of whole blocks held there is not run: its keys/values
    are copied into the row (slots [0, p)), the row's own tokens run after it (pads sit between the two), and every
    context's blocks are stored afterwards for the questions that follow (a few-shot task's questions all start
    with the same description and examples). `stats` counts the context tokens asked for, run and reused."""
    L = model.config.block_size
    out: list[list] = [[None] * len(conts) for _, conts in items]
    rows: list[tuple[int, int]] = []  # (question, choice) scored in the shared batch
    for q, (ctx, conts) in enumerate(items):
        ctx = list(ctx)
        if not ctx:
            raise LMStackError("scoring needs a non-empty context (start it with the BOS/EOS token)")
        for i, c in enumerate(conts):
            c = list(c)
            if not c:
                out[q][i] = (0.0, True)
            elif len(ctx) + len(c) - 1 <= L:
                rows.append((q, i))
            else:
                if len(c) > L:
                    raise ContextLengthError(f"a continuation of {len(c)} tokens is longer than the model's "
                                             f"context window ({L} tokens)")
                ids = (ctx + c)[-(L + 1):][:-1]
                out[q][i] = _gather(_forward_logits(model, ids, len(ids) - len(c)), c)
    if not rows:
        return out
    if is_state_cache_model(model):  # LSTM / GRU / gated CNN: no KV cache to share a context through
        with eval_mode(model):
            for q, i in rows:
                ctx, c = list(items[q][0]), list(items[q][1][i])
                out[q][i] = _gather(_forward_logits(model, (ctx + c)[:-1], len(ctx) - 1), c)
        return out
    qs = sorted({q for q, _ in rows})
    ctxs = [list(items[q][0]) for q in qs]
    Lc = max(len(c) for c in ctxs)
    maxk = max(len(items[q][1][i]) for q, i in rows)
    if len(qs) > 1 and Lc + maxk - 1 > L:  # padded rows would pass the window: score the questions one by one
        return _one_by_one(model, items, qs, out, prefix_cache, stats)
    with eval_mode(model):
        ran, pre = 0, [(0, [], [])] * len(ctxs)
        if prefix_cache is not None:
            ran = _warm_shared_prefixes(model, prefix_cache, ctxs) if len(ctxs) > 1 else 0
            pre = _row_prefixes(prefix_cache, ctxs)
            if len(qs) > 1 and max(p for p, _, _ in pre) + max(len(c) - p for c, (p, _, _) in zip(ctxs, pre)) \
                    + maxk - 1 > L:  # the slots (prefix | pads | own tokens) would pass the window: one by one
                return _one_by_one(model, items, qs, out, prefix_cache, stats, ran)
        last, rest, cache1, Lc = _run_rows(model, items, rows, qs, ctxs, maxk, pre)
        ps = [p for p, _, _ in pre]
        if prefix_cache is not None:
            _insert_rows(prefix_cache, ctxs, ps, cache1, Lc)
        if stats is not None:
            stats.questions += len(qs)
            stats.context_tokens += sum(map(len, ctxs))
            stats.computed_tokens += sum(len(c) - p for c, p in zip(ctxs, ps)) + ran
            stats.reused_tokens += sum(ps) - ran
        row_of = {q: b for b, q in enumerate(qs)}
        for r, (q, i) in enumerate(rows):
            c = list(items[q][1][i])
            first = last[row_of[q]][None]
            out[q][i] = _gather(first if len(c) == 1 else torch.cat([first, rest[r, :len(c) - 1]], dim=0), c)
    return out


def _one_by_one(model, items, qs, out, prefix_cache, stats, ran: int = 0):
    """score_batch for each question alone (`ran`: prefix tokens already run for them), filling `out`."""
    if stats is not None:
        stats.computed_tokens += ran
        stats.reused_tokens -= ran
    for q in qs:
        for i, r in enumerate(score_batch(model, [items[q]], prefix_cache, stats)[0]):
            out[q][i] = out[q][i] if out[q][i] is not None else r
    return out


def _run_rows(model, items, rows, qs, ctxs, maxk, pre):
    """The batched forward passes of `score_batch`. Row b's cache: its cached prefix (pre[b] = (p_b, keys, values))
    at slots [0, p_b), pads, its own s_b tokens at [Lc - s_b, Lc), Lc = max p + max s; its inputs run at slots
    [Lc - max s, Lc) with positions from p_b. Then the choices over that cache expanded to one row per choice.
    Returns (logits predicting each question's first continuation token (B, V), those of the rest (R, maxk-1, V)
    or None, the contexts' cache, Lc)."""
    device = next(model.parameters()).device
    ps = [p for p, _, _ in pre]
    sufs = [c[p:] for c, p in zip(ctxs, ps)]
    Ls, P = max(len(s) for s in sufs), max(ps)
    Lc, B = P + Ls, len(qs)
    row_of = {q: b for b, q in enumerate(qs)}
    lens = torch.tensor([len(c) for c in ctxs], device=device)
    pads = torch.tensor([Ls - len(s) for s in sufs], device=device)  # pad inputs before each row's tokens
    ids = torch.zeros(B, Ls, dtype=torch.long, device=device)
    mask = torch.zeros(B, Lc, dtype=torch.bool, device=device)  # prefix | pads | the row's own tokens
    cache1 = KVCache.for_model(model, B, Lc)  # full cache: its slots [0, Lc) are copied into the choices' cache
    groups: dict[int, list[int]] = {}  # rows with the same cached prefix tensors: one copy per layer for all
    for b, (s, (p, ks, vs)) in enumerate(zip(sufs, pre)):
        ids[b, Ls - len(s):] = torch.tensor(s, device=device)
        mask[b, :p] = True
        mask[b, Lc - len(s):] = True
        if p:
            groups.setdefault(id(ks), []).append(b)
    for bs in groups.values():
        p, ks, vs = pre[bs[0]]
        idx = torch.tensor(bs, device=device)
        for layer in range(len(ks)):
            cache1.k[layer][idx, :, :p] = ks[layer].unsqueeze(0)
            cache1.v[layer][idx, :, :p] = vs[layer].unsqueeze(0)
    padded = not bool(mask.all())
    positions = torch.tensor(ps, device=device)[:, None] + (torch.arange(Ls, device=device)[None] -
                                                           pads[:, None]).clamp(min=0)
    kw = dict(padding_mask=mask, positions=positions) if padded else {}
    h = model(ids, cache=cache1, pos=P, return_hidden=True, **kw)
    last = model.lm_head(h[:, -1])  # (B, V): predicts the first token of every choice
    if maxk == 1:
        return last, None, cache1, Lc
    R = len(rows)
    src = torch.tensor([row_of[q] for q, _ in rows], device=device)
    cache = KVCache.for_model(model, R, Lc + maxk - 1)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :Lc] = cache1.k[layer][src]
        cache.v[layer][:, :, :Lc] = cache1.v[layer][src]
    cids = torch.zeros(R, maxk - 1, dtype=torch.long, device=device)
    for r, (q, i) in enumerate(rows):
        c = list(items[q][1][i])[:-1]
        if c:
            cids[r, :len(c)] = torch.tensor(c, device=device)
    kw = {}
    if padded:  # right pads of the choices need no mask: a causal row never sees what follows it
        cmask = torch.ones(R, Lc + maxk - 1, dtype=torch.bool, device=device)
        cmask[:, :Lc] = mask[src]
        kw = dict(padding_mask=cmask, positions=lens[src][:, None] + torch.arange(maxk - 1, device=device)[None])
    rest = model.lm_head(model(cids, cache=cache, pos=Lc, return_hidden=True, **kw))  # (R, maxk-1, V)
    return last, rest, cache1, Lc


class LocalBackend:
    """Evaluation requests against an in-process `lmstack.LM`."""

    def __init__(self, lm, add_special_tokens: bool = True, max_length: int | None = None,
                 prefix_cache: bool | PrefixCache = True):
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.add_special_tokens = add_special_tokens
        self.max_length = min(max_length or self.model.config.block_size, self.model.config.block_size)
        self.name = str(getattr(lm, "path", None) or "model")
        # few-shot prompts: the keys/values of the prefix the questions share are computed once (see score_batch)
        self.prefix_cache_off = prefix_cache_unsupported(self.model) if prefix_cache else "turned off"
        self.prefix_cache = None if self.prefix_cache_off else (
            prefix_cache if isinstance(prefix_cache, PrefixCache) else PrefixCache())
        self.score_stats = ScoreStats()

    def prefix_stats(self) -> dict:
        """Token counters of the scoring so far, with the prefix cache's own counters (or why it is off)."""
        out = self.score_stats.as_dict()
        out["prefix_cache"] = self.prefix_cache.stats() if self.prefix_cache else {"off": self.prefix_cache_off}
        return out

    def _score(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        return score_batch(self.model, items, prefix_cache=self.prefix_cache, stats=self.score_stats)

    # ---- tokenization (lm-eval rules) --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special_tokens if add_special_tokens is None
                               else add_special_tokens)

    @property
    def prefix_id(self) -> int:
        pid = self.tok.start_id
        if pid is None:
            raise LMStackError("the tokenizer has no BOS/EOS token to condition an empty context on")
        return pid

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- requests ----------------------------------------------------------------------------------------------
    def loglikelihood_choices(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each continuation of one context (one shared pass)."""
        return self.loglikelihood_batch([(context, continuations)])[0]

    def loglikelihood_batch(self, requests: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        """`loglikelihood_choices` for several questions, their contexts batched together (`score_batch`)."""
        items, where = [], []
        for qi, (context, continuations) in enumerate(requests):
            pairs = [self.encode_pair(context, c) for c in continuations]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (ctx, _) in enumerate(pairs):
                groups.setdefault(tuple(ctx), []).append(i)
            for ctx, idx in groups.items():
                items.append((list(ctx), [pairs[i][1] for i in idx]))
                where.append((qi, idx))
        out: list[list] = [[None] * len(c) for _, c in requests]
        for (qi, idx), res in zip(where, self._score(items)):
            for i, r in zip(idx, res):
                out[qi][i] = r
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [self.loglikelihood_choices(c, [x])[0] for c, x in requests]

    @torch.inference_mode()
    def token_logprobs_rolling(self, text: str, stride: int | None = None, max_length: int | None = None
                               ) -> torch.Tensor:
        """Log-prob of every token of `text`, conditioned on the BOS/EOS prefix token, with sliding windows: the
        first window of `max_length` input tokens scores all it predicts; each next window of up to `max_length`
        input tokens scores the next `stride` tokens. Every token is scored exactly once, with at least
        max_length - stride + 1 tokens of context once past the first window (stride = max_length: lm-eval's
        disjoint rolling windows; smaller strides: more context for more compute, Hugging Face's recipe)."""
        ids = [self.prefix_id] + self.encode(text, add_special_tokens=False)
        L = min(max_length or self.max_length, self.max_length)
        stride = stride or L
        if not 0 < stride <= L:
            raise LMStackError(f"stride must be in [1, {L}] (the window), got {stride}")
        out = []
        with eval_mode(self.model):
            prev_end, N = 1, len(ids)  # tokens [1, prev_end) are scored; token 0 is the prefix
            while prev_end < N:
                end = min(L + 1 if prev_end == 1 else prev_end + stride, N)  # score tokens [prev_end, end)
                begin = max(0, end - 1 - L)
                window = ids[begin:end - 1]  # inputs; position j predicts ids[begin + j + 1]
                logits = _forward_logits(self.model, window, prev_end - begin - 1)
                logp = torch.log_softmax(logits.float(), dim=-1)
                tgt = torch.tensor(ids[prev_end:end], device=logp.device)
                out.append(logp.gather(-1, tgt[:, None]).squeeze(-1).cpu())
                prev_end = end
        return torch.cat(out) if out else torch.zeros(0)

    def generate(self, prompts: list[str], until: list[str], max_new_tokens: int, batch_size: int = 1
                 ) -> list[str]:
        """Greedy continuations cut at the first stop string, `batch_size` prompts decoding together (continuous
        batching: a row leaves the batch at EOS or as soon as its text contains a stop string). The same text as
        generating each prompt alone (greedy)."""
        outs = []
        for i in range(0, len(prompts), max(1, batch_size)):
            outs += self.lm.generate_batch(prompts[i:i + max(1, batch_size)], truncate="left",
                                           max_new_tokens=max_new_tokens, temperature=0, stop=until or None)
        return outs
