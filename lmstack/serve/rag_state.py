"""The server's RAG state: every `--index` loaded once at startup as an OpenAI-style vector store (`vs_<dir name>`),
the one thread that runs retrieval and the embedding model (so an embedder is never entered from two threads at
once, and the event loop never waits on it), the attribute filters of vector-store search, and the 2-D PCA map
of an index's chunk vectors. Pure data and numpy; the routes (rag_routes.py) do the HTTP side."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import LMStackError
from ..rag.index import Hit, Index
from ..rag.store import DB_NAME, Store
from .protocol import APIError

MAP_POINTS = 5000  # the map subsamples larger indexes to this many points (evenly spaced, so deterministic)
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
ATTRIBUTES = ("path", "filename", "title", "headings", "chunk_id")


def file_id(path: str) -> str:
    """The stable id a document goes by in the vector-store API."""
    return "file-" + hashlib.sha1(path.encode("utf-8")).hexdigest()[:24]


def attributes(hit_chunk) -> dict[str, Any]:
    """The search attributes of a chunk (what `filters` can test)."""
    c = hit_chunk
    return {"path": c.path, "filename": os.path.basename(c.path) or c.path, "title": c.title,
            "headings": " > ".join(c.headings), "chunk_id": c.id}


# ----------------------------------------------------------------------------------------------------- filters
def check_filter(f: Any, depth: int = 0) -> None:
    """400 unless `f` is an OpenAI comparison filter {key, type, value} or compound filter {type: and|or,
    filters: [...]} over the supported attribute keys."""
    def bad(msg: str):
        raise APIError(400, f"filters: {msg}", param="filters")
    if not isinstance(f, dict):
        bad("a filter must be an object")
    if depth > 8:
        bad("filters nest at most 8 deep")
    t = f.get("type")
    if t in ("and", "or"):
        subs = f.get("filters")
        if not isinstance(subs, list) or not subs:
            bad(f"a compound '{t}' filter needs a non-empty 'filters' list")
        for s in subs:
            check_filter(s, depth + 1)
        return
    if t not in COMPARISONS:
        bad(f"'type' must be one of {', '.join(COMPARISONS + ('and', 'or'))}, got {str(t)[:40]!r}")
    if f.get("key") not in ATTRIBUTES:
        bad(f"'key' must be one of {', '.join(ATTRIBUTES)}, got {str(f.get('key'))[:60]!r}")
    v = f.get("value")
    scalar = (str, int, float)
    if t in ("in", "nin"):
        if not isinstance(v, list) or not all(isinstance(x, scalar) and not isinstance(x, bool) for x in v):
            bad(f"'{t}' needs a list of strings or numbers as 'value'")
    elif isinstance(v, bool) or not isinstance(v, scalar):
        bad(f"'{t}' needs a string or number 'value'")
    elif t in ("gt", "gte", "lt", "lte") and f["key"] != "chunk_id" and not isinstance(v, str):
        bad(f"'{t}' on '{f['key']}' needs a string 'value'")


def matches(f: dict, attrs: dict) -> bool:
    """Whether `attrs` pass the (checked) filter `f`."""
    t = f["type"]
    if t == "and":
        return all(matches(s, attrs) for s in f["filters"])
    if t == "or":
        return any(matches(s, attrs) for s in f["filters"])
    a, v = attrs[f["key"]], f["value"]
    if t == "eq":
        return a == v
    if t == "ne":
        return a != v
    if t in ("in", "nin"):
        return (a in v) == (t == "in")
    if isinstance(a, str) != isinstance(v, str):
        return False  # an ordering between a string and a number never holds
    return {"gt": a > v, "gte": a >= v, "lt": a < v, "lte": a <= v}[t]


# --------------------------------------------------------------------------------------------------------- map
def pca_map(vectors: np.ndarray, limit: int = MAP_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                     np.ndarray]:
    """The 2-D PCA of `vectors` (at most `limit` rows, evenly spaced): (row indices, (n, 2) coordinates, the mean,
    the (2, dim) components, explained variance ratios). Each component's sign makes its largest-magnitude loading
    positive, so the map is the same on every run."""
    n, dim = vectors.shape
    rows = np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))
    x = vectors[rows].astype(np.float64)
    mean = x.mean(axis=0) if len(rows) else np.zeros(dim)
    comps, ratio = np.zeros((2, dim)), np.zeros(2)
    if len(rows) > 1:
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(2, len(s))
        comps[:k] = vt[:k]
        total = float((s ** 2).sum())
        ratio[:k] = (s[:k] ** 2) / total if total > 0 else 0.0
    for i in range(2):
        j = int(np.argmax(np.abs(comps[i])))
        if comps[i, j] < 0:
            comps[i] = -comps[i]
    return rows, (x - mean) @ comps.T, mean, comps, ratio


# ------------------------------------------------------------------------------------------------ vector stores
class VectorStore:
    """One served index: its id and name, the Index, and what the API shows about it."""

    def __init__(self, sid: str, name: str, index: Index, owned: bool):
        self.id, self.name, self.index, self.owned = sid, name, index, owned
        db = Path(index.store.dir) / DB_NAME
        st = db.stat() if db.exists() else None
        self.created_at = int(st.st_mtime) if st else int(time.time())
        self.usage_bytes = int(st.st_size) if st else int(index.vectors.nbytes)
        self.paths = sorted({c.path for c in index.chunks})
        self.last_active_at = self.created_at
        self._map: dict | None = None

    def touch(self) -> None:
        self.last_active_at = int(time.time())

    def as_dict(self) -> dict:
        n = len(self.paths)
        meta = self.index.meta
        return {"id": self.id, "object": "vector_store", "created_at": self.created_at, "name": self.name,
                "usage_bytes": self.usage_bytes,
                "file_counts": {"in_progress": 0, "completed": n, "failed": 0, "cancelled": 0, "total": n},
                "status": "completed", "last_active_at": self.last_active_at,
                "metadata": {"embed_model": meta.get("embed_model", ""), "chunks": str(len(self.index.chunks)),
                             "chunk_tokens": meta.get("chunk_tokens", "")},
                "expires_after": None, "expires_at": None}

    def search(self, query: str, k: int, mode: str, filters: dict | None) -> list[Hit]:
        """The best `k` chunks for `query` that pass `filters` (retrieval runs over every chunk when filtered)."""
        idx = self.index
        if filters is None:
            return idx.search(query, top_k=k, mode=mode)
        hits = idx.search(query, top_k=len(idx.chunks), mode=mode)
        return [h for h in hits if matches(filters, attributes(h.chunk))][:k]

    def map(self) -> dict:
        """The 2-D PCA map of the chunk vectors (computed once), with each point's source document."""
        if self._map is None:
            idx = self.index
            rows, xy, mean, comps, ratio = pca_map(idx.vectors)
            src = {p: i for i, p in enumerate(self.paths)}
            titles = {c.path: c.title for c in idx.chunks}
            points = [{"x": float(xy[j, 0]), "y": float(xy[j, 1]), "chunk_id": idx.chunks[r].id,
                       "source": src[idx.chunks[r].path], "preview": idx.chunks[r].text[:160]}
                      for j, r in enumerate(rows.tolist())]
            self._map = {"object": "rag.map", "vector_store_id": self.id, "model": idx.meta.get("embed_model"),
                         "n_chunks": len(idx.chunks), "explained_variance_ratio": ratio.tolist(),
                         "sources": [{"path": p, "title": titles[p], "file_id": file_id(p)} for p in self.paths],
                         "points": points, "_mean": mean, "_components": comps}
        return self._map

    def project(self, vec: np.ndarray) -> dict:
        m = self.map()
        xy = (vec.astype(np.float64) - m["_mean"]) @ m["_components"].T
        return {"x": float(xy[0]), "y": float(xy[1])}


def store_id(name: str, taken: set[str]) -> str:
    base = "vs_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "index")
    sid, i = base, 2
    while sid in taken:
        sid, i = f"{base}_{i}", i + 1
    return sid


class RagState:
    """The vector stores of one server and the thread their retrieval and embedding run on. `indexes`: index
    directories (opened here, sharing one embedder per embedding model) or already open `Index` objects."""

    def __init__(self, indexes: list | None = None):
        self.stores: dict[str, VectorStore] = {}
        embedders: dict[str, Any] = {}  # embedding model name -> its Embedder, loaded once for all its indexes
        for item in indexes or []:
            if isinstance(item, Index):
                idx, owned = item, False
            else:
                st = Store(item)
                model = st.meta().get("embed_model", "")
                st.close()
                idx, owned = Index.open(item, embedders.get(model)), True
                embedders.setdefault(model, idx.embedder)  # loads the model now: a missing one fails at startup
            name = Path(os.path.abspath(idx.store.dir)).name
            sid = store_id(name, set(self.stores))
            self.stores[sid] = VectorStore(sid, name, idx, owned)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmstack-rag")

    def get(self, sid: str | None) -> VectorStore:
        """The store `sid` (404 when unknown); None picks the only store (400 when there are several or none)."""
        if sid is None:
            if len(self.stores) == 1:
                return next(iter(self.stores.values()))
            if not self.stores:
                raise APIError(400, "this server has no vector stores; start it with `lmstack serve --index DIR`",
                               param="vector_store_id")
            raise APIError(400, f"'vector_store_id' is required: one of {', '.join(self.stores)}",
                           param="vector_store_id")
        if not isinstance(sid, str) or sid not in self.stores:
            raise APIError(404, f"no vector store {str(sid)[:80]!r}; this server has "
                                f"{', '.join(self.stores) or 'none'}", param="vector_store_id", code="not_found")
        return self.stores[sid]

    async def run(self, fn: Callable, *args):
        """Run retrieval / embedding work on the rag thread; an LMStackError is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except LMStackError as e:
            raise APIError(400, str(e)) from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for s in self.stores.values():
            if s.owned:
                try:
                    s.index.close()
                except Exception:  # a SQLite handle made on another thread: the process is ending anyway
                    pass
