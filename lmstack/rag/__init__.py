"""Indexing and querying your own documents (RAG): sources.py (files, folders, globs, .jsonl, pydocs -> documents),
chunking.py (token-aware, structure-following chunks with offsets and heading paths), embedder.py (any model lmstack
loads, or a /v1/embeddings endpoint), store.py (SQLite, one transaction per document), qdrant_store.py (the same
store in a Qdrant collection), vectors.py (exact / faiss HNSW / IVF vector search), index.py (build, dense /
BM25 / hybrid retrieval), answer.py (compact response synthesis with checked citations), evaluate.py (recall@k,
MRR and nDCG of an index on a BEIR-layout retrieval set). Above lm and generate; only the CLI and the server use it."""
