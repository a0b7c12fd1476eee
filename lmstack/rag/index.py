"""Build and query an index: documents -> token-aware chunks -> embeddings -> the SQLite store (store.py); queries by
dense search (exact: one matrix product over the normalised vectors), BM25 (bm25s) over the same chunks, or hybrid
(reciprocal-rank fusion of the two).

    idx = build_index(["docs/"], "runs/idx")             # re-running re-embeds only new or changed documents
    hits = Index.open("runs/idx").search("how do I ...", top_k=5, mode="hybrid")
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LMStackError
from .chunking import chunk_text
from .embedder import Embedder, local_embedder
from .sources import iter_documents
from .store import StoredChunk, Store

MODES = ("dense", "bm25", "hybrid")
DEFAULT_MODE = "hybrid"
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)


@dataclass
class Hit:
    rank: int
    score: float
    chunk: StoredChunk

    def as_dict(self) -> dict:
        c = self.chunk
        return {"rank": self.rank, "score": self.score, "chunk_id": c.id, "path": c.path, "title": c.title,
                "headings": c.headings, "start": c.start, "end": c.end, "text": c.text}


@dataclass
class BuildStats:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def build_index(sources: list[str], out: str | Path, embedder: Embedder | None = None, chunk_tokens: int = 256,
                overlap: int = 32, progress: Callable[[int, int], None] | None = None) -> BuildStats:
    """Index `sources` into `out` (created or updated). Documents whose content hash is unchanged are skipped;
    documents no longer among the sources are dropped. progress(done_documents, chunks_so_far) after each one."""
    t0 = time.perf_counter()
    store = Store(out, create=True)
    try:
        embedder = embedder or local_embedder()
        _check_settings(store, embedder, chunk_tokens, overlap, out)
        old = store.hashes()
        stats, seen = BuildStats(), set()
        for i, doc in enumerate(iter_documents(list(sources))):
            seen.add(doc.path)
            if old.get(doc.path) == doc.sha256:
                stats.unchanged += 1
                continue
            chunks = chunk_text(doc.text, embedder.count_tokens, chunk_tokens, overlap)
            store.put_document(doc.path, doc.title, doc.sha256, chunks, embedder.embed([c.text for c in chunks]))
            stats.updated += doc.path in old
            stats.added += doc.path not in old
            stats.chunks += len(chunks)
            if progress:
                progress(i + 1, stats.chunks)
        for path in set(old) - seen:
            stats.removed += store.remove_document(path)
    finally:
        store.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _check_settings(store: Store, embedder: Embedder, chunk_tokens: int, overlap: int, out) -> None:
    meta = store.meta()
    want = {"embed_model": embedder.name, "dim": str(embedder.dim), "chunk_tokens": str(chunk_tokens),
            "overlap": str(overlap)}
    if meta and store.hashes():
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            k, (have, new) = next(iter(diff.items()))
            raise LMStackError(f"{out} was built with {k}={have}, not {new}; rebuild it into a new --out directory "
                               "(or pass the same settings)")
    store.set_meta(format="1", **want)


class Index:
    """A built index, loaded for queries: the chunks, their vector matrix, and (on first use) a BM25 index."""

    def __init__(self, store: Store, embedder: Embedder | None = None):
        self.store, self.meta = store, store.meta()
        if not self.meta:
            raise LMStackError(f"{store.dir} holds no index settings; build it with `lmstack index build`")
        self.chunks, self.vectors = store.load_chunks(int(self.meta["dim"]))
        self._embedder, self._bm25 = embedder, None

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None) -> "Index":
        return cls(Store(path), embedder)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = local_embedder(None if self.meta["embed_model"] == "all-MiniLM-L6-v2"
                                            else self.meta["embed_model"])
        if self._embedder.name != self.meta["embed_model"]:
            raise LMStackError(f"this index was built with embedding model {self.meta['embed_model']!r}; query it "
                               f"with that model, not {self._embedder.name!r}")
        return self._embedder

    def search(self, query: str, top_k: int = 5, mode: str = DEFAULT_MODE) -> list[Hit]:
        if mode not in MODES:
            raise LMStackError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not self.chunks:
            raise LMStackError(f"the index at {self.store.dir} is empty; add documents with `lmstack index build`")
        if not query.strip():
            raise LMStackError("the query is empty")
        k = min(top_k, len(self.chunks))
        if mode == "dense":
            ranked = self._dense(query, k)
        elif mode == "bm25":
            ranked = self._bm25_search(query, k)
        else:
            ranked = self._fuse([self._dense(query, 4 * k), self._bm25_search(query, 4 * k)], k)
        return [Hit(r + 1, s, self.chunks[i]) for r, (i, s) in enumerate(ranked)]

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        q = self.embedder.embed([query])[0]
        scores = self.vectors @ q
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]

    def _bm25_search(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s
        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25s.tokenize([c.text for c in self.chunks], stopwords="en", show_progress=False),
                             show_progress=False)
        toks = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not toks.vocab:
            return []
        k = min(k, len(self.chunks))
        docs, scores = self._bm25.retrieve(toks, k=k, show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    @staticmethod
    def _fuse(rankings: list[list[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
        """Reciprocal-rank fusion: score = sum over rankings of 1 / (RRF_K + rank)."""
        fused: dict[int, float] = {}
        for ranking in rankings:
            for r, (i, _) in enumerate(ranking):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + r + 1)
        return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def close(self) -> None:
        self.store.close()
