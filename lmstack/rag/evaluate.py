"""Retrieval evaluation on a BEIR-layout folder: how well an index finds the documents that answer each query.

    res = evaluate_retrieval("scifact/", mode="hybrid")      # what `lmstack eval --tasks retrieval=scifact/` runs
    res["metrics"]["ndcg@10"]["value"]

The folder (BEIR's layout, as every BEIR / MTEB retrieval set is downloaded):
    corpus.jsonl      {"_id": ..., "title": ..., "text": ...} per line (ids may be strings or integers)
    queries.jsonl     {"_id": ..., "text": ...} per line
    qrels/test.tsv    query-id <TAB> corpus-id <TAB> score, after a header line (qrels/dev.tsv is used when there
                      is no test.tsv); a 4-column TREC line (query-id 0 corpus-id score) is read too

The corpus is indexed with `build_index` (title and text as "title\\n\\ntext", through a copy of the corpus in the
index's .jsonl layout written next to the index), into `<folder>/.lmstack-index/<model>-c<tokens>-o<overlap>`
unless another directory is given; rebuilding is incremental, so a second run embeds nothing. Scoring is per
document: a document's rank is that of its best chunk (chunks are retrieved, 10 per wanted document to begin with,
and more until 10 distinct documents are found or the index is exhausted). As BEIR does, a document whose id is the
query's own id is left out of the query's ranking. Queries without a relevant document (no qrels line with
score > 0) are skipped.

Metrics, averaged over the queries (mean with its standard error, stdev / sqrt(n)):
    recall@k = |relevant in the top k| / |relevant|                     (k = 1, 5, 10; relevant = score > 0)
    mrr@10   = 1 / rank of the first relevant document in the top 10, else 0
    ndcg@10  = DCG@10 / ideal DCG@10, DCG = sum over ranks r of score(doc_r) / log2(r + 1)   (graded, as trec_eval)
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LMStackError
from .embedder import Embedder, local_embedder
from .index import DEFAULT_MODE, MODES, Index, build_index

KS = (1, 5, 10)
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
DEPTH = 10                  # documents ranked per query
CHUNKS_PER_DOC = 10         # chunks retrieved per wanted document, to begin with
INDEX_CORPUS = "corpus.jsonl"


# --- metrics on one ranking ---------------------------------------------------------------------------------------

def recall_at(ranking: list[str], qrels: dict[str, int], k: int) -> float:
    """|relevant (score > 0) among ranking[:k]| / |relevant|."""
    rel = {d for d, s in qrels.items() if s > 0}
    if not rel:
        raise ValueError("recall_at: the query has no relevant document")
    return len(rel.intersection(ranking[:k])) / len(rel)


def mrr_at(ranking: list[str], qrels: dict[str, int], k: int) -> float:
    """1 / (rank of the first relevant document within the top k), 0 when there is none."""
    for r, d in enumerate(ranking[:k], 1):
        if qrels.get(d, 0) > 0:
            return 1.0 / r
    return 0.0


def ndcg_at(ranking: list[str], qrels: dict[str, int], k: int) -> float:
    """DCG@k / ideal DCG@k with linear gains (the qrels score) and a log2(rank + 1) discount, as trec_eval."""
    dcg = sum(max(qrels.get(d, 0), 0) / math.log2(r + 1) for r, d in enumerate(ranking[:k], 1))
    ideal = sorted((s for s in qrels.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(r + 1) for r, s in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def query_metrics(ranking: list[str], qrels: dict[str, int]) -> dict[str, float]:
    """The five metrics of one query's document ranking."""
    out = {f"recall@{k}": recall_at(ranking, qrels, k) for k in KS}
    out["mrr@10"] = mrr_at(ranking, qrels, 10)
    out["ndcg@10"] = ndcg_at(ranking, qrels, 10)
    return out


# --- the BEIR folder ----------------------------------------------------------------------------------------------

@dataclass
class BeirSet:
    root: Path
    corpus: Path                               # corpus.jsonl
    queries: dict[str, str]                    # query id -> text, the queries that have a relevant document
    qrels: dict[str, dict[str, int]]           # query id -> {document id: score}
    split: str                                 # "test" or "dev"
    skipped_queries: int = 0                   # queries without a relevant document (or without qrels)
    missing_queries: list[str] = field(default_factory=list)  # qrels query ids absent from queries.jsonl


def _id_of(rec: dict, path: Path, lineno: int) -> str:
    rid = rec.get("_id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise LMStackError(f"{path}:{lineno}: expected a string or integer '_id' field (BEIR layout: "
                           '{"_id": ..., "text": ...}); add it or fix the line')
    return str(rid)


def read_queries(path: Path) -> dict[str, str]:
    from ..data.jsonl import read_jsonl
    out: dict[str, str] = {}
    for lineno, rec in read_jsonl(path):
        qid = _id_of(rec, path, lineno)
        if not isinstance(rec.get("text"), str):
            raise LMStackError(f"{path}:{lineno}: query {qid!r} has no string 'text' field; add it or fix the line")
        out[qid] = rec["text"]
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {document id: score} from a BEIR qrels .tsv (header optional) or a TREC qrels file."""
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) == 4:                  # TREC: query-id iteration corpus-id score
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                raise LMStackError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, "
                                   f"score), got {len(cols)}; fix the line")
            qid, did, score = (c.strip() for c in cols)
            try:
                value = int(float(score))
            except ValueError:
                if lineno == 1:                 # the header: query-id corpus-id score
                    continue
                raise LMStackError(f"{path}:{lineno}: score {score!r} is not a number; the third column must be "
                                   "an integer relevance score") from None
            out.setdefault(qid, {})[did] = value
    return out


def beir_files(root: str | Path) -> tuple[Path, str]:
    """(qrels file, split) of a BEIR folder, after checking its files are there (a clear error for what is not)."""
    root = Path(root)
    if not root.is_dir():
        raise LMStackError(f"retrieval set {root} is not a folder; pass a BEIR-layout folder (corpus.jsonl, "
                           "queries.jsonl, qrels/test.tsv), e.g. --tasks retrieval=benchmarks/pydocs_qa")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
            raise LMStackError(f"{root}: no {name}; a BEIR-layout folder holds corpus.jsonl, queries.jsonl and "
                               "qrels/test.tsv (download the set again or point at the folder that has them)")
    split = next((s for s in ("test", "dev") if (root / "qrels" / f"{s}.tsv").is_file()), None)
    if split is None:
        raise LMStackError(f"{root}: no qrels/test.tsv (or qrels/dev.tsv); add the relevance judgements as "
                           "qrels/test.tsv with lines: query-id <TAB> corpus-id <TAB> score")
    return root / "qrels" / f"{split}.tsv", split


def load_beir(root: str | Path) -> BeirSet:
    """The queries and qrels of a BEIR folder (the corpus is streamed later); clear errors for what is missing."""
    root = Path(root)
    qrels_file, split = beir_files(root)
    queries = read_queries(root / "queries.jsonl")
    qrels = read_qrels(qrels_file)
    missing = sorted(q for q in qrels if q not in queries)
    keep = {q: t for q, t in queries.items() if any(s > 0 for s in qrels.get(q, {}).values())}
    if not keep:
        raise LMStackError(f"{root}: no query of queries.jsonl has a relevant document in qrels/{split}.tsv (score "
                           "> 0); check that the qrels' query ids match the queries' _id")
    return BeirSet(root, root / "corpus.jsonl", keep, qrels, split, len(queries) - len(keep), missing)


def iter_corpus(path: Path) -> Iterator[tuple[str, str, str]]:
    """(id, title, text) of every corpus line, streamed; ids must be unique."""
    from ..data.jsonl import read_jsonl
    seen: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        did = _id_of(rec, path, lineno)
        title, text = rec.get("title") or "", rec.get("text")
        if not isinstance(text, str) or not isinstance(title, str):
            raise LMStackError(f"{path}:{lineno}: document {did!r} needs a string 'text' (and an optional string "
                               "'title'); fix the line")
        if did in seen:
            raise LMStackError(f"{path}:{lineno}: duplicate _id {did!r} (first on line {seen[did]}); document ids "
                               "must be unique")
        seen[did] = lineno
        yield did, title, text


def write_index_corpus(src: Path, dest: Path) -> int:
    """Copy the BEIR corpus into the index's .jsonl layout ({"id", "title", "text": "title\\n\\ntext"}), streamed
    and written atomically; returns the number of documents."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for did, title, text in iter_corpus(src):
            body = f"{title}\n\n{text}" if title.strip() else text
            f.write(json.dumps({"id": did, "title": title or did, "text": body}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, dest)
    if not n:
        raise LMStackError(f"{src}: the corpus has no documents; add one JSON object per line "
                           '({"_id": ..., "title": ..., "text": ...})')
    return n


def default_index_dir(root: Path, embed_name: str, chunk_tokens: int, overlap: int) -> Path:
    """<root>/.lmstack-index/<model>-c<tokens>-o<overlap> (with a .gitignore of "*": a cache, never committed);
    ~/.cache/lmstack/retrieval/<folder>-<hash>/... when the data folder is read-only."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", embed_name).strip("_") or "model"
    name = f"{slug}-c{chunk_tokens}-o{overlap}"
    try:
        base = root / ".lmstack-index"
        base.mkdir(exist_ok=True)
        (base / ".gitignore").write_text("*\n")
    except OSError:
        import hashlib
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstack" / "retrieval" / \
            f"{root.resolve().name}-{key}"
    return base / name


# --- running ------------------------------------------------------------------------------------------------------

def rank_documents(idx: Index, query: str, mode: str, prefix: str, depth: int = DEPTH,
                   exclude: str | None = None) -> list[str]:
    """The ids of the `depth` best documents for `query` (each at its best chunk's rank); chunk paths are
    `<prefix><id>`. Retrieves more chunks until `depth` distinct documents are found or the index is exhausted."""
    k = depth * CHUNKS_PER_DOC
    while True:
        hits = idx.search(query, top_k=k, mode=mode)
        ranking: list[str] = []
        for h in hits:
            did = h.chunk.path[len(prefix):] if h.chunk.path.startswith(prefix) else h.chunk.path
            if did != exclude and did not in ranking:
                ranking.append(did)
        if len(ranking) >= depth or len(hits) < k or k >= len(idx.chunks):
            return ranking[:depth]
        k *= 2


def _aggregate(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return {"value": mean, "stderr": se, "n": n}


def evaluate_retrieval(root: str | Path, embedder: Embedder | None = None, mode: str | None = None,
                       index_dir: str | Path | None = None, chunk_tokens: int = 256, overlap: int = 32,
                       limit: int | None = None, log_samples: bool = False,
                       progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Index the corpus of the BEIR folder `root` (or reuse the index) and score every query with qrels:
    {'metrics': {name: {'value', 'stderr', 'n'}}, 'config': {...}, 'seconds', 'samples' (with log_samples)}.
    progress(stage, done, total) with stage "index" (documents) or "queries"."""
    t0 = time.time()
    mode = mode or DEFAULT_MODE
    if mode not in MODES:
        raise LMStackError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
    data = load_beir(root)
    embedder = embedder or local_embedder()
    out = Path(index_dir) if index_dir else default_index_dir(data.root, embedder.name, chunk_tokens, overlap)
    corpus_copy = out / INDEX_CORPUS
    n_docs = write_index_corpus(data.corpus, corpus_copy)
    stats = build_index([str(corpus_copy)], out, embedder, chunk_tokens, overlap,
                        (lambda d, c: progress("index", d, n_docs)) if progress else None)
    qids = list(data.queries)[:limit] if limit else list(data.queries)
    idx = Index.open(out, embedder)
    try:
        idx.embedder.embed([data.queries[q] for q in qids])  # one batched pass; searches then hit the cache
        prefix = f"{corpus_copy}:"
        per: dict[str, list[float]] = {m: [] for m in METRICS}
        samples = []
        for i, qid in enumerate(qids):
            ranking = rank_documents(idx, data.queries[qid], mode, prefix, exclude=qid)
            m = query_metrics(ranking, data.qrels[qid])
            for k, v in m.items():
                per[k].append(v)
            if log_samples:
                samples.append({"query_id": qid, "query": data.queries[qid], "ranking": ranking,
                                "relevant": data.qrels[qid], **m})
            if progress:
                progress("queries", i + 1, len(qids))
        n_chunks = len(idx.chunks)
    finally:
        idx.close()
    config = {"kind": "retrieval", "source": str(data.root), "split": data.split, "embed_model": embedder.name,
              "mode": mode, "chunk_tokens": chunk_tokens, "overlap": overlap, "index": str(out), "limit": limit,
              "documents": n_docs, "chunks": n_chunks, "queries": len(qids),
              "skipped_queries": data.skipped_queries, "qrels_without_query": len(data.missing_queries),
              "embedded_chunks": stats.chunks,
              "index_seconds": round(stats.seconds, 3)}
    res = {"metrics": {k: _aggregate(v) for k, v in per.items()}, "config": config,
           "seconds": round(time.time() - t0, 3)}
    if log_samples:
        res["samples"] = samples
    return res


def task_name(root: str | Path) -> str:
    """The results key of a retrieval set: retrieval_<folder name>."""
    return "retrieval_" + (Path(root).resolve().name or "set")


def parse_retrieval_spec(spec: str) -> str | None:
    """The folder of a `retrieval=DIR` task spec; None for any other task; an error for `retrieval` alone."""
    name, _, path = spec.partition("=")
    if name.strip() != "retrieval":
        return None
    if not path.strip():
        raise LMStackError("the retrieval task needs a BEIR-layout folder: --tasks retrieval=DIR (DIR holding "
                           "corpus.jsonl, queries.jsonl and qrels/test.tsv)")
    return path.strip()
