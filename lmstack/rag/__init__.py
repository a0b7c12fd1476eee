"""Indexing and querying your own documents (RAG): sources.py (files, folders, globs, .jsonl, pdf, html, pydocs ->
documents), chunking.py (token-aware, structure-following chunks with offsets and heading paths), embedder.py (any
model lmstack loads, or a /v1/embeddings endpoint), summaries.py (LM summaries of documents and long sections),
store.py (SQLite, one transaction per document), qdrant_store.py (the same store in a Qdrant collection), vectors.py
(exact / faiss HNSW / IVF vector search), index.py (build, dense / BM25 / hybrid / summary retrieval), retrieval.py
(source filters, MMR, summary routing), rerank.py (cross-encoder or LM re-ranking), answer.py (compact / refine /
tree_summarize synthesis with checked citations), chat.py (an OpenAI-compatible chat endpoint as the writer),
evaluate.py (recall@k, MRR and nDCG of an index on a BEIR-layout retrieval set). Above lm and generate; only the CLI
and the server use it (docs/rag.md)."""
