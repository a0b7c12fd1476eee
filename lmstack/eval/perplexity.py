"""Perplexity and bits-per-byte of a corpus, with sliding-window evaluation for text longer than the context.

Every document is scored on its own, conditioned on the BOS/EOS prefix token so that its first token counts too
(lm-eval's rolling log-likelihood); windows of `max_length` tokens move by `stride`, every token is scored exactly
once, and each token past the first window keeps at least max_length - stride tokens of context (Hugging Face's
perplexity recipe; stride = max_length gives disjoint windows, smaller strides give more context for more compute).

Reported: token perplexity exp(nats / tokens), bits_per_byte = nats / (ln 2 * UTF-8 bytes), byte_perplexity
exp(nats / bytes), word_perplexity exp(nats / words) (words split on whitespace, as lm-eval's wikitext).
"""
from __future__ import annotations

import math
import re
from typing import Iterable


def document_stats(backend, text: str, stride: int | None = None, max_length: int | None = None) -> dict:
    lp = backend.token_logprobs_rolling(text, stride=stride, max_length=max_length)
    return {"nats": -float(lp.double().sum()), "tokens": int(lp.numel()), "bytes": len(text.encode("utf-8")),
            "words": len(re.split(r"\s+", text.strip())) if text.strip() else 0}


def aggregate(stats: Iterable[dict]) -> dict:
    tot = {"nats": 0.0, "tokens": 0, "bytes": 0, "words": 0, "documents": 0}
    for s in stats:
        for k in ("nats", "tokens", "bytes", "words"):
            tot[k] += s[k]
        tot["documents"] += 1
    n, t, b, w = tot["nats"], tot["tokens"], tot["bytes"], tot["words"]
    tot.update(token_perplexity=math.exp(n / t) if t else float("nan"),
               bits_per_byte=n / (math.log(2) * b) if b else float("nan"),
               byte_perplexity=math.exp(n / b) if b else float("nan"),
               word_perplexity=math.exp(n / w) if w else float("nan"))
    return tot


def corpus_documents(spec: str, limit: int | None = None) -> list[str]:
    """The documents of a corpus spec (file, directory, glob, 'shakespeare', 'pydocs'): a .txt file is one
    document, a .jsonl file one document per line ('text' field)."""
    from ..data.corpora import iter_corpus
    docs: list[str] = []
    for text, new in iter_corpus(spec):
        if new or not docs:
            if limit is not None and len(docs) >= limit:
                break
            docs.append(text)
        else:
            docs[-1] += text
    return docs


def perplexity(model, texts: str | Iterable[str], stride: int | None = None, max_length: int | None = None) -> dict:
    """Perplexity / bits-per-byte of `texts` (one string or several documents) under `model` (an `lmstack.LM` or
    an evaluation backend)."""
    from .backend import LocalBackend
    backend = model if hasattr(model, "token_logprobs_rolling") else LocalBackend(model)
    if isinstance(texts, str):
        texts = [texts]
    return aggregate(document_stats(backend, t, stride, max_length) for t in texts)
