"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one forward pass.

Each round the draft samples k tokens d_1..d_k from its processed distributions q_1..q_k; the target scores the
pending token plus all k drafts at once, giving p_1..p_{k+1}. Draft token d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is resampled from normalize(max(0, p_i - q_i)) and
the round ends; if all k are accepted a bonus token is sampled from p_{k+1}. Every emitted token is then
distributed exactly as the target's (Leviathan et al. 2023, Chen et al. 2023), so the output has the target's
distribution whatever the draft; the draft only changes how many target passes it takes.

Both p and q are the *processed* distributions of the one sampling pipeline (`process_logits`: penalties with the
token history, temperature, top-k/p, min-p), computed for the same history, so the equality holds for the
distribution `generate` samples from. Greedy (temperature 0) uses one-hot argmax distributions, which makes the
rule "accept while the draft's token is the target's argmax, then emit the target's argmax": the output is
token for token the target's greedy output.

Both models keep a pre-allocated KV cache. Rejected positions need no undo: the next round writes from the first
unaccepted position onward, and attention only reads the cache up to the current position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..errors import LMStackError
from ..models.kv_cache import KVCache, is_state_cache_model
from ..models.utils import eval_mode
from .engine import fit_context, make_generator, stop_set
from .sampling import SamplingParams, process_logits


@dataclass
class SpeculativeResult:
    tokens: list[int] = field(default_factory=list)  # generated ids (the EOS that stopped generation included)
    drafted: int = 0          # draft tokens proposed
    accepted: int = 0         # draft tokens the target accepted
    target_passes: int = 0    # target forward passes (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _probs(logits: torch.Tensor, params: SamplingParams, history: list[int], prompt_len: int,
           stop_ids: set[int]) -> torch.Tensor:
    """(V,) raw logits -> (V,) the distribution `sample_next` draws from (one-hot argmax when greedy)."""
    processed = process_logits(logits.float().cpu().view(1, -1), params, ids=[history], prompt_len=prompt_len,
                               eos_ids=stop_ids)[0]
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(), processed.shape[-1]).float()
    return processed.softmax(-1)


def _sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def speculative_generate(target, draft, prompt_ids: list[int], params: SamplingParams, num_draft_tokens: int = 4,
                         eos_id: int | Iterable[int] | None = None, truncate: str | None = None,
                         generator: torch.Generator | None = None) -> SpeculativeResult:
    """Generate up to params.max_new_tokens tokens from `target`, drafting `num_draft_tokens` per round with `draft`
    (a smaller model over the same vocabulary). Returns the tokens and the acceptance statistics."""
    if num_draft_tokens < 0:
        raise LMStackError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if not prompt_ids:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    for role, m in (("target", target), ("draft", draft)):
        if is_state_cache_model(m):
            raise LMStackError(f"speculative decoding needs caches that can rewind to the last accepted token; the "
                               f"{role} model ({m.config.arch}) carries its state forward only. Use Transformer "
                               f"models for both, or generate without a draft model")
    V = target.config.vocab_size
    if draft.config.vocab_size != V:
        raise LMStackError(f"the draft model's vocabulary ({draft.config.vocab_size} ids) differs from the target's "
                           f"({V}); speculative decoding needs a draft that shares the target's tokenizer")
    stop_ids = stop_set(eos_id)
    block = min(target.config.block_size, draft.config.block_size)
    prompt = fit_context(list(prompt_ids), params.max_new_tokens, block, truncate)
    gen = generator if generator is not None else make_generator(params.seed)
    out = SpeculativeResult()
    history, P = list(prompt), len(prompt)
    total = P + params.max_new_tokens
    t_dev, d_dev = next(target.parameters()).device, next(draft.parameters()).device
    with eval_mode(target, draft):
        # sliding-window models roll (kv_cache.RollingKVCache): a round rewinds at most num_draft_tokens positions
        # (the target's rejected drafts; the draft's own), which a ring of window + num_draft_tokens slots still holds
        t_cache, d_cache = (KVCache.for_model(m, 1, total, rolling=True, rewind=num_draft_tokens)
                            for m in (target, draft))
        # invariant: the target cache holds every history token but the last (the "pending" one)
        t_n = d_n = len(history) - 1
        if t_n:
            target(torch.tensor([history[:-1]], device=t_dev), cache=t_cache, pos=0)
            draft(torch.tensor([history[:-1]], device=d_dev), cache=d_cache, pos=0)
            out.target_passes += 1
        while len(history) < total:
            k = min(num_draft_tokens, total - len(history) - 1)
            # 1) draft k tokens (the draft cache catches up on tokens it has not seen first)
            drafts: list[int] = []
            q: list[torch.Tensor] = []
            if k:
                feed = history[d_n:]
                for _ in range(k):
                    logits = draft(torch.tensor([feed], device=d_dev), cache=d_cache, pos=d_n)[0, -1]
                    d_n += len(feed)
                    q.append(_probs(logits, params, history + drafts, P, stop_ids))
                    drafts.append(_sample(q[-1], gen))
                    feed = [drafts[-1]]
            # 2) the target scores the pending token and all drafts in one pass
            chunk = torch.tensor([[history[-1]] + drafts], device=t_dev)
            t_logits = target(chunk, cache=t_cache, pos=t_n)[0]
            out.target_passes += 1
            out.drafted += k
            # 3) accept / reject
            new: list[int] = []
            for i in range(k + 1):
                p = _probs(t_logits[i], params, history + new, P, stop_ids)
                if i == k:  # every draft accepted: bonus token from the target
                    new.append(_sample(p, gen))
                    break
                x = drafts[i]
                if float(torch.rand((), generator=gen)) < float(p[x] / q[i][x]):
                    new.append(x)
                    out.accepted += 1
                    if params.stop_at_eos and x in stop_ids:
                        break
                    continue
                residual = (p - q[i]).clamp(min=0)
                new.append(_sample(residual if residual.sum() > 0 else p, gen))
                break
            history.extend(new)
            out.tokens.extend(new)
            # caches: the target holds [pending, d_1..d_k]; valid up to the last accepted token, which is what the
            # invariant needs (len(history) - 1); anything past it is overwritten next round
            t_n = len(history) - 1
            d_n = min(d_n, t_n)
            if params.stop_at_eos and new[-1] in stop_ids:
                break
    return out
