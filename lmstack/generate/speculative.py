"""Speculative decoding: a drafter proposes tokens, the target model checks them all in one forward pass.

Each round the drafter proposes k tokens d_1..d_k with draft distributions q_1..q_k; the target scores the pending
token plus all k drafts at once, giving p_1..p_{k+1}. Draft token d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is resampled from normalize(max(0, p_i - q_i)) and
the round ends; if all k are accepted a bonus token is sampled from p_{k+1}. Every emitted token is then
distributed exactly as the target's (Leviathan et al. 2023, Chen et al. 2023), so the output has the target's
distribution whatever the drafter; the drafter only changes how many target passes it takes.

Two drafters:
- `ModelDrafter`: a smaller model over the same vocabulary samples d_i from its own processed distribution q_i;
- `NgramDrafter` (ngram.py, "prompt lookup"): no model; it copies what followed an earlier occurrence of the last
  few tokens. A deterministic proposal is a one-hot q (q_i(d_i) = 1), so d_i is accepted with probability p_i(d_i)
  and a rejection resamples from p_i with d_i removed. A drafter may propose fewer than k tokens (none: the round
  is a plain decode step).

Both p and q are the *processed* distributions of the one sampling pipeline (`process_logits`: penalties with the
token history, temperature, top-k/p, min-p), computed for the same history, so the equality holds for the
distribution `generate` samples from. Greedy (temperature 0) uses one-hot argmax distributions, which makes the
rule "accept while the draft's token is the target's argmax, then emit the target's argmax": the output is
token for token the target's greedy output.

The target (and a draft model) keep a pre-allocated KV cache. Rejected positions need no undo: the next round
writes from the first unaccepted position onward, and attention only reads the cache up to the current position.
`stream_speculative` yields the tokens of each round as it completes (for streaming text); `speculative_generate`
runs it to the end. `RowSpeculator` runs the same rounds inside the continuous batcher (the server) while one
generation is decoding alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch

from ..errors import LMStackError
from ..models.kv_cache import KVCache, is_state_cache_model
from ..models.utils import eval_mode
from .engine import fit_context, make_generator, prefill_logits, stop_set
from .sampling import SamplingParams, draw, process_logits

ProbsFn = Callable[[torch.Tensor, list[int]], torch.Tensor]  # (V,) raw logits, history -> (V,) distribution


@dataclass
class SpeculativeResult:
    """The tokens and acceptance statistics of speculative generation. Passed as `stats=` to several generations
    (a chat session) it adds them up."""
    tokens: list[int] = field(default_factory=list)  # generated ids (the EOS that stopped generation included)
    drafted: int = 0          # draft tokens proposed
    accepted: int = 0         # draft tokens the target accepted
    target_passes: int = 0    # target forward passes (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        """One line, e.g. '63 of 96 drafts accepted (66%), 41 target passes for 128 tokens'."""
        return (f"{self.accepted} of {self.drafted} drafts accepted ({self.acceptance_rate:.0%}), "
                f"{self.target_passes} target passes for {len(self.tokens)} tokens")


class Drafter(Protocol):
    """What proposes draft tokens each round. One drafter serves one generation at a time; `begin` resets it."""
    block_size: int | None    # the longest sequence it can handle (None: no limit)
    models: tuple             # the torch modules it runs (put in eval mode during generation)

    def check(self, target) -> None:
        """Raise LMStackError when it cannot draft for `target` (vocabulary, cache kind)."""

    def begin(self, history: list[int], max_len: int, rewind: int) -> None:
        """Start a generation from `history` (the prompt); at most `max_len` tokens in all; a round rolls back at
        most `rewind` positions."""

    def propose(self, history: list[int], k: int, probs: ProbsFn,
                gen: torch.Generator) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k draft tokens continuing `history` (every token so far, all confirmed) and their draft
        distributions q (None: a deterministic proposal, q one-hot on each token). `probs` is the sampling pipeline
        for the generation at hand."""

    def rollback(self, n: int) -> None:
        """history[:n] is confirmed; anything the drafter computed past it is stale."""


class ModelDrafter:
    """A draft model: samples each draft token from its own processed distribution, with its own KV cache."""

    def __init__(self, model):
        self.model, self.models = model, (model,)
        self.block_size = model.config.block_size
        self.cache, self.n = None, 0  # the draft cache holds history[:n]

    def check(self, target) -> None:
        V, Vd = target.config.vocab_size, self.model.config.vocab_size
        if Vd != V:
            raise LMStackError(f"the draft model's vocabulary ({Vd} ids) differs from the target's ({V}); "
                               f"speculative decoding needs a draft that shares the target's tokenizer (a smaller "
                               f"model of the same family), or prompt lookup (--draft-model ngram)")

    def begin(self, history: list[int], max_len: int, rewind: int) -> None:
        self.cache = KVCache.for_model(self.model, 1, max_len, rolling=True, rewind=rewind)
        self.n = len(history) - 1
        if self.n:
            prefill_logits(self.model, self._ids(history[:-1]), self.cache)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=next(self.model.parameters()).device)

    def propose(self, history, k, probs, gen):
        drafts: list[int] = []
        q: list[torch.Tensor] = []
        feed = history[self.n:]  # catch up on the tokens the draft has not seen, then one token per step
        for _ in range(k):
            logits = self.model(self._ids(feed), cache=self.cache, pos=self.n)[0, -1]
            self.n += len(feed)
            q.append(probs(logits, history + drafts))
            drafts.append(_sample(q[-1], gen))
            feed = [drafts[-1]]
        return drafts, q

    def rollback(self, n: int) -> None:
        self.n = min(self.n, n)


def as_drafter(draft) -> Drafter:
    """A Drafter as is; a model -> ModelDrafter(model)."""
    return draft if hasattr(draft, "propose") else ModelDrafter(draft)


def checked_drafter(target, draft) -> Drafter:
    """as_drafter(draft), after checking that it can draft for `target` (LMStackError: a model that carries its
    state forward, a different vocabulary)."""
    drafter = as_drafter(draft)
    for role, m in (("target", target),) + tuple(("draft", d) for d in drafter.models):
        if is_state_cache_model(m):
            raise LMStackError(f"speculative decoding needs caches that can rewind to the last accepted token; the "
                               f"{role} model ({m.config.arch}) carries its state forward only. Use Transformer "
                               f"models, or generate without a draft model")
    drafter.check(target)
    return drafter


def check_draft_tokenizer(target_tok, draft_tok, draft_name: str = "the draft model") -> None:
    """Raise LMStackError naming the first difference when the draft's tokenizer is not the target's (the same
    ids must mean the same tokens, or the target would verify tokens the draft never meant)."""
    if target_tok.vocab_size != draft_tok.vocab_size:
        problem = f"has {draft_tok.vocab_size} tokens, the target's has {target_tok.vocab_size}"
    else:
        tv, dv = target_tok.hf.get_vocab(with_added_tokens=True), draft_tok.hf.get_vocab(with_added_tokens=True)
        if tv == dv:
            return
        ti, di = ({i: t for t, i in v.items()} for v in (tv, dv))
        i = next(i for i in sorted(set(ti) | set(di)) if ti.get(i) != di.get(i))
        problem = f"maps id {i} to {di.get(i)!r}, the target's to {ti.get(i)!r}"
    raise LMStackError(f"the tokenizer of {draft_name} {problem}; speculative decoding needs a draft with the "
                       f"target's tokenizer (a smaller model of the same family), or use prompt lookup "
                       f"(--draft-model ngram), which needs no draft model")


def target_probs(logits: torch.Tensor, params: SamplingParams, history: list[int], prompt_len: int,
                 stop_ids: set[int]) -> torch.Tensor:
    """(V,) raw logits -> (V,) the distribution `sample_next` draws from (one-hot argmax when greedy)."""
    processed = process_logits(logits.float().cpu().view(1, -1), params, ids=[history], prompt_len=prompt_len,
                               eos_ids=stop_ids)[0]
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(), processed.shape[-1]).float()
    return processed.softmax(-1)


def _sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(draw(probs.reshape(1, -1), gen)[0])


def verify_drafts(t_logits: torch.Tensor, drafts: list[int], q: list[torch.Tensor] | None, probs: ProbsFn,
                  history: list[int], gen: torch.Generator, stop_ids: set[int] | None) -> tuple[list[int], int]:
    """Accept / reject the drafts against the target's logits (len(drafts) + 1 rows) -> (new tokens, accepted).
    q None: one-hot draft distributions. stop_ids: ids that end generation once accepted (None: none do)."""
    new: list[int] = []
    for i, x in enumerate(drafts):
        p = probs(t_logits[i], history + new)
        qx = float(q[i][x]) if q is not None else 1.0
        if float(torch.rand((), generator=gen)) < float(p[x]) / qx:
            new.append(x)
            if stop_ids and x in stop_ids:
                return new, len(new)
            continue
        if q is not None:
            residual = (p - q[i]).clamp(min=0)
        else:  # p - onehot(x), clamped: p without x
            residual = p.clone()
            residual[x] = 0
        new.append(_sample(residual if residual.sum() > 0 else p, gen))
        return new, i
    new.append(_sample(probs(t_logits[len(drafts)], history + new), gen))  # all accepted: a bonus token
    return new, len(drafts)


@torch.inference_mode()
def stream_speculative(target, draft, prompt_ids: list[int], params: SamplingParams, num_draft_tokens: int = 4,
                       eos_id: int | Iterable[int] | None = None, truncate: str | None = None,
                       generator: torch.Generator | None = None,
                       stats: SpeculativeResult | None = None) -> Iterator[int]:
    """Yield up to params.max_new_tokens tokens from `target`, a round's tokens as soon as the round is verified.
    `draft`: a smaller model over the same vocabulary, or a Drafter (e.g. `NgramDrafter()`, prompt lookup);
    `num_draft_tokens` proposals per round. `stats` (a SpeculativeResult) receives the tokens and counts."""
    if num_draft_tokens < 0:
        raise LMStackError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if not prompt_ids:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    if getattr(params, "constraint", None) is not None:
        raise LMStackError("speculative decoding does not take structured output (json_schema / regex / choices / "
                           "grammar) yet; generate without a draft model for constrained output")
    drafter = checked_drafter(target, draft)
    stop_ids = stop_set(eos_id)
    block = min(target.config.block_size, drafter.block_size or target.config.block_size)
    prompt = fit_context(list(prompt_ids), params.max_new_tokens, block, truncate)
    gen = generator if generator is not None else make_generator(params.seed)
    out = stats if stats is not None else SpeculativeResult()
    history, P = list(prompt), len(prompt)
    total = P + params.max_new_tokens
    t_dev = next(target.parameters()).device

    def probs(logits: torch.Tensor, hist: list[int]) -> torch.Tensor:
        return target_probs(logits, params, hist, P, stop_ids)

    with eval_mode(target, *drafter.models):
        # sliding-window models roll (kv_cache.RollingKVCache): a round rewinds at most num_draft_tokens positions
        # (the target's rejected drafts; the draft's own), which a ring of window + num_draft_tokens slots still holds
        t_cache = KVCache.for_model(target, 1, total, rolling=True, rewind=num_draft_tokens)
        drafter.begin(history, total, num_draft_tokens)
        # invariant: the target cache holds every history token but the last (the "pending" one)
        t_n = len(history) - 1
        if t_n:
            prefill_logits(target, torch.tensor([history[:-1]], device=t_dev), t_cache)
            out.target_passes += 1
        while len(history) < total:
            k = min(num_draft_tokens, total - len(history) - 1)
            drafts, q = drafter.propose(history, k, probs, gen) if k else ([], None)
            drafts, q = drafts[:k], (q[:k] if q is not None else None)
            # the target scores the pending token and all drafts in one pass
            t_logits = target(torch.tensor([[history[-1]] + drafts], device=t_dev), cache=t_cache, pos=t_n)[0]
            new, accepted = verify_drafts(t_logits, drafts, q, probs, history, gen,
                                          stop_ids if params.stop_at_eos else None)
            out.target_passes += 1
            out.drafted += len(drafts)
            out.accepted += accepted
            history.extend(new)
            out.tokens.extend(new)
            # the target cache holds [pending, d_1..d_k]: valid up to the last accepted token, which is what the
            # invariant needs (len(history) - 1); anything past it is overwritten next round
            t_n = len(history) - 1
            drafter.rollback(t_n)
            yield from new
            if params.stop_at_eos and new[-1] in stop_ids:
                return


def speculative_generate(target, draft, prompt_ids: list[int], params: SamplingParams, num_draft_tokens: int = 4,
                         eos_id: int | Iterable[int] | None = None, truncate: str | None = None,
                         generator: torch.Generator | None = None) -> SpeculativeResult:
    """Generate up to params.max_new_tokens tokens from `target`, drafting `num_draft_tokens` per round with `draft`
    (a smaller model over the same vocabulary, or a Drafter such as `NgramDrafter()`). Returns the tokens and the
    acceptance statistics."""
    out = SpeculativeResult()
    for _ in stream_speculative(target, draft, prompt_ids, params, num_draft_tokens, eos_id, truncate, generator,
                                stats=out):
        pass
    return out


class RowSpeculator:
    """Speculative rounds inside the continuous batcher (batching.py), for a batch of ONE active row.

    Design: speculate only while one generation is decoding. Then a decode step is bound by weight reads and
    dispatch, so verifying 1 + k tokens costs about what one token does and every accepted draft is a step saved;
    with more rows the batch already fills each step, so (as vLLM does under load) rows decode plainly and the
    batch runs exactly as without a drafter. One drafter therefore serves one generation at a time: it restarts
    (`begin`) when the row it drafts for changes, and keeps its state when the same row pauses for a batch and is
    alone again (its history only grew). A row speculates unless something needs token-by-token control: a
    structured-output matcher, fewer than 2 tokens left, or prompt + max_new_tokens past the drafter's context.
    Verification is `verify_drafts` with the row's own sampling params, history, stop ids and generator, so greedy
    rows emit the target's greedy tokens and sampled rows keep the target's distribution. Counters: `stats()`."""

    def __init__(self, target, draft, num_draft_tokens: int = 4):
        if num_draft_tokens < 1:
            raise LMStackError(f"num_speculative (--num-speculative) must be >= 1 draft tokens per round, got "
                               f"{num_draft_tokens}")
        self.drafter = checked_drafter(target, draft)
        self.k = num_draft_tokens
        self.owner = None  # the request the drafter's state belongs to
        self.rounds = self.proposed = self.accepted = self.tokens = 0

    @property
    def models(self) -> tuple:
        return self.drafter.models

    def eligible(self, req) -> bool:
        block = self.drafter.block_size
        return (req.matcher is None and req.params.max_new_tokens - req.generated >= 2
                and (block is None or len(req.prompt) + req.params.max_new_tokens <= block))

    @staticmethod
    def _probs(req) -> ProbsFn:
        return lambda logits, hist: target_probs(logits, req.params, hist, len(req.prompt), req.stop_ids)

    def propose(self, req) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k drafts continuing req.history (its last token is the pending one) and their distributions."""
        if self.owner is not req:
            self.drafter.begin(req.history, len(req.prompt) + req.params.max_new_tokens, self.k)
            self.owner = req
        k = min(self.k, req.params.max_new_tokens - req.generated - 1)
        drafts, q = self.drafter.propose(req.history, k, self._probs(req), req.generator)
        return drafts[:k], (q[:k] if q is not None else None)

    def verify(self, req, logits: torch.Tensor, drafts: list[int], q: list[torch.Tensor] | None) -> list[int]:
        """logits (1 + len(drafts), V): the target's for [pending, *drafts] -> the round's new tokens."""
        stop = req.stop_ids if req.params.stop_at_eos else None
        new, accepted = verify_drafts(logits, drafts, q, self._probs(req), req.history, req.generator, stop)
        self.drafter.rollback(len(req.history) + len(new) - 1)
        self.rounds += 1
        self.proposed += len(drafts)
        self.accepted += accepted
        self.tokens += len(new)
        return new

    def stats(self) -> dict:
        """proposed / accepted draft tokens, verify rounds, tokens those rounds emitted, acceptance rate."""
        return {"proposed": self.proposed, "accepted": self.accepted, "rounds": self.rounds, "tokens": self.tokens,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0}
