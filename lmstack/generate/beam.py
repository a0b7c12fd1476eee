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
def check_beam_args(num_beams: int, num_return_sequences: int, early_stopping: bool | str) -> None:
    """The beam settings every beam search checks (decoder-only here, seq2seq in generate/seq2seq.py)."""
    if num_beams < 1:
        raise LMStackError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise LMStackError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise LMStackError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def beam_search(model, prompt: list[int], num_beams: int = 4, max_new_tokens: int = 32, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1,
                eos_id: int | Iterable[int] | None = None, params: SamplingParams | None = None,
                truncate: str | None = None) -> list[BeamHypothesis]:
    """Return the num_return_sequences best hypotheses, best first. `params` (optional): the history-dependent
    processors (logit_bias, repetition/frequency/presence penalties, min_new_tokens) applied to the log-probabilities
    each step, as transformers does; temperature and filters are ignored (beam search is deterministic)."""
    check_beam_args(num_beams, num_return_sequences, early_stopping)
    if max_new_tokens < 1:
        raise LMStackError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens}")
    if not prompt:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    stop_ids = stop_set(eos_id)
    prompt = fit_context(list(prompt), max_new_tokens, model.config.block_size, truncate)
    device = next(model.parameters()).device
    K, P = num_beams, len(prompt)
    if params is not None and params.constraint is not None:
        raise LMStackError("beam search does not take structured output yet; use sampling or greedy (num_beams=1) "
                           "with json_schema / regex / choices / grammar")
    greedy_params = None if params is None else SamplingParams(**{**params.to_dict(), "temperature": 0})

    with eval_mode(model):
        cache = make_cache(model, K, P + max_new_tokens)
        ids = torch.tensor([prompt] * K, dtype=torch.long, device=device)
        first = model(ids, cache=cache, pos=0)[:, -1]

        def step(tokens: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
            cache_reorder(cache, rows.to(device), P + t)
            return model(tokens[:, None].to(device), cache=cache, pos=P + t)[:, -1]

        def process(logp: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
            return process_logits(logp, greedy_params, [prompt + r for r in seqs[0].tolist()], P, stop_ids)

        seqs, scores = beam_search_core(first, step, 1, K, max_new_tokens, length_penalty, early_stopping, stop_ids,
                                        process if params is not None else None)
    return [BeamHypothesis(seqs[0][i], float(scores[0, i])) for i in range(num_return_sequences)]


def beam_search_core(first_logits: torch.Tensor, step, batch: int, num_beams: int, max_new_tokens: int,
                     length_penalty: float, early_stopping: bool | str, stop_ids: Iterable[int],
                     process=None) -> tuple[list[list[list[int]]], torch.Tensor]:
    """The beam search loop (semantics in the module docstring), batched: `batch` independent searches of
    num_beams rows each; row b * num_beams + k is beam k of search b, and rows never move between searches.

    first_logits (batch * K, V): the next-token logits after each search's prompt (all K rows alike).
    step(tokens (batch * K,), rows (batch * K,), t) -> the next logits: first make row i of the model's cache a copy
    of row rows[i] (the beam its continuation came from; rows stay within their search), then feed `tokens` at
    generated position t + 1. process(logp (batch * K, V), running sequences (batch, K, t)) -> logp: optional
    history-dependent processors. Returns (per search the K finished hypotheses' ids, best first; scores (batch, K))."""
    B, K, N = batch, num_beams, max_new_tokens
    eos = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    keep = max(2, 1 + len(eos)) * K
    run_seqs = torch.zeros(B, K, 0, dtype=torch.long)      # running beams' generated tokens
    run_scores = torch.zeros(B, K)                         # summed logprobs; only beam 0 of a search starts live
    run_scores[:, 1:] = NEG
    fin_seqs = torch.full((B, K, N), -1, dtype=torch.long)  # finished hypotheses (-1 padded), best first
    fin_scores = torch.full((B, K), NEG)
    fin_done = torch.zeros(B, K, dtype=torch.bool)
    improvable = torch.ones(B, dtype=torch.bool)
    base = (torch.arange(B) * K)[:, None]
    logits = first_logits
    for t in range(N):
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        if process is not None:
            logp = process(logp, run_seqs)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + run_scores[..., None]).view(B, K * V)
        top_scores, top_idx = torch.topk(acc, k=min(keep, K * V), dim=-1)
        beam, tok = top_idx // V, top_idx % V
        cand = torch.cat([torch.gather(run_seqs, 1, beam[..., None].expand(-1, -1, t)), tok[..., None]], -1)
        hits = torch.isin(tok, eos) if len(eos) else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= N:
            hits = torch.ones_like(hits)

        # running beams for the next step: the best K candidates that did not finish
        masked = top_scores + hits.float() * NEG
        nxt = torch.topk(masked, k=K, dim=-1).indices
        run_seqs = torch.gather(cand, 1, nxt[..., None].expand(-1, -1, t + 1))
        run_scores = torch.gather(masked, 1, nxt)
        run_beam = torch.gather(beam, 1, nxt)

        # finished hypotheses: merge the candidates that finished among the top K with the kept ones
        cand_scores = top_scores / ((t + 1) ** length_penalty)
        frozen = ~improvable
        if early_stopping is True:
            frozen = frozen | fin_done.all(-1)
        cand_scores = cand_scores + frozen[:, None].float() * NEG
        just_done = hits.clone()
        just_done[:, K:] = False
        cand_scores = cand_scores + (~just_done).float() * NEG
        merged = torch.cat([fin_scores, cand_scores], 1)
        best = torch.topk(merged, k=K, dim=-1).indices
        padded = torch.full((B, cand.shape[1], N), -1, dtype=torch.long)
        padded[..., : t + 1] = cand
        fin_seqs = torch.gather(torch.cat([fin_seqs, padded], 1), 1, best[..., None].expand(-1, -1, N))
        fin_scores = torch.gather(merged, 1, best)
        fin_done = torch.gather(torch.cat([fin_done, just_done], 1), 1, best)

        # stop?
        length = N if early_stopping == "never" and length_penalty > 0.0 else t + 1
        best_running = run_scores[:, 0] / (length ** length_penalty)
        worst_finished = torch.where(fin_done.all(-1), fin_scores.min(-1).values, torch.full((B,), NEG))
        improvable = improvable & (best_running > worst_finished)
        done = ~improvable
        if early_stopping is True:
            done = done | fin_done.all(-1)
        if bool(done.all()) or bool(hits.all()):
            break
        logits = step(run_seqs[:, :, -1].reshape(B * K), (base + run_beam).view(-1), t)
    seqs = [[[x for x in fin_seqs[b, k].tolist() if x >= 0] for k in range(K)] for b in range(B)]
    return seqs, fin_scores


def cache_reorder(cache: KVCache | StateCache, rows: torch.Tensor, length: int) -> None:
    """Make cache row i a copy of row rows[i] (positions [0, length); a StateCache's whole state). A RollingKVCache
    (sliding-window models) rolls here too: its ring slots [0, length) are the whole ring once length reaches the
    ring's size and the written positions before, and every row is at the same position, so this is its reorder."""
    if isinstance(cache, StateCache):
        cache.reorder(rows)
        return
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :length] = cache.k[layer][rows, :, :length]
        cache.v[layer][:, :, :length] = cache.v[layer][rows, :, :length]
