"""Sentence embeddings from any model lmstack loads: mean-pooled final hidden states over the real tokens, L2
normalised (the sentence-transformers convention, e.g. all-MiniLM-L6-v2)."""
from __future__ import annotations

import weakref

import torch
from tokenizers import Tokenizer as HFTokenizer

from ..models.transformer import Transformer
from ..models.utils import eval_mode
from ..tokenizer import Tokenizer


_COPIES: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()


def _truncating_copy(tokenizer: Tokenizer, limit: int) -> HFTokenizer:
    """A copy of the tokenizer that truncates to `limit` (keeping the special tokens) and never pads, made once per
    (tokenizer, limit, vocabulary size): building it from JSON costs milliseconds, more than embedding one query."""
    copies = _COPIES.setdefault(tokenizer, {})
    key = (limit, tokenizer.hf.get_vocab_size(with_added_tokens=True))
    if key not in copies:
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
        hf.no_padding()
        hf.enable_truncation(limit)
        copies[key] = hf
    return copies[key]


@torch.no_grad()
def embed(model: Transformer, tokenizer: Tokenizer, texts: list[str] | str, normalize: bool = True,
          batch_size: int = 32, max_length: int | None = None) -> torch.Tensor:
    """Sentence embeddings (N, n_embd): mean of the last hidden states over real (non-padding) tokens, then L2
    normalised — the sentence-transformers convention (e.g. all-MiniLM-L6-v2). Inputs get the tokenizer's
    special tokens ([CLS] ... [SEP]) and are truncated to max_length (default: tokenizer.model_max_length, at
    most the model's block_size)."""
    if isinstance(texts, str):
        texts = [texts]
    limit = min(x for x in (max_length, tokenizer.model_max_length, model.config.block_size) if x)
    hf = _truncating_copy(tokenizer, limit)
    seqs = [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=True)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outs = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool, device=device)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, :len(s)] = True
        with eval_mode(model):
            h = model(ids, return_hidden=True, padding_mask=mask).float()
        m = mask.unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        outs.append(torch.nn.functional.normalize(e, p=2, dim=-1) if normalize else e)
    return torch.cat(outs) if outs else torch.zeros(0, model.config.n_embd)
