"""The index on disk: one SQLite database (WAL) holding documents, chunks, their vectors and the index settings.

    meta(key, value)                       embed_model, dim, chunk_tokens, overlap, format, generation
    documents(id, path, title, sha256)     one row per source document (path unique)
    chunks(id, doc_id, ord, text, start, end, headings, vector)
    summaries(id, doc_id, ord, text, headings, vector)   LM-written summaries of a document and its long sections

Each document is replaced in one transaction (its old chunks deleted, the new ones and their vectors inserted), so
a build killed at any point (even SIGKILL) leaves every document either at its old or its new version — the
index stays usable — and the next build, which skips documents whose content hash is unchanged, completes it."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LMStackError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, title TEXT NOT NULL,
                                      sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id),
                                   ord INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL,
                                   end INTEGER NOT NULL, headings TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE TABLE IF NOT EXISTS summaries (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id),
                                      ord INTEGER NOT NULL, text TEXT NOT NULL, headings TEXT NOT NULL,
                                      vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS summaries_doc ON summaries(doc_id);
"""
DB_NAME = "index.sqlite"


@dataclass
class StoredChunk:
    id: int
    path: str
    title: str
    text: str
    start: int
    end: int
    headings: list[str]


@dataclass
class StoredSummary:
    id: int
    path: str          # the summarised document
    title: str
    text: str
    headings: list[str]  # [] for the whole document, else the heading path of the summarised section


class Store:
    def __init__(self, directory: str | Path, create: bool = False):
        self.dir = Path(directory)
        db = self.dir / DB_NAME
        if not db.exists() and not create:
            raise LMStackError(f"no index at {self.dir} (no {DB_NAME}); build one with `lmstack index build PATH... "
                               f"--out {self.dir}`")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(db)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    # ---- settings --------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def set_meta(self, **kv) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                [(k, str(v)) for k, v in kv.items()])

    # ---- documents -------------------------------------------------------------------------------------------
    def hashes(self) -> dict[str, str]:
        """path -> content hash of every indexed document."""
        return dict(self.db.execute("SELECT path, sha256 FROM documents"))

    def put_document(self, path: str, title: str, sha256: str, chunks, vectors: np.ndarray,
                     summaries: list[tuple[str, list[str]]] = (), summary_vectors: np.ndarray | None = None) -> None:
        """Replace one document, all its chunks and its summaries ((text, heading path) pairs, with their vectors),
        atomically (one transaction)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if summaries and (summary_vectors is None or len(summary_vectors) != len(summaries)):
            raise ValueError("put_document: one summary vector per summary")
        with self.db:
            row = self.db.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
            if row:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                self.db.execute("DELETE FROM summaries WHERE doc_id = ?", (row[0],))
                self.db.execute("UPDATE documents SET title = ?, sha256 = ? WHERE id = ?", (title, sha256, row[0]))
                doc_id = row[0]
            else:
                doc_id = self.db.execute("INSERT INTO documents(path, title, sha256) VALUES (?, ?, ?)",
                                         (path, title, sha256)).lastrowid
            self.db.executemany(
                "INSERT INTO chunks(doc_id, ord, text, start, end, headings, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(doc_id, i, c.text, c.start, c.end, json.dumps(c.headings), v.tobytes())
                 for i, (c, v) in enumerate(zip(chunks, vectors))])
            if summaries:
                sv = np.ascontiguousarray(summary_vectors, dtype=np.float32)
                self.db.executemany(
                    "INSERT INTO summaries(doc_id, ord, text, headings, vector) VALUES (?, ?, ?, ?, ?)",
                    [(doc_id, i, t, json.dumps(h), v.tobytes()) for i, ((t, h), v) in enumerate(zip(summaries, sv))])
            self._bump_generation()

    def remove_document(self, path: str) -> bool:
        with self.db:
            row = self.db.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
            if not row:
                return False
            self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
            self.db.execute("DELETE FROM summaries WHERE doc_id = ?", (row[0],))
            self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            self._bump_generation()
        return True

    def _bump_generation(self) -> None:
        """meta 'generation' + 1, inside the caller's transaction: it names the chunk set, so a file derived from
        the chunks (vectors.py's ANN structures) is known stale when it changes."""
        self.db.execute("INSERT INTO meta(key, value) VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE SET "
                        "value = CAST(value AS INTEGER) + 1")

    def documents(self) -> list[tuple[str, str, int]]:
        """(path, title, number of chunks) of every document, by path."""
        return list(self.db.execute("SELECT d.path, d.title, COUNT(c.id) FROM documents d LEFT JOIN chunks c "
                                    "ON c.doc_id = d.id GROUP BY d.id ORDER BY d.path"))

    # ---- chunks ----------------------------------------------------------------------------------------------
    def load_chunks(self, dim: int) -> tuple[list[StoredChunk], np.ndarray]:
        """Every chunk (by id) and its vectors as one (N, dim) float32 matrix."""
        rows = self.db.execute("SELECT c.id, d.path, d.title, c.text, c.start, c.end, c.headings, c.vector FROM chunks "
                               "c JOIN documents d ON d.id = c.doc_id ORDER BY c.id").fetchall()
        chunks = [StoredChunk(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]
        mat = np.frombuffer(b"".join(r[7] for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
            else np.zeros((0, dim), dtype=np.float32)
        return chunks, mat

    def load_summaries(self, dim: int) -> tuple[list[StoredSummary], np.ndarray]:
        """Every summary (by id) and its vectors as one (N, dim) float32 matrix (N = 0 for an index built without
        --summaries)."""
        rows = self.db.execute("SELECT s.id, d.path, d.title, s.text, s.headings, s.vector FROM summaries s "
                               "JOIN documents d ON d.id = s.doc_id ORDER BY s.id").fetchall()
        out = [StoredSummary(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]
        mat = np.frombuffer(b"".join(r[5] for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
            else np.zeros((0, dim), dtype=np.float32)
        return out, mat

    def close(self) -> None:
        self.db.close()


def open_store(spec: str | Path, create: bool = False):
    """The store `spec` names: a directory (this module's SQLite Store) or a Qdrant collection
    (qdrant_store.py: qdrant://HOST[:PORT]/COLLECTION, qdrant+local://DIR?collection=NAME). create=True makes it
    when missing (for a build); otherwise a missing one is an error."""
    if str(spec).startswith(("qdrant:", "qdrant+", "qdrants:")):
        from .qdrant_store import QdrantStore
        return QdrantStore(str(spec), create=create)
    return Store(spec, create=create)
