"""Vector search over L2-normalised float32 rows (inner product = cosine): one interface, three backends.

    Exact   one matrix product + argpartition; exact, nothing to build, N*d*4 bytes. "auto" below AUTO_EXACT_MAX rows
    HNSW    faiss IndexHNSWFlat, inner product: a graph built once (about a minute per 100k rows on 2 cores),
            sub-millisecond queries, recall@10 >= 0.95 against Exact with the defaults. "auto" from AUTO_EXACT_MAX up
    IVF     faiss IndexIVFFlat: k-means into nlist ~ 4*sqrt(N) lists, `nprobe` of them searched; trains on a
            sample and builds faster than HNSW, for very large indexes

    v = make_vectors("auto", matrix)            # (N, d) float32, rows unit length
    scores, rows = v.search(queries, k)         # (Q, d) -> (Q, k) arrays, or (d,) -> (k,); best first
    v.save(path); v = load_vectors(path)        # .npy (Exact) or .faiss (HNSW, IVF); written atomically

An index keeps its ANN structure next to its SQLite database (`cached_vectors`): IDX/vectors-<kind>-<stamp>.faiss,
where the stamp holds the store's generation (a counter bumped in the same transaction as every document write, see
store.py), the row count and the build parameters. A file whose stamp differs from the chunks being searched is
never used: the structure is rebuilt and the stale file replaced. faiss is imported only when an ANN backend is.
"""
from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..errors import LMStackError

KINDS = ("auto", "exact", "hnsw", "ivf")
AUTO_EXACT_MAX = 50_000  # exact below this many rows (~8 ms per query at 50k x 384 on one core), HNSW from here up
HNSW_M, HNSW_EF_CONSTRUCTION = 48, 64  # M=24 flattened at recall@10 0.94 on 1M clustered rows; 48: 0.961
HNSW_EF_SEARCH = 64  # at 125k rows and below; more for larger graphs (default_ef_search)
IVF_TRAIN_PER_LIST = 40  # training rows per list (faiss warns below 39)
EXACT_BLOCK = 1 << 25    # score-matrix entries per block of a batched exact search (128 MiB)


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise LMStackError("approximate vector search (hnsw, ivf) needs faiss: pip install 'lmstack[rag]' (or "
                           "pip install faiss-cpu), or use --vectors exact") from None
    return faiss


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise LMStackError(f"vector search must be one of {', '.join(KINDS)}, got {kind!r} (e.g. --vectors hnsw)")
    return kind


def resolve_kind(kind: str, n: int) -> str:
    """'auto' -> 'exact' below AUTO_EXACT_MAX rows, else 'hnsw'; other kinds unchanged."""
    check_kind(kind)
    if kind == "auto":
        return "exact" if n < AUTO_EXACT_MAX else "hnsw"
    return kind


def as_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise LMStackError(f"vectors must be an (N, dim) matrix, got shape {m.shape}")
    return m


class Vectors(ABC):
    """The common interface (Exact, HNSW, IVF implement the abstract methods). `search(queries, k)` -> (scores, rows): queries (Q, d) give (Q, k) arrays, a single
    (d,) query gives (k,) arrays; best first; k is capped at N; an ANN backend pads with row -1 / score -inf when it
    finds fewer than k rows."""
    kind = "?"
    dim = 0

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = q[None] if single else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise LMStackError(f"query vectors must have {self.dim} dimensions, got shape {np.shape(queries)}")
        k = min(int(k), len(self))
        if k < 1:
            scores, rows = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        else:
            scores, rows = self._search(q, k)
        return (scores[0], rows[0]) if single else (scores, rows)

    @abstractmethod
    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def save(self, path: str | Path) -> Path: ...


class Exact(Vectors):
    kind = "exact"

    def __init__(self, matrix: np.ndarray):
        self.matrix = as_matrix(matrix)
        self.dim = self.matrix.shape[1]

    def __len__(self) -> int:
        return len(self.matrix)

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(q) == 1:   # matrix @ vector, the same arithmetic as a plain brute-force cosine ranking
            return tuple(a[None] for a in self._top(self.matrix @ q[0], k))
        scores, rows = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        step = max(1, EXACT_BLOCK // max(1, len(self.matrix)))
        for s in range(0, len(q), step):
            block = q[s:s + step] @ self.matrix.T
            for j, row in enumerate(block):
                scores[s + j], rows[s + j] = self._top(row, k)
        return scores, rows

    @staticmethod
    def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return scores[top], top.astype(np.int64)

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()
        np.save(buf, self.matrix, allow_pickle=False)
        return write_bytes(path, buf.getbuffer())


class FaissVectors(Vectors):
    """A faiss index over inner product (HNSW or IVF); rows are the insertion order of the matrix."""

    def __init__(self, index):
        self.index, self.dim = index, index.d

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @abstractmethod
    def _params(self, k: int):
        """faiss search parameters for k results (efSearch / nprobe)."""

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(q, k, params=self._params(k))
        scores[rows < 0] = -np.inf
        return scores, rows.astype(np.int64)

    def save(self, path: str | Path) -> Path:
        return write_bytes(path, import_faiss().serialize_index(self.index))


class HNSW(FaissVectors):
    kind = "hnsw"

    def __init__(self, index, ef_search: int | None = None):
        super().__init__(index)
        self.ef_search = ef_search or default_ef_search(len(self))

    @classmethod
    def build(cls, matrix: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int | None = None) -> "HNSW":
        faiss, matrix = import_faiss(), as_matrix(matrix)
        index = faiss.IndexHNSWFlat(matrix.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(matrix)
        return cls(index, ef_search)

    def _params(self, k: int):
        return import_faiss().SearchParametersHNSW(efSearch=max(self.ef_search, k))

    @property
    def nbytes(self) -> int:
        h = self.index.hnsw
        return len(self) * self.dim * 4 + h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4


class IVF(FaissVectors):
    kind = "ivf"

    def __init__(self, index, nprobe: int | None = None):
        super().__init__(index)
        self.nprobe = nprobe or default_nprobe(index.nlist)

    @classmethod
    def build(cls, matrix: np.ndarray, nlist: int | None = None, nprobe: int | None = None, seed: int = 0) -> "IVF":
        faiss, matrix = import_faiss(), as_matrix(matrix)
        n, d = matrix.shape
        nlist = nlist or default_nlist(n)
        if n < nlist:
            raise LMStackError(f"an IVF index of {nlist} lists needs at least {nlist} vectors, got {n}; use "
                               "--vectors exact (or hnsw) for an index this small")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter, index.cp.seed, index.cp.spherical = 12, seed, True  # unit centroids: IP = cosine
        sample = min(n, IVF_TRAIN_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(matrix[rows])
        index.add(matrix)
        return cls(index, nprobe)

    def _params(self, k: int):
        return import_faiss().SearchParametersIVF(nprobe=self.nprobe)

    @property
    def nbytes(self) -> int:
        return len(self) * (self.dim * 4 + 8) + self.index.nlist * self.dim * 4


def default_ef_search(n: int) -> int:
    """Candidates kept per HNSW query: HNSW_EF_SEARCH up to 125k rows, then growing with N (512 at 1M), since a
    bigger graph needs a wider beam for the same recall (benchmarks/rag_scale.py: recall@10 0.9999 at 100k with 64;
    at 1M 0.74 with 64, 0.86 with 128)."""
    return int(min(1024, max(HNSW_EF_SEARCH, HNSW_EF_SEARCH * n / 125_000)))


def default_nlist(n: int) -> int:
    """~4*sqrt(N) lists, at most one per IVF_TRAIN_PER_LIST rows (so k-means has enough points per centroid)."""
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: ~1.6% of them, at least 16 (benchmarks/rag_scale.py, 1M clustered 384-d rows,
    nlist 4000: nprobe 64 gave recall@10 1.0 at 2.6 ms p50; 250 gave the same recall at 11.4 ms)."""
    return min(nlist, max(16, nlist // 64))


def make_vectors(kind: str, matrix: np.ndarray, **params) -> Vectors:
    """The `kind` backend ('auto', 'exact', 'hnsw', 'ivf') over `matrix` (N, d) of unit rows. params go to the
    backend's build (hnsw: m, ef_construction, ef_search; ivf: nlist, nprobe)."""
    matrix = as_matrix(matrix)
    kind = resolve_kind(kind, len(matrix))
    if kind == "exact":
        return Exact(matrix)
    if not len(matrix):
        raise LMStackError(f"an empty index can't have a {kind} structure; add documents first")
    return (HNSW if kind == "hnsw" else IVF).build(matrix, **params)


def load_vectors(path: str | Path) -> Vectors:
    """What `save` wrote: a .npy matrix (Exact) or a faiss HNSW / IVF index."""
    path = Path(path)
    if not path.is_file():
        raise LMStackError(f"no vector index at {path}")
    if path.suffix == ".npy":
        return Exact(np.load(path, allow_pickle=False))
    faiss = import_faiss()
    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexHNSWFlat):
        return HNSW(index)
    if isinstance(index, faiss.IndexIVFFlat):
        return IVF(index)
    raise LMStackError(f"{path} holds a {type(index).__name__}, not an HNSW or IVF index this package wrote")


def stamp_name(kind: str, generation: str, n: int, dim: int) -> str:
    """File name of the `kind` structure of a chunk set: its build parameters, store generation and shape."""
    params = f"M{HNSW_M}-efc{HNSW_EF_CONSTRUCTION}" if kind == "hnsw" else f"nlist{default_nlist(n)}"
    return f"vectors-{kind}-{params}-g{generation}-n{n}-d{dim}.faiss"


def cached_vectors(kind: str, matrix: np.ndarray, directory: str | Path | None, generation: str | None) -> Vectors:
    """The `kind` backend over `matrix`, kept in `directory` (an index directory) under `stamp_name`: loaded when
    that file exists and matches, else built and saved (atomically; older vectors-<kind>-*.faiss files deleted).
    directory or generation None (no place, or the chunks changed while they were read): built, not saved. A
    directory that can't be written is not an error (the structure then lives in memory only)."""
    matrix = as_matrix(matrix)
    kind = resolve_kind(kind, len(matrix))
    if kind == "exact" or directory is None or generation is None or not len(matrix):
        return make_vectors(kind, matrix)
    path = Path(directory) / stamp_name(kind, generation, *matrix.shape)
    if path.is_file():
        try:
            v = load_vectors(path)
            if v.kind == kind and len(v) == len(matrix) and v.dim == matrix.shape[1]:
                return v
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never trusted
            pass
    v = make_vectors(kind, matrix)
    try:
        v.save(path)
        for old in Path(directory).glob(f"vectors-{kind}-*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass
    return v
