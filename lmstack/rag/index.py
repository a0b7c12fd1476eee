"""Build and query an index: documents -> token-aware chunks -> embeddings -> the SQLite store (store.py); queries by
dense search (vectors.py: exact, or faiss HNSW / IVF; a Qdrant store searches itself), BM25 (bm25s) over the same
chunks, hybrid (reciprocal-rank fusion of the two), or summary (rank the LM-written summaries of summaries.py, route
to their documents, rank those documents' chunks densely). Around any mode (retrieval.py, rerank.py): a `source` glob
filter applied before ranking, re-ranking of a larger candidate pool (LM yes-probability or a cross-encoder), and
MMR.

    idx = build_index(["docs/"], "runs/idx")             # re-running re-embeds only new or changed documents
    hits = Index.open("runs/idx").search("how do I ...", top_k=5, mode="hybrid")
    hits = Index.open("runs/idx").search("how do I ...", source="docs/*.md", mmr=0.5, rerank=load_reranker(path))
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
from .retrieval import (CANDIDATE_FACTOR, MIN_CANDIDATES, SUMMARY_ROUTE_DOCS, dense_rank, filter_ranking,
                        path_matches, rerank_and_diversify, route_documents, source_ids)
from .sources import iter_documents
from .store import StoredChunk, Store, open_store
from .vectors import cached_vectors, check_kind

MODES = ("dense", "bm25", "hybrid", "summary")  # the one list of retrieval modes (the CLI's choices too)
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
    summaries: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def build_index(sources: list[str], out: str | Path, embedder: Embedder | None = None, chunk_tokens: int = 256,
                overlap: int = 32, progress: Callable[[int, int], None] | None = None, summarizer=None,
                drop_missing: bool = True) -> BuildStats:
    """Index `sources` into `out` (created or updated). Documents whose content hash is unchanged are skipped (they
    keep their chunks and summaries); with drop_missing (the default), documents no longer among the sources are
    dropped (`lmstack index add` passes False). summarizer (summaries.Summarizer): also write LM summaries of each
    new or changed document and of its long sections, embedded and stored in the document's transaction; turning it
    on for an index built without it summarises the unchanged documents too. progress(done_documents,
    chunks_so_far) after each one. With a summarizer, documents are summarised (and written) summarizer.batch_size
    at a time."""
    from .summaries import as_summarizer, check_summary_settings
    summarizer = as_summarizer(summarizer)
    t0 = time.perf_counter()
    store = open_store(out, create=True)
    try:
        embedder = embedder or local_embedder()
        old = store.hashes()
        summary_meta = check_summary_settings(store.meta(), bool(old), summarizer, out)
        _check_settings(store, embedder, chunk_tokens, overlap, out)
        unsummarised = set()
        if summarizer is not None:
            done = {s.path for s in store.load_summaries(embedder.dim)[0]}
            unsummarised = {p for p, _, n in store.documents() if n and p not in done}
            store.set_meta(**summary_meta)
        stats, seen, group = BuildStats(), set(), []
        batch = summarizer.batch_size if summarizer is not None else 1
        for i, doc in enumerate(iter_documents(list(sources))):
            seen.add(doc.path)
            if old.get(doc.path) == doc.sha256 and doc.path not in unsummarised:
                stats.unchanged += 1
                continue
            group.append((doc, chunk_text(doc.text, embedder.count_tokens, chunk_tokens, overlap)))
            if len(group) >= batch:
                _write_group(store, embedder, summarizer, group, old, stats)
                group = []
                if progress:
                    progress(i + 1, stats.chunks)
        if group:
            _write_group(store, embedder, summarizer, group, old, stats)
            if progress:
                progress(i + 1, stats.chunks)
        if drop_missing:
            for path in set(old) - seen:
                stats.removed += store.remove_document(path)
    finally:
        store.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _write_group(store: Store, embedder: Embedder, summarizer, group, old: dict, stats: BuildStats) -> None:
    """Summarise (when asked) and store a group of (document, chunks), one transaction per document."""
    from .summaries import embed_text, summarize_documents
    if not group:
        return
    summaries = ([[] for _ in group] if summarizer is None else
                 summarize_documents([(d.title, d.text, chunks) for d, chunks in group], summarizer))
    for (doc, chunks), sums in zip(group, summaries):
        svecs = embedder.embed([embed_text(doc.title, t, h) for t, h in sums]) if sums else None
        store.put_document(doc.path, doc.title, doc.sha256, chunks, embedder.embed([chunk_embed_text(doc.title, c) for c in chunks]),
                           summaries=sums, summary_vectors=svecs)
        stats.updated += doc.path in old
        stats.added += doc.path not in old
        stats.chunks += len(chunks)
        stats.summaries += len(sums)


CHUNK_TEXT = "title>headings+text"  # recorded in the index: what chunk_embed_text gives


def chunk_embed_text(title: str, chunk) -> str:
    """What is embedded and BM25-indexed for a chunk: its document title and heading path, then its text (a
    contextual header: a chunk deep in a document still says what it is about). On the pydocs question set this
    raised hybrid recall@1 from 0.533 to 0.582 and MRR@10 from 0.687 to 0.715 (benchmarks/RESULTS.md). The stored
    and shown text is the chunk's own."""
    where = " > ".join([title] + [h for h in chunk.headings if h != title])
    return f"{where}\n\n{chunk.text}"


def remove_documents(out: str | Path, patterns: list[str]) -> list[str]:
    """Drop the documents whose path matches any of `patterns` (a path, a folder, or a glob; see
    retrieval.path_matches) from the index at `out`; returns the removed paths. An error when nothing matches."""
    store = open_store(out)
    try:
        paths = sorted(store.hashes())
        gone = [p for p in paths if any(path_matches(p, pat) for pat in patterns)]
        if not gone:
            raise LMStackError(f"no indexed document matches {', '.join(map(repr, patterns))} (paths look like: "
                               f"{', '.join(paths[:3]) or 'none, the index is empty'}); see `lmstack index ls "
                               f"{out}`")
        for p in gone:
            store.remove_document(p)
    finally:
        store.close()
    return gone


def _check_settings(store: Store, embedder: Embedder, chunk_tokens: int, overlap: int, out) -> None:
    meta = store.meta()
    want = {"embed_model": embedder.name, "dim": str(embedder.dim), "chunk_tokens": str(chunk_tokens),
            "overlap": str(overlap), "chunk_text": CHUNK_TEXT}
    if meta and store.hashes():
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            k, (have, new) = next(iter(diff.items()))
            if k == "chunk_text":
                raise LMStackError(f"{out} was built by an older lmstack that embedded chunks without their title "
                                   "and heading path; rebuild it into a new --out directory")
            raise LMStackError(f"{out} was built with {k}={have}, not {new}; rebuild it into a new --out directory "
                               "(or pass the same settings)")
    store.set_meta(format="1", **want)


class Index:
    """A built index, loaded for queries: the chunks, their vector matrix, and (on first use) a BM25 index."""

    def __init__(self, store: Store, embedder: Embedder | None = None, vectors: str = "auto"):
        """vectors: the dense-search backend (vectors.py: auto, exact, hnsw, ivf), its ANN structure cached in the
        index directory. A store with its own vector search (qdrant_store.py) is searched there instead, and its
        chunk vectors are fetched only when exact ranking in memory needs them (filters, MMR, summary mode)."""
        self.store, self.meta = store, store.meta()
        if not self.meta:
            raise LMStackError(f"{store.dir} holds no index settings; build it with `lmstack index build`")
        self._vector_kind, self._backend, self._remote = check_kind(vectors), None, hasattr(store, "search")
        dim = int(self.meta["dim"])
        self.chunks, self._vectors = store.load_chunks(dim, with_vectors=False) if self._remote \
            else store.load_chunks(dim)
        self._row_of = {c.id: i for i, c in enumerate(self.chunks)} if self._remote else None
        unchanged = store.meta().get("generation") == self.meta.get("generation")  # no write while we read
        self._generation = self.meta.get("generation", "0") if unchanged else None
        self._embedder, self._bm25 = embedder, None

    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None, vectors: str = "auto") -> "Index":
        """The index at `path`: a directory, or a store spec such as qdrant://HOST:PORT/COLLECTION (store.py's
        open_store)."""
        return cls(open_store(path), embedder, vectors)

    @property
    def vectors(self) -> np.ndarray:
        """(N, dim) chunk vectors, row i of chunk i (from a Qdrant store: fetched on first use)."""
        if self._vectors is None:
            self._vectors = self.store.vectors_of([c.id for c in self.chunks], int(self.meta["dim"]))
        return self._vectors

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = local_embedder(None if self.meta["embed_model"] == "all-MiniLM-L6-v2"
                                            else self.meta["embed_model"])
        if self._embedder.name != self.meta["embed_model"]:
            raise LMStackError(f"this index was built with embedding model {self.meta['embed_model']!r}; query it "
                               f"with that model, not {self._embedder.name!r}")
        return self._embedder

    def search(self, query: str, top_k: int = 5, mode: str = DEFAULT_MODE, source: str | None = None,
               mmr: float | None = None, rerank=None, candidates: int | None = None,
               route_docs: int = SUMMARY_ROUTE_DOCS) -> list[Hit]:
        """The top_k chunks for `query` by `mode` (MODES). source: a glob on the chunk path (retrieval.path_matches),
        applied before ranking. rerank (a rerank.py re-ranker, or a model path for load_reranker) and mmr (lambda in
        [0, 1]) choose the top_k from `candidates` (default max(20, 4 * top_k)) retrieved ones. summary mode: the
        chunks of the documents whose summaries match best (at least `route_docs` documents)."""
        if mode not in MODES:
            raise LMStackError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not self.chunks:
            raise LMStackError(f"the index at {self.store.dir} is empty; add documents with `lmstack index build`")
        if not query.strip():
            raise LMStackError("the query is empty")
        if top_k < 1:
            raise LMStackError(f"top_k must be at least 1, got {top_k}")
        allowed = None if source is None else source_ids(self.chunks, source)
        n = len(self.chunks) if allowed is None else len(allowed)
        k = min(top_k, n)
        pool = k if rerank is None and mmr is None else min(n, max(k, candidates or max(MIN_CANDIDATES,
                                                                                        CANDIDATE_FACTOR * k)))
        ranked = self._rank(query, mode, pool, allowed, route_docs)
        if rerank is not None or mmr is not None:
            from .rerank import load_reranker
            q = self.embedder.embed([query])[0] if mmr is not None else None
            ranked = rerank_and_diversify(ranked, query, [c.text for c in self.chunks], self.vectors, q, k,
                                          None if rerank is None else load_reranker(rerank), mmr)
        return [Hit(r + 1, s, self.chunks[i]) for r, (i, s) in enumerate(ranked[:k])]

    def _rank(self, query: str, mode: str, k: int, allowed, route_docs: int) -> list[tuple[int, float]]:
        """[(chunk index, score)] best first, at most k, only chunks in `allowed` (None: all)."""
        if mode == "summary":
            return self._summary_search(query, k, allowed, route_docs)
        if mode == "dense":
            if allowed is None:
                return self._dense(query, k)
            return dense_rank(self.vectors, self.embedder.embed([query])[0], allowed, k)
        everything = len(self.chunks) if allowed is not None else None  # filter after BM25 ranks all
        if mode == "bm25":
            return filter_ranking(self._bm25_search(query, everything or k), allowed, k)
        dense = self._rank(query, "dense", 4 * k, allowed, route_docs)
        return self._fuse([dense, filter_ranking(self._bm25_search(query, everything or 4 * k), allowed, 4 * k)], k)

    def summaries(self):
        """(StoredSummary list, (N, dim) vectors) of the index, loaded on first use."""
        if getattr(self, "_summaries", None) is None:
            self._summaries = self.store.load_summaries(int(self.meta["dim"]))
        return self._summaries

    def _summary_search(self, query: str, k: int, allowed, route_docs: int) -> list[tuple[int, float]]:
        summaries, svecs = self.summaries()
        if not summaries:
            raise LMStackError(f"the index at {self.store.dir} has no summaries; rebuild it with `lmstack index build "
                               "... --summaries` (or use another --mode)")
        ids = np.arange(len(self.chunks)) if allowed is None else allowed
        counts: dict[str, int] = {}
        for i in ids:
            counts[self.chunks[i].path] = counts.get(self.chunks[i].path, 0) + 1
        q = self.embedder.embed([query])[0]
        docs = set(route_documents(summaries, svecs, q, counts, k, route_docs))
        return dense_rank(self.vectors, q, np.array([i for i in ids if self.chunks[i].path in docs], dtype=np.int64),
                          k)

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        q = self.embedder.embed([query])[0]
        if self._remote:  # the store's own (server-side) vector search
            return [(self._row_of[c], s) for c, s in self.store.search(q, k) if c in self._row_of][:k]
        if self._backend is None:
            self._backend = cached_vectors(self._vector_kind, self.vectors, getattr(self.store, "dir", None),
                                           self._generation)
        scores, rows = self._backend.search(q, k)
        return [(int(i), float(s)) for i, s in zip(rows, scores) if i >= 0]

    def _bm25_search(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s
        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25s.tokenize([chunk_embed_text(c.title, c) for c in self.chunks], stopwords="en", show_progress=False),
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
