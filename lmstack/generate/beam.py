"""Beam search with the KV cache (one cache row per beam, reordered by beam index after every step).

Semantics follow Hugging Face transformers (>= 4.50 "vectorised" beam search), so sequences and scores match
`model.generate(num_beams=k, do_sample=False, ...)`:

- every step keeps the best max(2, 1 + n_eos) * num_beams continuations of all beams by summed log-probability;
  the best num_beams that did not just finish continue running;
- a continuation finishes when it emits an EOS id or reaches max_new_tokens; only the top num_beams candidates of a
  step may finish. Its score is sum(logprob) / (generated_length ** length_penalty), where the length counts the
  generated tokens including the EOS. The best num_beams finished hypotheses are kept;
- early_stopping=True: stop as soon as num_beams hypotheses are finished. False: stop when the best running beam,
  scored at the current length, can no longer beat the worst finished one. "never": like False, but with
  length_penalty > 0 the running beam is scored at the maximum length (the canonical, exhaustive variant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import LMStackError
from ..models.kv_cache import KVCache, StateCache, make_cache
from ..models.utils import eval_mode
from .engine import fit_context, stop_set
from .sampling import SamplingParams, process_logits

NEG = -1.0e9


@dataclass
class BeamHypothesis:
    tokens: list[int]   # generated ids (with the final EOS when it ended on one)
    score: float        # sum of token logprobs / len(tokens) ** length_penalty  (HF `sequences_scores`)


@torch.inference_mode()
def beam_search(model, prompt: list[int], num_beams: int = 4, max_new_tokens: int = 32, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_id: int | Iterable[int] | None = None, params: SamplingParams | None = None,
                truncate: str | None = None) -> list[BeamHypothesis]:
    """Return the num_return_sequences best hypotheses, best first. `params` (optional): the history-dependent
    processors (logit_bias, repetition/frequency/presence penalties, min_new_tokens) applied to the log-probabilities
    each step, as transformers does; temperature and filters are ignored (beam search is deterministic)."""
    if num_beams < 1:
        raise LMStackError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise LMStackError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise LMStackError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if max_new_tokens < 1:
        raise LMStackError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens}")
    if not prompt:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    stop_ids = stop_set(eos_id)
    prompt = fit_context(list(prompt), max_new_tokens, model.config.block_size, truncate)
    device = next(model.parameters()).device
    K, P = num_beams, len(prompt)
    keep = max(2, 1 + len(stop_ids)) * K
    eos = torch.tensor(sorted(stop_ids), dtype=torch.long)

    run_seqs = torch.zeros(K, 0, dtype=torch.long)          # running beams' generated tokens
    run_scores = torch.zeros(K)                             # summed logprobs; only beam 0 is live at the start
    run_scores[1:] = NEG
    fin_seqs: list[list[int]] = [[] for _ in range(K)]      # finished hypotheses, best first
    fin_scores = torch.full((K,), NEG)
    fin_done = torch.zeros(K, dtype=torch.bool)
    improvable = True

    with eval_mode(model):
        cache = make_cache(model, K, P + max_new_tokens)
        ids = torch.tensor([prompt] * K, dtype=torch.long, device=device)
        logits = model(ids, cache=cache, pos=0)[:, -1]
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float().cpu(), dim=-1)
            if params is not None:
                hist = [prompt + r for r in run_seqs.tolist()]
                logp = process_logits(logp, SamplingParams(**{**params.to_dict(), "temperature": 0}), hist, P,
                                      stop_ids)
            V = logp.shape[-1]
            acc = (logp + run_scores[:, None]).view(-1)
            top_scores, top_idx = torch.topk(acc, k=min(keep, acc.numel()))
            beam, tok = top_idx // V, top_idx % V
            cand = torch.cat([run_seqs[beam], tok[:, None]], dim=1)
            hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
            if t + 1 >= max_new_tokens:
                hits = torch.ones_like(hits)

            # running beams for the next step: the best K candidates that did not finish
            nxt = torch.topk(top_scores + hits.float() * NEG, k=K).indices
            run_seqs, run_scores, run_beam = cand[nxt], (top_scores + hits.float() * NEG)[nxt], beam[nxt]

            # finished hypotheses: merge the candidates that finished among the top K with the kept ones
            cand_scores = top_scores / ((t + 1) ** length_penalty)
            if bool(fin_done.all()) and early_stopping is True:
                cand_scores = cand_scores + NEG
            if not improvable:
                cand_scores = cand_scores + NEG
            just_done = hits.clone()
            just_done[K:] = False
            cand_scores = cand_scores + (~just_done).float() * NEG
            merged = torch.cat([fin_scores, cand_scores])
            best = torch.topk(merged, k=K).indices.tolist()
            all_seqs = fin_seqs + cand.tolist()
            all_done = torch.cat([fin_done, just_done])
            fin_seqs, fin_scores, fin_done = [all_seqs[i] for i in best], merged[best], all_done[best]

            # stop?
            length = (max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else t + 1)
            best_running = run_scores[0] / (length ** length_penalty)
            worst_finished = fin_scores.min() if bool(fin_done.all()) else torch.tensor(NEG)
            improvable = improvable and bool(best_running > worst_finished)
            if not improvable or (bool(fin_done.all()) and early_stopping is True) or bool(hits.all()):
                break
            cache_reorder(cache, run_beam.to(device), P + t)
            logits = model(run_seqs[:, -1:].to(device), cache=cache, pos=P + t)[:, -1]
    return [BeamHypothesis(fin_seqs[i], float(fin_scores[i])) for i in range(num_return_sequences)]


def cache_reorder(cache: KVCache | StateCache, rows: torch.Tensor, length: int) -> None:
    """Make cache row i a copy of row rows[i] (positions [0, length); a StateCache's whole state)."""
    if isinstance(cache, StateCache):
        cache.reorder(rows)
        return
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :length] = cache.k[layer][rows, :, :length]
        cache.v[layer][:, :, :length] = cache.v[layer][rows, :, :length]
