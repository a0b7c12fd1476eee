"""The one sampling pipeline: logits -> temperature -> top-k -> top-p -> sample (or argmax when temperature=0)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import LMStackError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.temperature is None or self.temperature < 0:
            raise LMStackError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is None or self.top_k < 0:
            raise LMStackError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise LMStackError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is None or self.max_new_tokens < 0:
            raise LMStackError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def process_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) processed logits (filtered entries are -inf). Same order as Hugging Face:
    temperature, then top-k, then top-p."""
    logits = logits.float()
    if p.greedy:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - p.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) raw logits -> (B,) next token ids."""
    if p.greedy:
        return logits.argmax(-1)
    probs = process_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
