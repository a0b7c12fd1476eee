"""A build SIGKILLed mid-way (a real subprocess, killed while it writes) leaves a usable index in which every
document is complete (exactly the chunks chunking gives it, old or new version, never a mix), and the next build
completes it into exactly what an uninterrupted build makes."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, sigkill_when
from lmstack.rag.chunking import chunk_text
from lmstack.rag.index import Index, build_index
from lmstack.rag.sources import iter_documents
from lmstack.rag.store import DB_NAME, Store
from rag_fakes import fake_embedder, write_docs

pytest.importorskip("bm25s")
FAKES = Path(__file__).with_name("rag_fakes.py")
WORK = 40  # extra matrix products per embedding batch (one document): a build of seconds, so a kill lands mid-way


def killed_build(src: Path, out: Path, ready) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(FAKES), "build", str(src), str(out), str(WORK)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_when(proc, ready)
    assert proc.returncode == -signal.SIGKILL, f"the build ended before the kill: {proc.stderr.read()[-500:]!r}"


def count(out: Path, sql: str = "SELECT COUNT(*) FROM documents", args=()) -> int:
    db = out / DB_NAME
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, args).fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not created yet
        return 0
    finally:
        con.close()


def expected(src: Path) -> dict[str, tuple[str, list[str]]]:
    """path -> (sha256, chunk texts) as chunking the document gives them."""
    emb = fake_embedder()
    return {d.path: (d.sha256, [c.text for c in chunk_text(d.text, emb.count_tokens, 24, 4)])
            for d in iter_documents([str(src)])}


def contents(out: Path) -> dict[str, tuple[str, list[str]]]:
    st = Store(out)
    chunks, _ = st.load_chunks(64)
    by_path: dict[str, list[str]] = {}
    for c in chunks:
        by_path.setdefault(c.path, []).append(c.text)
    got = {p: (h, by_path.get(p, [])) for p, h in st.hashes().items()}
    st.close()
    return got


def rows(out: Path):
    st = Store(out)
    chunks, mat = st.load_chunks(64)
    st.close()
    order = sorted(range(len(chunks)), key=lambda i: (chunks[i].path, chunks[i].start))
    return [(chunks[i].path, chunks[i].text, chunks[i].start, chunks[i].end) for i in order], mat[order]


@pytest.mark.parametrize("kill_after", [1, 14])
def test_killed_first_build_is_usable_and_the_next_build_completes_it(tmp_path, kill_after):
    src, out = tmp_path / "docs", tmp_path / "idx"
    write_docs(src, 30)
    want = expected(src)
    killed_build(src, out, lambda: count(out) >= kill_after)
    have = contents(out)
    assert kill_after <= len(have) < 30
    assert all(have[p] == want[p] for p in have)  # every document it has is complete
    emb = fake_embedder()
    idx = Index.open(out, emb)
    assert idx.search("cats3 cats5 version", top_k=3, mode="hybrid")
    exact = idx.search("moon1 doc0 version", top_k=5, mode="dense")
    idx.close()
    ann = Index.open(out, emb, vectors="hnsw")  # an ANN structure over what the killed build left
    got = ann.search("moon1 doc0 version", top_k=5, mode="dense")
    assert [h.chunk.id for h in got] == [h.chunk.id for h in exact]
    assert np.allclose([h.score for h in got], [h.score for h in exact], atol=1e-5)
    ann.close()
    s = build_index([str(src)], out, emb, chunk_tokens=24, overlap=4)
    assert (s.added, s.unchanged) == (30 - len(have), len(have))
    assert contents(out) == want
    build_index([str(src)], tmp_path / "ref", fake_embedder(), chunk_tokens=24, overlap=4)  # uninterrupted
    (a, va), (b, vb) = rows(out), rows(tmp_path / "ref")
    assert a == b and np.array_equal(va, vb)


def test_killed_rebuild_keeps_old_versions_searchable(tmp_path):
    src, out = tmp_path / "docs", tmp_path / "idx"
    write_docs(src, 30, version=1)
    build_index([str(src)], out, fake_embedder(), chunk_tokens=24, overlap=4)
    old = expected(src)
    write_docs(src, 30, version=2)
    new = expected(src)
    new_hashes = [h for h, _ in new.values()]
    marks = ",".join("?" * len(new_hashes))
    killed_build(src, out, lambda: count(out, f"SELECT COUNT(*) FROM documents WHERE sha256 IN ({marks})",
                                         new_hashes) >= 10)
    have = contents(out)
    assert set(have) == set(old)
    at_new = {p for p in have if have[p] == new[p]}
    at_old = {p for p in have if have[p] == old[p]}
    assert at_new | at_old == set(have) and len(at_new) >= 10 and at_old  # each whole, old or new, never a mix
    idx = Index.open(out, fake_embedder())
    for p in sorted(at_old)[:5]:
        name = Path(p).stem  # doc07 -> its text says "doc7"
        top = idx.search(f"version 1 text of doc{int(name[3:])}", top_k=1, mode="bm25")[0]
        assert top.chunk.path == p and "Version 1" in top.chunk.text
    idx.close()
    s = build_index([str(src)], out, fake_embedder(), chunk_tokens=24, overlap=4)
    assert (s.updated, s.unchanged) == (len(at_old), len(at_new))
    assert contents(out) == new
