"""Generation with a pre-allocated KV cache (or without, for checking), context-window handling, EOS stop."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..errors import ContextLengthError, LMStackError
from ..models.kv_cache import KVCache
from .sampling import SamplingParams, sample_next


def fit_context(prompt: list[int], max_new_tokens: int, block_size: int, truncate: str | None = None) -> list[int]:
    """Check that prompt + max_new_tokens fits the context window; with truncate='left' keep the newest tokens."""
    if max_new_tokens >= block_size:
        raise ContextLengthError(f"max_new_tokens={max_new_tokens} must be smaller than the context window "
                                 f"({block_size} tokens)")
    if len(prompt) + max_new_tokens <= block_size:
        return prompt
    if truncate == "left":
        return prompt[len(prompt) - (block_size - max_new_tokens):]
    if truncate not in (None, "error"):
        raise LMStackError(f"truncate must be None/'error' or 'left', got {truncate!r}")
    raise ContextLengthError(
        f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context window of "
        f"{block_size} tokens; shorten the prompt, lower max_new_tokens, or pass truncate='left' (--truncate left)")


@torch.inference_mode()
def stream_tokens(model, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
                  use_cache: bool = True, truncate: str | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. `eos_id`: one id or several (e.g. a chat model's end-of-turn tokens);
    generation stops after yielding one of them."""
    stop_ids = set() if eos_id is None else ({eos_id} if isinstance(eos_id, int) else set(eos_id))
    if not prompt:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    cfg = model.config
    prompt = fit_context(list(prompt), params.max_new_tokens, cfg.block_size, truncate)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        cache = KVCache.for_model(model, 1, len(prompt) + params.max_new_tokens) if use_cache else None
        logits = model(ids, cache=cache, pos=0)[:, -1]
        pos = ids.shape[1]
        for _ in range(params.max_new_tokens):
            nxt = sample_next(logits.float().cpu(), params, gen)
            tok = int(nxt[0])
            yield tok
            if params.stop_at_eos and tok in stop_ids:
                return
            step = nxt.view(1, 1).to(device)
            if cache is not None:
                logits = model(step, cache=cache, pos=pos)[:, -1]
            else:
                ids = torch.cat([ids, step], dim=1)
                logits = model(ids)[:, -1]
            pos += 1
    finally:
        model.train(was_training)


def generate(model, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
             use_cache: bool = True,
             truncate: str | None = None) -> list[int]:
    return list(stream_tokens(model, prompt, params, eos_id, use_cache, truncate))


def generate_text(model, tokenizer, prompt: str, params: SamplingParams, truncate: str | None = None) -> str:
    ids = tokenizer.encode(prompt) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    from ..lm import decode_stream
    return "".join(decode_stream(tokenizer, generate(model, ids, params, eos_id=tokenizer.eos_id, truncate=truncate)))
