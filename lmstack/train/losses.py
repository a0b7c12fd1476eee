"""Masked language-model losses shared by the objectives (SFT, reward, DPO, PPO).

Convention (the same as pretraining's (x, y) batches): `labels[:, t]` is the target for the prediction made at
position t, i.e. labels are already shifted (labels[:, t] = input_ids[:, t + 1] where trained) and -100 marks
positions that carry no loss (prompt tokens, padding). `lmstack.data.sft.collate` builds such batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def labelled_logits(model, input_ids: torch.Tensor, labels: torch.Tensor,
                    padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V), mask (B, T)) at the N positions whose label != -100 only: the output head (a vocab-sized
    matmul and log-softmax, ~20% of a small model's FLOPs and most of its activation memory) runs only where a
    loss is taken. Falls back to full logits for models without `lm_head`/`return_hidden`."""
    mask = labels != IGNORE_INDEX
    kw = {"padding_mask": padding_mask} if padding_mask is not None else {}
    head = getattr(model, "lm_head", None)
    if head is None:
        return model(input_ids, **kw)[mask], mask
    hidden = model(input_ids, return_hidden=True, **kw)
    return head(hidden[mask]), mask


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor,
                      padding_mask: torch.Tensor | None = None, average: bool = False) -> torch.Tensor:
    """Per-sequence sum (average=True: mean) of log p(labels[t] | input_ids[:t+1]) over positions where
    labels != -100 -> (B,) float32, differentiable. padding_mask (B, T) bool, True = real token, is passed to the
    model (needed only for left padding; right padding with -100 labels needs none)."""
    logits, mask = labelled_logits(model, input_ids, labels, padding_mask)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    per_tok = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    total = per_tok.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the label positions != -100 (nats per trained token)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def sft_loss(model, batch) -> torch.Tensor:
    """Trainer loss_fn for supervised fine-tuning: batch = (input_ids, labels) -> mean cross-entropy over the
    labelled positions (the output head runs on those positions only)."""
    x, y = batch
    logits, mask = labelled_logits(model, x, y)
    return F.cross_entropy(logits.float(), y[mask])
