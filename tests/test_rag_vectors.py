"""Vector search backends and the Qdrant store: Exact equals a numpy brute force, HNSW and IVF reach recall@10 >= 0.95
against it on clustered vectors, save/load gives identical results, an ANN file of an older chunk set is rebuilt
(never used), QdrantStore (local mode) round-trips documents / chunks / summaries, survives a write killed half-way,
searches like Exact, and an index built into it answers like the SQLite one; bad input gets one clear error."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from lmstack.errors import LMStackError
from lmstack.rag.chunking import chunk_text
from lmstack.rag.vectors import Exact, check_kind, default_ef_search, load_vectors, make_vectors, resolve_kind

faiss = pytest.importorskip("faiss")
from rag_fakes import clustered, fake_embedder, write_docs  # noqa: E402


def recall_at(rows, truth, k=10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, truth)]))


@pytest.fixture(scope="module")
def data():
    return clustered(12_000, 64, clusters=60, queries=200, seed=1)


@pytest.fixture(scope="module")
def built(data):
    x, _ = data
    return {kind: make_vectors(kind, x) for kind in ("exact", "hnsw", "ivf")}


def test_exact_equals_numpy_reference():
    r = np.random.default_rng(0)
    x = r.standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:7] + 0.3 * r.standard_normal((7, 32)).astype(np.float32)
    ref = q.astype(np.float64) @ x.T.astype(np.float64)
    scores, rows = Exact(x).search(q, 10)
    assert rows.shape == (7, 10) and rows.dtype == np.int64
    assert (rows == np.argsort(-ref, axis=1)[:, :10]).all()
    assert np.allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :10], atol=1e-5)
    s1, r1 = Exact(x).search(q[3], 600)          # one (d,) query, k above N: all N rows, best first
    assert r1.shape == (500,) and (r1 == np.argsort(-ref[3])).all() and (np.diff(s1) <= 0).all()


def test_hnsw_and_ivf_recall_against_exact(data, built):
    _, q = data
    _, truth = built["exact"].search(q, 10)
    for kind in ("hnsw", "ivf"):
        scores, rows = built[kind].search(q, 10)
        assert recall_at(rows, truth) >= 0.95, kind
        assert (np.diff(scores, axis=1) <= 1e-6).all(), kind  # best first
        x = data[0]
        assert np.allclose(scores[:, 0], np.einsum("qd,qd->q", x[rows[:, 0]], q), atol=1e-5), kind  # real IPs


def test_save_load_round_trip(tmp_path, data, built):
    _, q = data
    for kind, v in built.items():
        path = v.save(tmp_path / f"v-{kind}{'.npy' if kind == 'exact' else '.faiss'}")
        w = load_vectors(path)
        assert w.kind == kind and len(w) == len(v)
        a, b = v.search(q[:50], 10), w.search(q[:50], 10)
        assert (a[1] == b[1]).all() and np.array_equal(a[0], b[0]), kind
        assert abs(v.nbytes - path.stat().st_size) <= 0.05 * path.stat().st_size, kind
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_kinds_and_errors():
    assert resolve_kind("auto", 10) == "exact" and resolve_kind("auto", 10**6) == "hnsw"
    assert [default_ef_search(n) for n in (10, 125_000, 10**6, 10**8)] == [64, 64, 512, 1024]
    with pytest.raises(LMStackError, match="one of auto, exact, hnsw, ivf"):
        check_kind("annoy")
    with pytest.raises(LMStackError, match="needs at least"):
        make_vectors("ivf", np.eye(4, dtype=np.float32), nlist=8)
    with pytest.raises(LMStackError, match="query vectors must have 4 dimensions"):
        Exact(np.eye(4, dtype=np.float32)).search(np.ones(3), 1)


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(LMStackError, match=r"pip install 'lmstack\[rag\]'"):
        make_vectors("hnsw", np.eye(4, dtype=np.float32))


def build(tmp_path, target, n=12, version=1):
    from lmstack.rag.index import build_index
    write_docs(tmp_path / "docs", n, version)
    return build_index([str(tmp_path / "docs")], target, fake_embedder(), chunk_tokens=24, overlap=4)


def test_ann_file_is_tied_to_its_chunk_set(tmp_path):
    from lmstack.rag.index import Index
    emb = fake_embedder()
    build(tmp_path, tmp_path / "idx")
    queries = ["cats3 cats5 version", "moon1 moon2", "trains11 doc7"]

    def hits(kind):
        idx = Index.open(tmp_path / "idx", emb, vectors=kind)
        out = [[h.chunk.id for h in idx.search(q, top_k=5, mode="dense")] for q in queries]
        idx.close()
        return out
    assert hits("hnsw") == hits("exact")  # (a small graph is searched exhaustively)
    first = list((tmp_path / "idx").glob("vectors-hnsw-*.faiss"))
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns
    assert hits("hnsw") == hits("exact") and first[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    build(tmp_path, tmp_path / "idx", version=2)   # every document changes: new chunk ids and vectors
    assert hits("hnsw") == hits("exact")           # a stale file would give the old chunks' rows
    now = list((tmp_path / "idx").glob("vectors-hnsw-*.faiss"))
    assert len(now) == 1 and now != first
    now[0].write_bytes(b"damaged")                 # a corrupt cache file is rebuilt, not trusted
    assert hits("hnsw") == hits("exact") and now[0].stat().st_size > 1000


def test_qdrant_spec_errors(tmp_path):
    from lmstack.rag.index import Index
    from lmstack.rag.qdrant_store import parse_spec
    for bad, msg in [("qdrant://", "names no Qdrant host"), ("qdrant://localhost:6333", "names no collection"),
                     ("qdrant://h:notaport/c", "bad port"), ("qdrant+local://", "names no directory"),
                     ("qdrant+local:///tmp/x?collection=a/b", "collection name"),
                     ("qdrant:///abs/dir", "no Qdrant host")]:
        with pytest.raises(LMStackError, match=msg):
            parse_spec(bad)
    assert parse_spec("qdrant://db.example:7000/docs") == {
        "location": {"host": "db.example", "port": 7000, "https": False}, "collection": "docs"}
    assert parse_spec(f"qdrant+local://{tmp_path}/q") == {"location": {"path": f"{tmp_path}/q"},
                                                           "collection": "lmstack"}
    pytest.importorskip("qdrant_client")
    with pytest.raises(LMStackError, match="no index at qdrant\\+local://.*--store"):
        Index.open(f"qdrant+local://{tmp_path}/empty")


def chunked(text):
    emb = fake_embedder()
    chunks = chunk_text(text, emb.count_tokens, 24, 4)
    return chunks, emb.embed([c.text for c in chunks])


def test_qdrant_store_round_trip_and_search(tmp_path):
    pytest.importorskip("qdrant_client")
    from lmstack.rag.qdrant_store import QdrantStore
    spec = f"qdrant+local://{tmp_path}/q?collection=t1"
    docs = write_docs(tmp_path / "docs", 6)
    st = QdrantStore(spec, create=True)
    st.set_meta(dim=64, embed_model="fake-bow")
    want = {}
    for name, text in docs.items():
        chunks, vecs = chunked(text)
        st.put_document(name, name.upper(), f"sha-{name}", chunks, vecs, summaries=[(f"about {name}", ["H"])],
                        summary_vectors=vecs[:1])
        want[name] = (chunks, vecs)
    st.close()
    st = QdrantStore(spec)  # persisted
    assert st.meta()["embed_model"] == "fake-bow" and st.hashes() == {n: f"sha-{n}" for n in docs}
    assert st.documents() == [(n, n.upper(), len(want[n][0])) for n in sorted(docs)]
    got, mat = st.load_chunks(64)
    assert [(c.path, c.text, c.start, c.end, c.headings) for c in got] == [
        (n, c.text, c.start, c.end, c.headings) for n in sorted(docs) for c in want[n][0]]
    assert np.array_equal(mat, np.concatenate([want[n][1] for n in sorted(docs)]))
    assert np.array_equal(st.vectors_of([c.id for c in got[::-1]], 64), mat[::-1])
    sums, smat = st.load_summaries(64)
    assert [(s.path, s.text, s.headings) for s in sums] == [(n, f"about {n}", ["H"]) for n in sorted(docs)]
    for q in mat[:5] + 0.05:
        ref_scores, ref_rows = Exact(mat).search(q / np.linalg.norm(q), 8)
        res = st.search(q / np.linalg.norm(q), 8)
        assert [got.index(next(c for c in got if c.id == i)) for i, _ in res] == ref_rows.tolist()
        assert np.allclose([s for _, s in res], ref_scores, atol=1e-5)
    chunks, vecs = chunked("# New\n\nA replaced document about zebras and nothing else.\n")
    st.put_document("doc00.md", "NEW", "sha-new", chunks, vecs)
    assert [c.text for c in st.load_chunks(64)[0] if c.path == "doc00.md"] == [c.text for c in chunks]
    assert st.remove_document("doc01.md") and not st.remove_document("doc01.md")
    assert [p for p, _, _ in st.documents()] == ["doc00.md"] + sorted(docs)[2:]
    assert all(c.path != "doc01.md" for c in st.load_chunks(64)[0])
    st.close()


def test_qdrant_write_killed_half_way_keeps_the_old_version(tmp_path, monkeypatch):
    pytest.importorskip("qdrant_client")
    from lmstack.rag.qdrant_store import QdrantStore
    spec = f"qdrant+local://{tmp_path}/q"
    st = QdrantStore(spec, create=True)
    old, oldv = chunked("# Old\n\nThe first version talks about apples and pears, at some length, again and again.")
    st.put_document("a.md", "A", "v1", old, oldv)
    new, newv = chunked("# New\n\nThe second version is about kiwis only, and it is a different text entirely.")

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the record flip")
    real_upsert = st.client.upsert
    monkeypatch.setattr(st.client, "upsert", lambda coll, points, **k: killed() if coll.endswith("__meta") and any(
        p.payload.get("type") == "doc" for p in points) else real_upsert(coll, points, **k))
    with pytest.raises(KeyboardInterrupt):
        st.put_document("a.md", "A", "v2", new, newv)
    monkeypatch.undo()
    assert st.client.count(st.name).count == len(old) + len(new)   # the new points are there...
    assert [c.text for c in st.load_chunks(64)[0]] == [c.text for c in old]   # ...but readers see the old version
    assert {i for i, _ in st.search(newv[0], 50)} == {c.id for c in st.load_chunks(64)[0]}
    st.close()
    st = QdrantStore(spec, create=True)   # the next writer rolls the half-written version back
    assert st.client.count(st.name).count == len(old) and st.hashes() == {"a.md": "v1"}
    st.close()


def test_index_through_qdrant_answers_like_sqlite(tmp_path):
    pytest.importorskip("qdrant_client")
    from lmstack.rag.index import Index
    spec = f"qdrant+local://{tmp_path}/q?collection=docs"
    s1, s2 = build(tmp_path, tmp_path / "idx"), build(tmp_path, spec)
    assert (s2.added, s2.chunks) == (s1.added, s1.chunks) == (12, s1.chunks)
    emb = fake_embedder()
    a, b = Index.open(tmp_path / "idx", emb), Index.open(spec, emb)
    for q in ["cats3 cats5 version", "moon1 moon2", "trains11 doc7", "Section 2 glaciers4"]:
        for mode, extra in [("dense", {}), ("hybrid", {}), ("dense", {"mmr": 0.5}), ("dense", {"source": "*doc0*"})]:
            ha, hb = a.search(q, top_k=6, mode=mode, **extra), b.search(q, top_k=6, mode=mode, **extra)
            assert [(h.chunk.path, h.chunk.text) for h in ha] == [(h.chunk.path, h.chunk.text) for h in hb], \
                (q, mode, extra)
            assert np.allclose([h.score for h in ha], [h.score for h in hb], atol=1e-5)
    a.close()
    b.close()
    s3 = build(tmp_path, spec, version=2)   # incremental update in Qdrant: every document changed
    assert (s3.updated, s3.added, s3.unchanged) == (12, 0, 0)
    b = Index.open(spec, emb)
    assert all("Version 2" in c.text or "Version" not in c.text for c in b.chunks)
    assert b.store.client.count(b.store.name).count == len(b.chunks)   # the old versions' points are gone
    b.close()


def test_missing_qdrant_client_is_a_clear_error(tmp_path, monkeypatch):
    from lmstack.rag.store import open_store
    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    with pytest.raises(LMStackError, match=r"pip install 'lmstack\[rag\]'.*qdrant-client"):
        open_store(f"qdrant+local://{tmp_path}/q", create=True)


def test_cli_store_and_vectors_errors(tmp_path):
    from conftest import run_cli
    write_docs(tmp_path / "docs", 2)
    r = run_cli("index", "build", str(tmp_path / "docs"), "--no-progress")
    assert r.returncode == 2 and "give --out DIR (an index directory) or --store SPEC" in r.stderr
    r = run_cli("retrieve", "qdrant://localhost:6333", "a query")
    assert r.returncode == 2 and "names no collection" in r.stderr
    r = run_cli("retrieve", str(tmp_path), "a query", "--vectors", "annoy")
    assert r.returncode == 2 and "invalid choice: 'annoy'" in r.stderr
