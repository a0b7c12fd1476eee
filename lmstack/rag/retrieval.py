"""The parts of retrieval around the rankers of index.py: metadata filters, exact dense ranking over a subset,
summary routing, maximal marginal relevance and the re-ranking step. Pure functions over numpy arrays, so each is
checked against a reference on fixed vectors.

    ids = source_ids(chunks, "docs/*.md")              # filter first, so top_k is still filled
    ranked = dense_rank(vectors, q, ids, k=20)         # [(chunk index, cosine)]
    keep = mmr_select(relevance, cand_vectors, 5, 0.5)  # diverse subset, positions into the candidates
"""
from __future__ import annotations

import fnmatch
import os

import numpy as np

from ..errors import LMStackError

SUMMARY_ROUTE_DOCS = 3   # summary mode ranks the chunks of (at least) this many best-summarised documents
CANDIDATE_FACTOR = 4     # re-ranking / MMR choose top_k from top_k * CANDIDATE_FACTOR candidates (at least 20)
MIN_CANDIDATES = 20


def path_matches(path: str, pattern: str) -> bool:
    """fnmatch of a chunk's path against a glob ("*" also matches "/"). A relative pattern matches at any directory
    boundary too, so "docs/*.md" matches "/home/me/docs/a.md"; a plain path matches itself and what is under it."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    if not os.path.isabs(pattern) and fnmatch.fnmatchcase(path, "*/" + pattern):
        return True
    base = pattern.rstrip("/")
    return bool(base) and (path.startswith(base + "/") or os.path.abspath(path) == os.path.abspath(pattern)
                           or os.path.abspath(path).startswith(os.path.abspath(base) + os.sep))


def source_ids(chunks, pattern: str) -> np.ndarray:
    """Indices of the chunks whose path matches `pattern` (path_matches); an error when none does."""
    ids = np.array([i for i, c in enumerate(chunks) if path_matches(c.path, pattern)], dtype=np.int64)
    if not len(ids):
        examples = ", ".join(sorted({c.path for c in chunks})[:3])
        raise LMStackError(f"no indexed document matches --source {pattern!r} (paths look like: {examples}); "
                           "check the glob (quote it so the shell does not expand it)")
    return ids


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first (ties: lower position first)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.lexsort((top, -scores[top]))]


def dense_rank(vectors: np.ndarray, q: np.ndarray, ids: np.ndarray | None, k: int) -> list[tuple[int, float]]:
    """Exact cosine ranking (rows are L2-normalised) of the chunks `ids` (None: all): [(chunk index, score)]."""
    ids = np.arange(len(vectors)) if ids is None else np.asarray(ids, dtype=np.int64)
    scores = vectors[ids] @ q
    return [(int(ids[p]), float(scores[p])) for p in top_order(scores, k)]


def filter_ranking(ranked: list[tuple[int, float]], ids: np.ndarray | None, k: int) -> list[tuple[int, float]]:
    if ids is None:
        return ranked[:k]
    keep = set(ids.tolist())
    return [(i, s) for i, s in ranked if i in keep][:k]


def route_documents(summaries, summary_vectors: np.ndarray, q: np.ndarray, chunk_counts: dict[str, int], k: int,
                    min_docs: int = SUMMARY_ROUTE_DOCS) -> list[str]:
    """The documents to search, best summary first: distinct documents in order of their best-matching summary, until
    there are `min_docs` of them holding at least `k` chunks (counts per path in `chunk_counts`; documents not in it
    are left out, e.g. filtered away)."""
    scores = summary_vectors @ q
    docs, total = [], 0
    for p in top_order(scores, len(scores)):
        path = summaries[p].path
        if path in docs or chunk_counts.get(path, 0) == 0:
            continue
        docs.append(path)
        total += chunk_counts[path]
        if len(docs) >= min_docs and total >= k:
            break
    return docs


def mmr_select(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): repeatedly pick the candidate maximising
    lam * relevance[i] - (1 - lam) * max over picked j of cos(v_i, v_j) (rows of `vectors` L2-normalised). lam = 1:
    the relevance order; lam = 0: as diverse as possible after the most relevant. Positions into the candidates."""
    if not 0.0 <= lam <= 1.0:
        raise LMStackError(f"--mmr must be between 0 and 1 (1 = plain relevance, 0 = most diverse), got {lam}")
    n = len(relevance)
    k = min(k, n)
    if k <= 0:
        return []
    rel = np.asarray(relevance, dtype=np.float64)
    sims = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    picked = [int(np.argmax(rel))]
    redundancy = sims[picked[0]].copy()
    free = np.ones(n, dtype=bool)
    free[picked[0]] = False
    while len(picked) < k:
        gain = np.where(free, lam * rel - (1.0 - lam) * redundancy, -np.inf)
        j = int(np.argmax(gain))
        picked.append(j)
        free[j] = False
        redundancy = np.maximum(redundancy, sims[j])
    return picked


def rerank_and_diversify(ranked: list[tuple[int, float]], query: str, texts: list[str], vectors: np.ndarray,
                         q: np.ndarray | None, k: int, reranker=None, mmr: float | None = None
                         ) -> list[tuple[int, float]]:
    """From the candidates `ranked` ([(chunk index, score)]; `texts` and `vectors` indexed by chunk index): re-rank
    with `reranker.score(query, passages)` when given (scores replace the retrieval scores), then, with `mmr`, pick k
    by MMR with relevance = cosine to the query (or the re-ranker's scores, min-max scaled to [0, 1]); else the top
    k. Returns [(chunk index, score)] in the chosen order."""
    if not ranked:
        return []
    ids = [i for i, _ in ranked]
    scores = np.array([s for _, s in ranked], dtype=np.float64)
    if reranker is not None:
        scores = np.asarray(reranker.score(query, [texts[i] for i in ids]), dtype=np.float64)
        order = top_order(scores, len(scores))
        ids, scores = [ids[p] for p in order], scores[order]
    if mmr is None:
        return [(i, float(s)) for i, s in zip(ids[:k], scores[:k])]
    cand = vectors[ids]
    if reranker is not None:
        span = scores.max() - scores.min()
        rel = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    else:
        rel = cand @ q
    return [(ids[p], float(scores[p])) for p in mmr_select(rel, cand, k, mmr)]
