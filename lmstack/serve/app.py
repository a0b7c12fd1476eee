"""OpenAI-compatible HTTP API over an `LM`: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/health and /metrics (Prometheus text), plus a web playground at / (static files in serve/static/).

Generation is continuous batching by the engine (lmstack.generate.BackgroundBatcher on a thread, or
generate/engine_process.ProcessBatcher in a process of its own, the CPU default of `serve`): every choice of every
request is submitted to one decode loop, joins the running batch as soon as a row is free (up to
--max-batch rows) and leaves it the step it ends. The server only parses, schedules and streams: a request's tokens
arrive on a blocking stream that a small thread pool turns into text pieces and SSE chunks. A client that
disconnects (even before its stream starts) cancels its generations at once, freeing their rows. Other model work
(echo scoring, embeddings, beam search) runs on the engine thread between decode steps (the process engine: on one
thread of the server process, over the same shared weights). With a drafter (`--draft-model ngram|PATH`) the engine runs speculative rounds
while exactly one generation is decoding (generate/batching.py) and plain batched steps otherwise; the tokens are
the same (greedy) or identically distributed (sampled), and /metrics counts the drafts. Every bad request gets an OpenAI-style error JSON
({"error": {message, type, param, code}}) with a 4xx status; never a 500.

The pieces: protocol.py (request parsing, APIError), state.py (ServerState: engine, thread pool, admission,
limits), choices.py (the one choice driver both completion routes share), completions.py / chat.py (their parsing
and shaping), responses.py (logprob blocks, embeddings, SSE), routes.py (the other routes, registration),
metrics.py (Prometheus + the ASGI middleware), rag_state.py / rag_routes.py / rag_answer.py (each `--index` as an
OpenAI vector store, /v1/rag/answer over the same engine, the /rag and /embeddings pages). This module builds the
app and runs it.
"""
from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from .choices import generate_pieces
from .metrics import Metrics, Observe
from .protocol import APIError, error_response
from .rag_routes import register as register_rag
from .rag_state import RagState
from .responses import GuardedStream
from .routes import STATIC_DIR, register
from .state import ServerState, load_drafter

__all__ = ["create_app", "serve", "default_model_name", "APIError", "error_response", "generate_pieces",
           "GuardedStream", "Metrics", "ServerState", "STATIC_DIR"]


def create_app(lm, model_name: str, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = 4 * 1024 * 1024, max_n: int = 16, indexes: list | None = None,
               prefix_cache_mb: float | None = 256, draft=None, num_speculative: int = 4,
               engine: str = "thread") -> FastAPI:
    """The FastAPI app serving `lm` under the name `model_name`. api_key: required as `Authorization: Bearer KEY`
    on every /v1 route. max_batch + max_queue: requests admitted at once (more get 429); max_batch also caps the
    choices (prompts x n) of one request. max_body_bytes: larger bodies get 413. indexes: RAG index directories (or
    open `lmstack.rag.Index`es), each served as a vector store (/v1/vector_stores, /v1/rag/*, the /rag page).
    prefix_cache_mb: budget of the prefix cache that reuses prompt-prefix keys/values across requests (None/0: off;
    always off for sliding-window and stateful models); its counters are in /metrics. draft: speculative decoding
    while one generation decodes alone — a Drafter (NgramDrafter(): prompt lookup) or a draft model with `lm`'s
    tokenizer (`lm.speculative_drafter(other_lm)`), `num_speculative` drafts per round; counters in /metrics.
    engine: where the decode loop runs — "thread" (a thread of this process) or "process" (a spawned process reading
    the same shared-memory weights, so the HTTP side never holds its GIL: generate/engine_process.py; CPU models)."""
    state = ServerState(lm, model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                        max_body_bytes=max_body_bytes, max_n=max_n, prefix_cache_mb=prefix_cache_mb, draft=draft,
                        num_speculative=num_speculative, engine=engine)
    rag = RagState(indexes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()
        rag.close()

    app = FastAPI(title="lmstack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None,
                              "not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug, not a bad request: say so without a traceback
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    app.add_middleware(Observe, metrics=state.metrics)
    register(app, state)
    register_rag(app, state, rag)
    app.state.server, app.state.rag = state, rag
    app.state.lm, app.state.model_name, app.state.metrics = lm, model_name, state.metrics
    return app


def default_model_name(model: str | os.PathLike) -> str:
    """The id a server of `model` (a checkpoint dir, Hugging Face dir or GGUF file) goes by when no name is given:
    the file or directory name, never the full path (that would show the server's filesystem to every client).
    A training run's `last` / `best` checkpoint is named with its run: runs/sft/last -> 'sft/last'."""
    p = Path(os.path.abspath(os.fspath(model)))
    if p.name in ("last", "best") and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(model)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          model_name: str | None = None, threads: int = 0, indexes: list[str] | None = None,
          prefix_cache_mb: float | None = 256, draft_model: str | None = None, num_speculative: int = 4,
          ngram_max: int = 3, ngram_min: int = 2, engine: str | None = None, **load_kw) -> None:
    """Load `model` and serve it with uvicorn until interrupted (`lmstack serve`). threads > 0: torch CPU threads.
    model_name: the id clients pass as `model` (default: `default_model_name(model)`). indexes: RAG index
    directories served as vector stores (`--index`). prefix_cache_mb: prefix-cache budget in MiB (None: off).
    draft_model: speculative decoding while one generation decodes alone: 'ngram' (prompt lookup, n-grams of
    ngram_max down to ngram_min tokens) or a draft model path with the same tokenizer (loaded with `load_kw`);
    num_speculative: drafts per round. engine: "process" or "thread" (create_app); default: a process of its own for
    a CPU model, the thread on a GPU."""
    import torch
    import uvicorn
    if threads:
        torch.set_num_threads(threads)

    from ..lm import load
    lm = load(model, **load_kw)
    draft = load_drafter(lm, draft_model, ngram_max, ngram_min, **load_kw)
    if engine is None:
        engine = "process" if next(lm.model.parameters()).device.type == "cpu" else "thread"
    app = create_app(lm, model_name or default_model_name(model), api_key=api_key, max_batch=max_batch,
                     indexes=indexes, prefix_cache_mb=prefix_cache_mb, draft=draft, num_speculative=num_speculative,
                     engine=engine)
    uvicorn.run(app, host=host, port=port, log_level="info")
