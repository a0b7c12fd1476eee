"""Generation for encoder-decoder models (models/seq2seq.py): batched beam search and greedy decoding with the
decoder cache (kv_cache.EncoderDecoderCache), and `translate` (text in, text out).

The source batch is encoded once. The decoder cache holds the self-attention keys/values of every beam and, per
layer, the cross-attention keys/values of the encoder output: the decoder's first step (the start token) projects
the encoder output into them, and every later step only reads them. After each step the self-attention rows are
reordered by the beam each surviving continuation came from; beams never move between sources (row b*K + k always
belongs to source b), and the K beams of a source share one encoder output, so the cross keys/values need no
reordering.

Beam search is the engine's one loop (generate/beam.py: beam_search_core, which decoder-only beam_search runs with
one search): transformers' semantics (>= 4.50, vectorised beam search) applied to every source of the batch
independently, so hypotheses and `sequences_scores` match
`model.generate(num_beams=K, length_penalty=lp, early_stopping=..., max_new_tokens=N)`:
- keep the best 2K continuations per source by summed log-probability, the best K not ending in EOS run on;
- a continuation ending in EOS among the top K (or any reaching max_new_tokens) finishes with score
  sum(logprob) / generated_length ** length_penalty (the generated length counts the EOS, not the start token);
- early_stopping=True: a source is done once it has K finished hypotheses; False: when its best running beam,
  scored at the current length, cannot beat its worst finished one; "never": scored at max_new_tokens when
  length_penalty > 0. The batch stops when every source is done.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import LMStackError
from ..models.utils import eval_mode
from .beam import BeamHypothesis, beam_search_core, check_beam_args


def _pad_sources(sources: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(s) for s in sources)
    src = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sources), S, dtype=torch.bool)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return src.to(device), mask.to(device)


def _check(model, sources: list[list[int]], max_new_tokens: int) -> None:
    if not getattr(model, "is_encoder_decoder", False):
        raise LMStackError("this is not an encoder-decoder model (model.arch: encoder-decoder); translate / "
                           "seq2seq generation needs one")
    if not sources or any(len(s) == 0 for s in sources):
        raise LMStackError("every source needs at least one token")
    limit = model.encoder.config.block_size
    if max(len(s) for s in sources) > limit and model.config.pos_emb != "rope":
        raise LMStackError(f"a source of {max(len(s) for s in sources)} tokens exceeds the context window "
                           f"({limit}); truncate it")
    if max_new_tokens < 1:
        raise LMStackError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _start(model, sources, pad_id, max_new_tokens, rows_per_source):
    device = next(model.parameters()).device
    pad = pad_id if pad_id is not None else (model.config.pad_token_id or 0)
    src, mask = _pad_sources(sources, pad, device)
    memory = model.encode(src, mask)
    if rows_per_source > 1:
        memory = memory.repeat_interleave(rows_per_source, dim=0)
        mask = mask.repeat_interleave(rows_per_source, dim=0)
    cache = model.new_decoder_cache(memory.shape[0], max_new_tokens, mask)
    first = torch.full((memory.shape[0], 1), model.decoder_start_id, dtype=torch.long, device=device)
    logits = model.decode(first, memory, mask, cache=cache, pos=0)[:, -1]
    return cache, logits, device


@torch.inference_mode()
def seq2seq_greedy(model, sources: list[list[int]], max_new_tokens: int = 128, eos_id: int | None = None,
                   pad_id: int | None = None, use_cache: bool = True) -> list[list[int]]:
    """Greedy decoding of a batch of sources -> generated ids per source (ending with EOS when it ended on one).
    use_cache=False re-runs the decoder over the whole prefix every step (the reference for the cache)."""
    _check(model, sources, max_new_tokens)
    eos = model.config.eos_token_id if eos_id is None else eos_id
    max_new_tokens = min(max_new_tokens, model.decoder.config.block_size)
    B = len(sources)
    with eval_mode(model):
        cache, logits, device = _start(model, sources, pad_id, max_new_tokens, 1)
        if not use_cache:
            pad = pad_id if pad_id is not None else (model.config.pad_token_id or 0)
            src, mask = _pad_sources(sources, pad, device)
            memory = model.encode(src, mask)
        out = torch.zeros(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tok = logits.float().argmax(-1)
            tok = torch.where(done, torch.full_like(tok, eos if eos is not None else 0), tok)
            out = torch.cat([out, tok[:, None]], 1)
            if eos is not None:
                done |= tok == eos
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            if use_cache:
                logits = model.decode(tok[:, None], None, cache=cache, pos=t + 1)[:, -1]
            else:
                start = torch.full((B, 1), model.decoder_start_id, dtype=torch.long, device=device)
                logits = model.decode(torch.cat([start, out], 1), memory, mask)[:, -1]
    res = []
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        res.append(row)
    return res


@torch.inference_mode()
def seq2seq_beam_search(model, sources: list[list[int]], num_beams: int = 4, max_new_tokens: int = 128,
                        length_penalty: float = 1.0, early_stopping: bool | str = False,
                        num_return_sequences: int = 1, eos_id: int | None = None,
                        pad_id: int | None = None) -> list[list[BeamHypothesis]]:
    """Batched beam search: for each source, its num_return_sequences best hypotheses, best first."""
    _check(model, sources, max_new_tokens)
    check_beam_args(num_beams, num_return_sequences, early_stopping)
    eos = model.config.eos_token_id if eos_id is None else eos_id
    N = min(max_new_tokens, model.decoder.config.block_size)
    with eval_mode(model):
        cache, first, device = _start(model, sources, pad_id, N, num_beams)

        def step(tokens: torch.Tensor, rows: torch.Tensor, t: int) -> torch.Tensor:
            cache.reorder(rows.to(device), t + 1, cross=False)  # beams stay within their source: cross K/V kept
            return model.decode(tokens[:, None].to(device), None, cache=cache, pos=t + 1)[:, -1]

        seqs, scores = beam_search_core(first, step, len(sources), num_beams, N, length_penalty, early_stopping,
                                        [] if eos is None else [eos])
    return [[BeamHypothesis(seqs[b][k], float(scores[b, k])) for k in range(num_return_sequences)]
            for b in range(len(sources))]


def translate(model, tokenizer, texts: Iterable[str], num_beams: int = 5, length_penalty: float = 1.0,
              max_new_tokens: int | None = None, batch_size: int = 32, early_stopping: bool | str = True,
              src_tokenizer=None, progress=None, truncate: bool = False) -> list[str]:
    """Translate `texts` (one sentence each) with beam search (greedy when num_beams == 1), in batches of
    similar-length sources. src_tokenizer: the source side's, when the model has separate vocabularies.
    max_new_tokens default: 2 * source length + 10, within the decoder's context window. A source longer than the
    encoder's context is an error naming it, unless truncate=True (then its first tokens are kept)."""
    src_tok = src_tokenizer or tokenizer
    texts = list(texts)
    eos = src_tok.eos_id
    limit = model.encoder.config.block_size - (eos is not None)
    sources = [src_tok.encode(t) for t in texts]
    long = [i for i, s in enumerate(sources) if len(s) > limit]
    if long and not truncate:
        raise LMStackError(f"{len(long)} source sentence(s) are longer than the encoder's context of {limit} tokens "
                           f"(the first: #{long[0] + 1}, {len(sources[long[0]])} tokens); split them, or pass "
                           "truncate=True (--truncate) to keep their first tokens")
    sources = [s[:limit] + ([eos] if eos is not None else []) for s in sources]
    order = sorted(range(len(texts)), key=lambda i: len(sources[i]))
    outs: list[str] = [""] * len(texts)
    pad = src_tok.pad_id if src_tok.pad_id is not None else (eos or 0)
    t_eos = tokenizer.eos_id
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        batch = [sources[j] for j in idx]
        n = max_new_tokens or min(model.decoder.config.block_size, 2 * max(len(s) for s in batch) + 10)
        if num_beams > 1:
            res = [h[0].tokens for h in seq2seq_beam_search(model, batch, num_beams=num_beams, max_new_tokens=n,
                                                              length_penalty=length_penalty,
                                                              early_stopping=early_stopping, pad_id=pad)]
        else:
            res = seq2seq_greedy(model, batch, max_new_tokens=n, pad_id=pad)
        for j, ids in zip(idx, res):
            ids = [x for x in ids if x != t_eos]
            outs[j] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return outs
