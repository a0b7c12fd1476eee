"""A Qdrant collection as the index store: the methods of store.Store (meta, hashes, put_document, remove_document,
documents, load_chunks, load_summaries, close) plus `search(vector, k)`, which runs on Qdrant (its own HNSW on a
server), so an index that outgrows one machine is searched where it lives.

Spec (`lmstack index build ... --store SPEC`, `lmstack retrieve SPEC ...`, `open_store(SPEC)`):

    qdrant://HOST[:PORT]/COLLECTION      a Qdrant server over HTTP (port 6333 by default); qdrants:// for HTTPS;
                                         the API key, if any, from $QDRANT_API_KEY
    qdrant+local://DIR[?collection=NAME] qdrant-client's local mode, persisted in DIR (three slashes for an absolute
                                         path: qdrant+local:///data/idx); collection "lmstack" by default

Layout: collection NAME holds one point per chunk (the chunk vector; payload path, sha256, ord, text, start, end,
headings), NAME__summaries one per summary, NAME__meta (no vectors) the settings point, one record per document
(path, title, sha256, chunk and summary counts) and write intents.

What "atomic" means here: Qdrant has no multi-point transactions, but a single point upsert is atomic, and a
document's record is one point. put_document (1) writes an intent point, (2) upserts the new chunk and summary
points, whose ids are derived from (path, sha256, ord), (3) flips the document record to the new sha256 (the commit
point), (4) deletes the document's points of any other sha256, (5) bumps the generation and drops the intent.
Readers only see points whose sha256 equals their document's record, so a write killed anywhere leaves each document
at its old version or its new one; the next writer (any store opened with create=True) finishes or rolls back what
an intent left behind. remove_document deletes the record first (the document vanishes at once), then its points.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import LMStackError
from .store import StoredChunk, StoredSummary

DEFAULT_COLLECTION = "lmstack"
SPEC_HELP = ("qdrant://HOST[:PORT]/COLLECTION (a server) or qdrant+local://DIR?collection=NAME (local mode, three "
             "slashes for an absolute DIR)")
BATCH = 512
META_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "lmstack:meta"))


def parse_spec(spec: str) -> dict:
    """A Qdrant spec -> {"location": {"path": DIR} or {"host", "port", "https"}, "collection": NAME}."""
    u = urlsplit(spec)
    if u.scheme == "qdrant+local":
        path = (u.netloc + u.path) if u.netloc else u.path
        name = parse_qs(u.query).get("collection", [DEFAULT_COLLECTION])[0]
        if not path:
            raise LMStackError(f"{spec!r} names no directory; write {SPEC_HELP}")
        return {"location": {"path": path}, "collection": check_name(name, spec)}
    if u.scheme in ("qdrant", "qdrants"):
        if not u.hostname:
            raise LMStackError(f"{spec!r} names no Qdrant host; write {SPEC_HELP}")
        name = u.path.strip("/")
        if not name or "/" in name:
            raise LMStackError(f"{spec!r} names no collection (qdrant://HOST:PORT/COLLECTION); write {SPEC_HELP}")
        try:
            port = u.port or 6333
        except ValueError:
            raise LMStackError(f"{spec!r} has a bad port; write {SPEC_HELP}") from None
        return {"location": {"host": u.hostname, "port": port, "https": u.scheme == "qdrants"},
                "collection": check_name(name, spec)}
    raise LMStackError(f"{spec!r} is not a Qdrant store; write {SPEC_HELP}")


def check_name(name: str, spec: str) -> str:
    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise LMStackError(f"collection name {name!r} in {spec!r}: use letters, digits, '-' and '_'")
    return name


def point_id(*parts) -> int:
    """A stable 63-bit id for a chunk or summary point, from its document path, content hash and position."""
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


def uid(kind: str, path: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lmstack:{kind}:{path}"))


class QdrantStore:
    """store.Store's interface over a Qdrant collection (see the module docstring for the spec and the layout)."""

    def __init__(self, spec: str, create: bool = False):
        parsed = parse_spec(spec)  # a malformed spec fails before the (slow) import
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            raise LMStackError("a Qdrant store needs qdrant-client: pip install 'lmstack[rag]' (or pip install "
                               "qdrant-client)") from None
        self.spec, self.m, self._records_cache = spec, models, None
        self.dir = spec  # how messages name this store (Store.dir is its directory)
        self.name, self.local = parsed["collection"], "path" in parsed["location"]
        loc = parsed["location"]
        try:
            self.client = QdrantClient(path=loc["path"]) if self.local else QdrantClient(
                host=loc["host"], port=loc["port"], https=loc["https"], api_key=os.environ.get("QDRANT_API_KEY"))
            exists = self.client.collection_exists(self._meta_coll)
        except LMStackError:
            raise
        except Exception as e:  # noqa: BLE001 - connection refused, locked local dir, ...: one clear line
            raise LMStackError(f"can't open the Qdrant store {spec}: {str(e).splitlines()[0][:200]}") from None
        if not exists:
            if not create:
                self.client.close()
                raise LMStackError(f"no index at {spec}; build one with `lmstack index build PATH... --store {spec}`")
            self.client.create_collection(self._meta_coll, vectors_config={})
        if create:
            self.recover()

    # ---- collections -----------------------------------------------------------------------------------------
    @property
    def _meta_coll(self) -> str:
        return f"{self.name}__meta"

    @property
    def _summary_coll(self) -> str:
        return f"{self.name}__summaries"

    def _ensure(self, collection: str, dim: int) -> None:
        if not self.client.collection_exists(collection):
            m = self.m
            self.client.create_collection(collection, vectors_config=m.VectorParams(size=dim, distance=m.Distance.DOT))
            if not self.local:  # (local mode has no payload indexes)
                for key in ("path", "sha256"):
                    self.client.create_payload_index(collection, key, m.PayloadSchemaType.KEYWORD)

    def _scroll(self, collection: str, flt=None, vectors: bool = False, payload=True):
        if not self.client.collection_exists(collection):
            return
        offset = None
        while True:
            recs, offset = self.client.scroll(collection, scroll_filter=flt, limit=BATCH, offset=offset,
                                              with_payload=payload, with_vectors=vectors)
            yield from recs
            if offset is None:
                return

    def _match(self, key: str, value: str):
        return self.m.FieldCondition(key=key, match=self.m.MatchValue(value=value))

    def _upsert(self, collection: str, points: list) -> None:
        for i in range(0, len(points), BATCH):
            self.client.upsert(collection, points=points[i:i + BATCH], wait=True)

    def _delete_where(self, path: str, keep_sha: str | None) -> None:
        """Delete the chunk and summary points of `path` (all, or all but those of sha256 `keep_sha`)."""
        m = self.m
        flt = m.Filter(must=[self._match("path", path)],
                       must_not=[self._match("sha256", keep_sha)] if keep_sha else None)
        for coll in (self.name, self._summary_coll):
            if self.client.collection_exists(coll):
                self.client.delete(coll, points_selector=m.FilterSelector(filter=flt), wait=True)

    # ---- settings --------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        got = self.client.retrieve(self._meta_coll, [META_ID], with_payload=True)
        return {k: str(v) for k, v in (got[0].payload if got else {}).items()}

    def set_meta(self, **kv) -> None:
        payload = {**self.meta(), **{k: str(v) for k, v in kv.items()}}
        self.client.upsert(self._meta_coll, [self.m.PointStruct(id=META_ID, vector={}, payload=payload)], wait=True)

    def _bump_generation(self) -> None:
        self.set_meta(generation=int(self.meta().get("generation", 0)) + 1)

    # ---- documents -------------------------------------------------------------------------------------------
    def _records(self) -> dict[str, dict]:
        """path -> document record, cached per generation (one point read when nothing changed)."""
        gen = self.meta().get("generation", "0")
        if self._records_cache is None or self._records_cache[0] != gen:
            recs = {r.payload["path"]: r.payload for r in self._scroll(self._meta_coll, self.m.Filter(
                must=[self._match("type", "doc")]))}
            self._records_cache = (gen, recs)
        return self._records_cache[1]

    def hashes(self) -> dict[str, str]:
        return {p: r["sha256"] for p, r in self._records().items()}

    def put_document(self, path: str, title: str, sha256: str, chunks, vectors: np.ndarray,
                     summaries: list[tuple[str, list[str]]] = (), summary_vectors: np.ndarray | None = None) -> None:
        """Replace one document, its chunks and its summaries; see the module docstring for what is atomic."""
        m = self.m
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if summaries and (summary_vectors is None or len(summary_vectors) != len(summaries)):
            raise ValueError("put_document: one summary vector per summary")
        if len(vectors) != len(chunks):
            raise ValueError("put_document: one vector per chunk")
        self._intent(path)
        if len(chunks):
            self._ensure(self.name, vectors.shape[1])
            self._upsert(self.name, [m.PointStruct(
                id=point_id(path, sha256, i), vector=v.tolist(),
                payload={"path": path, "sha256": sha256, "ord": i, "text": c.text, "start": c.start, "end": c.end,
                         "headings": json.dumps(c.headings)}) for i, (c, v) in enumerate(zip(chunks, vectors))])
        if summaries:
            sv = np.ascontiguousarray(summary_vectors, dtype=np.float32)
            self._ensure(self._summary_coll, sv.shape[1])
            self._upsert(self._summary_coll, [m.PointStruct(
                id=point_id(path, sha256, "s", i), vector=v.tolist(),
                payload={"path": path, "sha256": sha256, "ord": i, "text": t, "headings": json.dumps(h)})
                for i, ((t, h), v) in enumerate(zip(summaries, sv))])
        record = {"type": "doc", "path": path, "title": title, "sha256": sha256, "chunks": len(chunks),
                  "summaries": len(summaries)}
        self.client.upsert(self._meta_coll, [m.PointStruct(id=uid("doc", path), vector={}, payload=record)],
                           wait=True)   # the commit point
        self._delete_where(path, keep_sha=sha256)
        self._bump_generation()
        self._done(path)

    def remove_document(self, path: str) -> bool:
        if path not in self._records():
            return False
        self._intent(path)
        self.client.delete(self._meta_coll, points_selector=self.m.PointIdsList(points=[uid("doc", path)]),
                           wait=True)
        self._delete_where(path, keep_sha=None)
        self._bump_generation()
        self._done(path)
        return True

    def _intent(self, path: str) -> None:
        self.client.upsert(self._meta_coll, [self.m.PointStruct(id=uid("intent", path), vector={},
                                                                 payload={"type": "intent", "path": path})], wait=True)

    def _done(self, path: str) -> None:
        self.client.delete(self._meta_coll, points_selector=self.m.PointIdsList(points=[uid("intent", path)]),
                           wait=True)

    def recover(self) -> list[str]:
        """Finish the writes a killed writer left: for each intent, drop the points that are not the document's
        committed version (all of them when it has no record). Returns the paths repaired."""
        paths = [r.payload["path"] for r in self._scroll(self._meta_coll, self.m.Filter(
            must=[self._match("type", "intent")]))]
        for path in paths:
            rec = self.client.retrieve(self._meta_coll, [uid("doc", path)], with_payload=True)
            self._delete_where(path, keep_sha=rec[0].payload["sha256"] if rec else None)
            self._done(path)
        return paths

    def documents(self) -> list[tuple[str, str, int]]:
        return [(p, r["title"], int(r["chunks"])) for p, r in sorted(self._records().items())]

    # ---- chunks ----------------------------------------------------------------------------------------------
    def _live(self, collection: str, vectors: bool):
        """The committed points of `collection` (those whose sha256 is their document's), by (path, ord)."""
        recs = self._records()
        live = [p for p in self._scroll(collection, vectors=vectors)
                if recs.get(p.payload["path"], {}).get("sha256") == p.payload["sha256"]]
        return sorted(live, key=lambda p: (p.payload["path"], p.payload["ord"])), recs

    @staticmethod
    def _matrix(points, dim: int) -> np.ndarray:
        if not points:
            return np.zeros((0, dim), dtype=np.float32)
        return np.asarray([p.vector for p in points], dtype=np.float32).reshape(len(points), dim)

    def load_chunks(self, dim: int, with_vectors: bool = True) -> tuple[list[StoredChunk], np.ndarray | None]:
        """Every committed chunk (by path, then position) and, with_vectors, its vectors as one (N, dim) matrix."""
        points, recs = self._live(self.name, with_vectors)
        chunks = [StoredChunk(int(p.id), p.payload["path"], recs[p.payload["path"]]["title"], p.payload["text"],
                              int(p.payload["start"]), int(p.payload["end"]), json.loads(p.payload["headings"]))
                  for p in points]
        return chunks, self._matrix(points, dim) if with_vectors else None

    def vectors_of(self, ids: list[int], dim: int) -> np.ndarray:
        """The vectors of the chunks `ids`, in that order (zeros for a chunk no longer in the store)."""
        out = np.zeros((len(ids), dim), dtype=np.float32)
        where = {int(i): r for r, i in enumerate(ids)}
        for s in range(0, len(ids), BATCH):
            if not self.client.collection_exists(self.name):
                break
            for p in self.client.retrieve(self.name, list(ids[s:s + BATCH]), with_vectors=True):
                out[where[int(p.id)]] = p.vector
        return out

    def load_summaries(self, dim: int) -> tuple[list[StoredSummary], np.ndarray]:
        points, recs = self._live(self._summary_coll, True)
        out = [StoredSummary(int(p.id), p.payload["path"], recs[p.payload["path"]]["title"], p.payload["text"],
                             json.loads(p.payload["headings"])) for p in points]
        return out, self._matrix(points, dim)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """[(chunk id, score)] of the k committed chunks nearest `vector` (inner product), searched by Qdrant."""
        if not self.client.collection_exists(self.name) or k < 1:
            return []
        recs, q, limit = self._records(), np.asarray(vector, dtype=np.float32).tolist(), k + 16
        while True:
            pts = self.client.query_points(self.name, query=q, limit=limit, with_payload=["path", "sha256"]).points
            live = [(int(p.id), float(p.score)) for p in pts
                    if recs.get(p.payload["path"], {}).get("sha256") == p.payload["sha256"]]
            if len(live) >= k or len(pts) < limit:   # enough, or the collection has no more
                return live[:k]
            limit *= 4

    def close(self) -> None:
        self.client.close()
