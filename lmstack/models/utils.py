"""Small model helpers every layer above uses: a model built from a state dict, and eval mode for a block of code."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from ..config import ARCHS, ModelConfig
from ..errors import LMStackError
from .cnn import GatedCNN
from .rnn import RNNLM
from .seq2seq import Seq2SeqTransformer
from .transformer import Transformer


def make_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of architecture `cfg.arch`: the Transformer, an LSTM/GRU (rnn.RNNLM) or the
    gated CNN (cnn.GatedCNN), or the encoder-decoder (seq2seq.Seq2SeqTransformer: two Transformer stacks,
    `arch: encoder-decoder`). Every caller that builds a model from a config goes through here."""
    if cfg.arch == "transformer":
        return Transformer(cfg)
    if cfg.arch in ("lstm", "gru"):
        return RNNLM(cfg)
    if cfg.arch == "gcnn":
        return GatedCNN(cfg)
    if cfg.arch == "encoder-decoder":
        return Seq2SeqTransformer(cfg)
    raise LMStackError(f"model.arch={cfg.arch!r} is not supported; choose one of {', '.join(ARCHS)}")


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model for `cfg` (any arch) holding exactly the weights in `state` (the tied head may be absent); a
    mismatch is an error naming `source`."""
    model = make_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model, "tied_weight_keys", ("lm_head.weight",) if cfg.tie_embeddings else ())
    missing = [k for k in missing if k not in tied]
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


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Give a model built on the meta device real, uninitialised storage (what nn.Module.to_empty does, minus its
    cost: to_empty's empty_like on meta tensors runs through torch._refs, importing sympy and torch._dynamo, ~0.7-2 s
    per process). Each parameter and buffer gets its own storage (re-tie shared weights afterwards); a parameter's
    attributes (e.g. `muon_ok`) are kept."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                m._parameters[name] = new
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model
