"""Small model helpers every layer above uses: a model built from a state dict, and eval mode for a block of code."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import LMStackError
from .transformer import Transformer


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> Transformer:
    """A Transformer for `cfg` holding exactly the weights in `state` (the tied head may be absent); a mismatch
    is an error naming `source`."""
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LMStackError(f"{source}: the weights do not fit the model config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return model


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run a block with `models` in eval mode (no dropout) and put back the mode each had. A model already in eval
    mode is left alone (switching walks the whole module tree, ~1 ms on a 30-layer model: too slow per decode
    step)."""
    was = [m.training for m in models]
    for m, w in zip(models, was):
        if w:
            m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            if w:
                m.train(True)
