"""Scoring a continuation: the log-likelihood evaluation (multiple choice, perplexity) and the server's `echo`
logprobs reuse."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ContextLengthError, LMStackError
from ..models.utils import eval_mode


def continuation_logprobs(model, context_ids: Sequence[int], continuation_ids: Sequence[int]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprob, is_argmax) of `continuation_ids` given `context_ids`, from one forward pass."""
    lp, greedy, _ = continuation_logprobs_top(model, context_ids, continuation_ids)
    return lp, greedy


@torch.inference_mode()
def continuation_logprobs_top(model, context_ids: Sequence[int], continuation_ids: Sequence[int], top_n: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, float]]]]:
    """`continuation_logprobs` plus, per continuation token, the `top_n` most likely (id, logprob) at that position (the
    server's `echo` + `logprobs`)."""
    ctx, cont = list(context_ids), list(continuation_ids)
    if not ctx:
        raise LMStackError("score needs a non-empty context (start it with the BOS/EOS token)")
    if not cont:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool), []
    n = len(ctx) + len(cont) - 1  # the last continuation token is only predicted, never fed
    if n > model.config.block_size:
        raise ContextLengthError(f"context ({len(ctx)} tokens) + continuation ({len(cont)} tokens) exceeds the "
                                 f"model's context window of {model.config.block_size} tokens; shorten the context")
    device = next(model.parameters()).device
    with eval_mode(model):
        ids = torch.tensor([(ctx + cont)[:n]], dtype=torch.long, device=device)
        logits = model(ids)[0, len(ctx) - 1:].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(cont, device=logp.device)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    top: list[list[tuple[int, float]]] = [[] for _ in cont]
    if top_n > 0:
        v, i = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        top = [list(zip(ii.tolist(), vv.tolist())) for ii, vv in zip(i.cpu(), v.cpu())]
    return lp.cpu(), (logp.argmax(-1) == target).cpu(), top


def score(model, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
    """(sum of log P(continuation | context), whether greedy decoding from the context would produce exactly the
    continuation): lm-evaluation-harness's `loglikelihood` request."""
    lp, greedy = continuation_logprobs(model, context_ids, continuation_ids)
    return float(lp.double().sum()), bool(greedy.all())
