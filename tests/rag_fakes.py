"""Test helpers for the RAG index: a deterministic fake embedder (hashed bag of words, no model to load), clustered
unit vectors like sentence embeddings, and a small document folder. Imported by tests and by the build subprocess of
test_rag_kill.py (python tests/rag_fakes.py build SRC OUT)."""
from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

import numpy as np

DIM = 64
WORD = re.compile(r"\w+")


def fake_embedder(work: int = 0):
    """Embedder 'fake-bow': signed, weighted token counts hashed into DIM buckets (crc32), L2-normalised by Embedder.
    `work` > 0 adds that many extra (result-neutral) matrix products per batch, so a build takes a while (kills)."""
    from lmstack.rag.embedder import Embedder

    def encode(texts):
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in WORD.findall(t.lower()):
                h = zlib.crc32(w.encode())
                out[i, h % DIM] += (1.0 if h & 1 << 20 else -1.0) * (0.5 + (h >> 21) / 2 ** 11)  # signed weight
        out[:, 0] += 1e-3  # never an all-zero row
        burn = np.ones((256, 256), dtype=np.float32)
        for _ in range(work):
            burn = burn @ burn * np.float32(1 / 256)
        return out

    return Embedder("fake-bow", encode, lambda s: len(WORD.findall(s)), DIM)


def clustered(n: int, dim: int, clusters: int = 100, sub: int = 12, seed: int = 0, queries: int = 0):
    """(n, dim) unit rows: points near `clusters` random centres, spread in a per-cluster `sub`-dim subspace plus a
    little isotropic noise (low intrinsic dimension, as sentence embeddings have); and `queries` perturbed held-out
    points of the same mixture."""
    r = np.random.default_rng(seed)
    centres = r.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = r.standard_normal((clusters, sub, dim)).astype(np.float32) / np.sqrt(dim)
    lab = r.integers(0, clusters, n + queries)
    spread = np.einsum("ns,nsd->nd", 0.6 * r.standard_normal((len(lab), sub)).astype(np.float32), basis[lab])
    x = centres[lab] + spread + 0.15 / np.sqrt(dim) * r.standard_normal((len(lab), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[n:] + 0.1 / np.sqrt(dim) * r.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return (x[:n], q) if queries else x[:n]


TOPICS = "cats moon python rivers volcanoes music chess bread trains glaciers".split()


def write_docs(folder: Path, n: int = 30, version: int = 1) -> dict[str, str]:
    """n markdown documents with a few sections each; `version` changes every one of them (and says so)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        parts = [f"# Document {i} about {topic}\n"]
        for s in range(3):
            words = " ".join(f"{topic}{(i * 7 + s * 3 + j) % 23}" for j in range(40))
            parts.append(f"## Section {s}\n\nVersion {version} text of doc{i}: {words}.\n")
        text = "\n".join(parts)
        (folder / f"doc{i:02d}.md").write_text(text)
        docs[f"doc{i:02d}.md"] = text
    return docs


def main(argv: list[str]) -> None:
    """build SRC OUT [WORK]: build_index with the fake embedder (the subprocess a kill test SIGKILLs)."""
    from lmstack.rag.index import build_index
    _, src, out, *rest = argv
    build_index([src], out, fake_embedder(int(rest[0]) if rest else 0), chunk_tokens=24, overlap=4)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
