"""Generation with a pre-allocated KV cache (or without, for checking): context-window handling, EOS stop, per-token
logprobs, and batched generation of prompts of different lengths in one forward pass per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..errors import ContextLengthError, LMStackError
from ..models.kv_cache import make_cache
from ..models.utils import eval_mode
from .sampling import SamplingParams, sample_next
from .text import TextStream


@dataclass
class TokenStep:
    """One generated token. logprob / top: log-probabilities under the model's own distribution (log-softmax of the
    raw logits, before penalties, temperature and filters), like OpenAI's and vLLM's default `logprobs`."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the `top_logprobs` most likely (id, logprob)


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


def stop_set(eos_id: int | Iterable[int] | None) -> set[int]:
    """One stop token id, several, or None -> a set of ids."""
    return set() if eos_id is None else ({eos_id} if isinstance(eos_id, int) else set(eos_id))


def make_generator(seed: int | None) -> torch.Generator:
    """The CPU random generator sampling draws from: seeded when `seed` is given, else from fresh entropy."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    return gen


def _steps(logits: torch.Tensor, toks: torch.Tensor, top_logprobs: int) -> list[TokenStep]:
    """(B, V) raw logits and the (B,) chosen ids -> one TokenStep per row. Computed where the logits are; only the
    (B,) chosen logprobs and the (B, top_logprobs) alternatives are copied to the host."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    toks = toks.to(logp.device)
    chosen = logp.gather(-1, toks.view(-1, 1)).squeeze(-1).tolist()
    if top_logprobs:
        vals, idx = logp.topk(min(top_logprobs, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenStep(int(t), c, tp) for t, c, tp in zip(toks.tolist(), chosen, tops)]


def prefill_logits(model, ids: torch.Tensor, cache, pos: int = 0, **kw) -> torch.Tensor:
    """Logits (B, vocab) of the last prompt position (`kw`: padding_mask / positions of a left-padded batch).
    pos > 0: `ids` continue a prefix whose keys/values are already in `cache` slots [0, pos) (a prefix-cache hit).
    Decoder models with a separate head run it on that position only (a 49k-vocabulary head over every prompt
    token is most of a short prefill's work)."""
    head = getattr(model, "lm_head", None)
    if ids.shape[1] > 1 and head is not None and getattr(model.config, "arch", "transformer") == "transformer":
        hidden = model(ids, cache=cache, pos=pos, return_hidden=True, **kw)
        return head(hidden[:, -1].contiguous())  # (B, d): one GEMM (a strided 3-D slice would broadcast the
        # weight into a batched matmul, copying the 49k x d head once per row)
    return model(ids, cache=cache, pos=pos, **kw)[:, -1]


@torch.inference_mode()
def stream_steps(model, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
                 use_cache: bool = True, truncate: str | None = None, top_logprobs: int = 0,
                 matcher=None) -> Iterator[TokenStep]:
    """Yield TokenSteps (id, logprob, top alternatives) one at a time. `eos_id`: one id or several (e.g. a chat
    model's end-of-turn tokens); generation stops after yielding one of them. matcher: the generation's
    structured-output state (constrain.new_matcher) when params carry a constraint; it also ends the generation
    once the grammar is complete."""
    stop_ids = stop_set(eos_id)
    if params.constraint is not None and matcher is None:
        raise LMStackError("structured output needs the tokenizer: generate through an LM (lmstack.load(...)) or "
                           "pass matcher=constrain.new_matcher(params, tokenizer, vocab_size)")
    if not prompt:
        raise LMStackError("the prompt is empty; give at least one token (e.g. the BOS/EOS token)")
    if top_logprobs < 0:
        raise LMStackError(f"top_logprobs must be >= 0, got {top_logprobs}")
    cfg = model.config
    prompt = fit_context(list(prompt), params.max_new_tokens, cfg.block_size, truncate)
    device = next(model.parameters()).device
    gen = make_generator(params.seed)
    history = list(prompt)
    with eval_mode(model):
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        # the model's own cache: a KVCache for the Transformer, the carried state of an RNN / a CNN's buffers
        cache = make_cache(model, 1, len(prompt) + params.max_new_tokens) if use_cache else None
        logits = prefill_logits(model, ids, cache)
        pos = ids.shape[1]
        for _ in range(params.max_new_tokens):
            # the logits stay where the model left them (float32 once, no copy when they already are): only the
            # chosen id, its logprob (and the top-n) move to the host
            logits = logits.float()
            nxt = sample_next(logits, params, gen, ids=[history], prompt_len=len(prompt), eos_ids=stop_ids,
                              allowed=None if matcher is None else matcher.allowed())
            step = _steps(logits, nxt, top_logprobs)[0]
            history.append(step.token)
            if matcher is not None:
                matcher.advance(step.token)
            yield step
            if (params.stop_at_eos and step.token in stop_ids) or (matcher is not None and matcher.done):
                return
            nxt = nxt.view(1, 1).to(device)
            if cache is not None:
                logits = model(nxt, cache=cache, pos=pos)[:, -1]
            else:
                ids = torch.cat([ids, nxt], dim=1)
                logits = model(ids)[:, -1]
            pos += 1


def stream_tokens(model, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
                  use_cache: bool = True, truncate: str | None = None, matcher=None) -> Iterator[int]:
    """Yield new token ids one at a time (stream_steps without the logprobs)."""
    steps = stream_steps(model, prompt, params, eos_id, use_cache, truncate, matcher=matcher)
    try:
        for s in steps:
            yield s.token
    finally:
        steps.close()


def generate(model, prompt: list[int], params: SamplingParams, eos_id: int | Iterable[int] | None = None,
             use_cache: bool = True,
             truncate: str | None = None) -> list[int]:
    return list(stream_tokens(model, prompt, params, eos_id, use_cache, truncate))


def generate_text(model, tokenizer, prompt: str, params: SamplingParams, truncate: str | None = None) -> str:
    """Text in, text out (the stop token and stop strings end it), without an `LM` around the model."""
    eos = stop_set(tokenizer.eos_id)
    ts = TextStream(tokenizer, eos, params.stop, params.stop_at_eos)
    return ts.decode(stream_tokens(model, tokenizer.encode_prompt(prompt), params, eos_id=eos, truncate=truncate))
