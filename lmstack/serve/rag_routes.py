"""The RAG routes: every `--index` as an OpenAI vector store (list / retrieve / search), answers with citations
(/v1/rag/answer, rag_answer.py), what the embeddings page draws (similarity matrix, nearest neighbours, the 2-D PCA
map of an index), and the two pages (/rag, /embeddings). Plain async functions of (state, rag, request),
registered on the app by `register`; retrieval and embedding run on the rag thread (rag_state.RagState.run)."""
from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

from ..rag.index import MODES
from .protocol import APIError, read_field
from .rag_answer import hit_json, rag_answer
from .rag_state import RagState, attributes, check_filter, file_id
from .routes import STATIC_DIR
from .state import ServerState

RANKERS = ("none", "auto", "default-2024-11-15")
MAX_TEXTS = 64  # texts in one similarity matrix


# ------------------------------------------------------------------------------------------------------- pages
async def rag_page(state: ServerState, rag: RagState, request: Request):
    return FileResponse(STATIC_DIR / "rag.html", media_type="text/html")


async def embeddings_page(state: ServerState, rag: RagState, request: Request):
    return FileResponse(STATIC_DIR / "embeddings.html", media_type="text/html")


async def rag_config(state: ServerState, rag: RagState, request: Request):
    """What the pages need first (open, like /playground/config: names only, no paths, no secrets)."""
    return {"model": state.model_name, "api_key_required": state.api_key is not None, "context_length": state.block,
            "stores": [{"id": s.id, "name": s.name, "documents": len(s.paths), "chunks": len(s.index.chunks),
                        "embed_model": s.index.meta.get("embed_model")} for s in rag.stores.values()]}


# ----------------------------------------------------------------------------------------------- vector stores
async def list_stores(state: ServerState, rag: RagState, request: Request):
    state.check_auth(request)
    q = dict(request.query_params)
    limit = _int_param(q, "limit", 1, 100) if "limit" in q else 20
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "'order' must be 'asc' or 'desc'", param="order")
    stores = sorted(rag.stores.values(), key=lambda s: (s.created_at, s.id), reverse=order == "desc")
    ids = [s.id for s in stores]
    for name in ("after", "before"):
        if name in q and q[name] not in ids:
            raise APIError(400, f"'{name}': no vector store {q[name][:80]!r}", param=name)
    if "after" in q:
        stores = stores[ids.index(q["after"]) + 1:]
    if "before" in q:
        cut = [s.id for s in stores]
        stores = stores[:cut.index(q["before"])] if q["before"] in cut else []
    page = stores[:limit]
    data = [s.as_dict() for s in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(stores) > limit}


def _int_param(q: dict, name: str, lo: int, hi: int) -> int:
    v = q[name]
    if not v.lstrip("-").isdigit() or not lo <= int(v) <= hi:
        raise APIError(400, f"'{name}' must be an integer in [{lo}, {hi}], got {v[:40]!r}", param=name)
    return int(v)


async def get_store(state: ServerState, rag: RagState, request: Request):
    state.check_auth(request)
    return rag.get(request.path_params["vector_store_id"]).as_dict()


def search_queries(body: dict) -> list[str]:
    q = body.get("query")
    if isinstance(q, str):
        q = [q]
    if not isinstance(q, list) or not q or not all(isinstance(s, str) for s in q) or not "".join(q).strip():
        raise APIError(400, "'query' must be a non-empty string or a non-empty list of strings", param="query")
    if len(q) > 16:
        raise APIError(400, "'query': at most 16 strings", param="query")
    return q


def ranking_threshold(body: dict) -> float | None:
    ro = read_field(body, "ranking_options", "dict", {})
    ranker = read_field(ro, "ranker", "str", "auto")
    if ranker not in RANKERS:
        raise APIError(400, f"'ranking_options.ranker' must be one of {', '.join(RANKERS)}", param="ranking_options")
    try:
        return read_field(ro, "score_threshold", "float", None, lo=0.0, hi=1.0)
    except APIError as e:
        raise APIError(400, "'ranking_options." + e.message.lstrip("'"), param="ranking_options") from None


async def search_store(state: ServerState, rag: RagState, request: Request):
    """OpenAI's vector-store search: dense retrieval by default (scores are cosine similarities; the `mode`
    extension picks bm25 or hybrid); `filters` over path / filename / title / headings / chunk_id."""
    body = await state.read_body(request)
    store = rag.get(request.path_params["vector_store_id"])
    queries = search_queries(body)
    k = read_field(body, "max_num_results", "int", 10, lo=1, hi=50)
    filters = body.get("filters")
    if filters is not None:
        check_filter(filters)
    threshold = ranking_threshold(body)
    read_field(body, "rewrite_query", "bool", False)  # accepted; queries are never rewritten
    mode = read_field(body, "mode", "str", "dense")
    if mode not in MODES:
        raise APIError(400, f"'mode' must be one of {', '.join(MODES)}", param="mode")
    store.touch()
    hits = await rag.run(store.search, " ".join(queries), k, mode, filters)
    data = [{"file_id": file_id(h.chunk.path), "filename": attributes(h.chunk)["filename"], "score": h.score,
             "attributes": attributes(h.chunk), "content": [{"type": "text", "text": h.chunk.text}]}
            for h in hits if threshold is None or h.score >= threshold]
    return {"object": "vector_store.search_results.page", "search_query": queries, "data": data,
            "has_more": False, "next_page": None}


# --------------------------------------------------------------------------------------------- embeddings page
async def similarity(state: ServerState, rag: RagState, request: Request):
    """The cosine-similarity matrix of `texts` under a store's embedding model (not the served LM)."""
    body = await state.read_body(request)
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise APIError(400, "'texts' must be a non-empty list of non-empty strings", param="texts")
    if len(texts) > MAX_TEXTS:
        raise APIError(400, f"'texts': at most {MAX_TEXTS}", param="texts")
    store = rag.get(read_field(body, "vector_store_id", "str"))

    def work():
        emb = store.index.embedder
        v = emb.embed(texts).astype(np.float64)
        return emb.name, (v @ v.T).tolist()

    model, matrix = await rag.run(work)
    return {"object": "rag.similarity", "vector_store_id": store.id, "model": model, "texts": texts,
            "matrix": matrix}


async def neighbours(state: ServerState, rag: RagState, request: Request):
    """The `k` chunks nearest to `query` (dense), and where the query lands on the store's map."""
    body = await state.read_body(request)
    store = rag.get(read_field(body, "vector_store_id", "str"))
    query = read_field(body, "query", "str", "")
    if not query.strip():
        raise APIError(400, "'query' must be a non-empty string", param="query")
    k = read_field(body, "k", "int", 8, lo=1, hi=50)

    def work():
        hits = store.search(query, k, "dense", None)
        return hits, store.project(store.index.embedder.embed([query])[0])

    store.touch()
    hits, point = await rag.run(work)
    return {"object": "rag.neighbours", "vector_store_id": store.id, "query": query,
            "model": store.index.meta.get("embed_model"), "query_point": point, "data": [hit_json(h) for h in hits]}


async def index_map(state: ServerState, rag: RagState, request: Request):
    """The 2-D PCA map of a store's chunk vectors (at most 5000 points), each with its source document."""
    state.check_auth(request)
    store = rag.get(request.query_params.get("vector_store_id"))
    m = await rag.run(store.map)
    return {k: v for k, v in m.items() if not k.startswith("_")}


Route = Callable[[ServerState, RagState, Request], Awaitable]
ROUTES: list[tuple[str, str, Route]] = [
    ("GET", "/rag", rag_page),
    ("GET", "/embeddings", embeddings_page),
    ("GET", "/rag/config", rag_config),
    ("GET", "/v1/vector_stores", list_stores),
    ("GET", "/v1/vector_stores/{vector_store_id}", get_store),
    ("POST", "/v1/vector_stores/{vector_store_id}/search", search_store),
    ("POST", "/v1/rag/answer", rag_answer),
    ("POST", "/v1/rag/similarity", similarity),
    ("POST", "/v1/rag/neighbours", neighbours),
    ("GET", "/v1/rag/map", index_map),
]


def _bind(state: ServerState, rag: RagState, route: Route):
    async def endpoint(request: Request):
        return await route(state, rag, request)
    endpoint.__name__ = route.__name__
    return endpoint


def register(app: FastAPI, state: ServerState, rag: RagState) -> None:
    """Add every RAG route to `app`, over `state` (the engine, auth, limits) and `rag` (the vector stores)."""
    for method, path, route in ROUTES:
        app.add_api_route(path, _bind(state, rag, route), methods=[method], include_in_schema=False)
