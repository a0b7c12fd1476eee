"""The routes: plain async functions of (state, request), registered on the app by `register`."""
from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from .chat import chat_completions
from .completions import completions
from .protocol import APIError, embedding_inputs, read_field
from .responses import encode_embedding
from .state import ServerState

STATIC_DIR = Path(__file__).parent / "static"  # the web playground served at /


async def playground(state: ServerState, request: Request):
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def playground_config(state: ServerState, request: Request):
    """What the page needs before its first request; reveals no secret (and no filesystem path: the model's name)."""
    return {"model": state.model_name, "api_key_required": state.api_key is not None, "context_length": state.block}


async def health(state: ServerState, request: Request):
    return {"status": "ok", "model": state.model_name}


async def prometheus(state: ServerState, request: Request):
    pc = state.prefix_cache
    text = state.metrics.render(state.active, state.engine.queued, state.engine.active,
                                prefix=pc.stats() if pc is not None else None)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def models(state: ServerState, request: Request):
    state.check_auth(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "lmstack", "max_model_len": state.block}]}


async def embeddings(state: ServerState, request: Request):
    body = await state.read_body(request)
    texts = embedding_inputs(body, state.tokenizer, state.vocab)
    fmt = read_field(body, "encoding_format", "str", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dims = read_field(body, "dimensions", "int", None, lo=1)
    with state.admit():
        vecs = await state.on_worker(lambda: state.lm.embed(texts).tolist())
    n_tokens = sum(len(state.tokenizer.encode(t)) for t in texts)
    state.metrics.tokens(n_tokens, 0)
    data = [{"object": "embedding", "index": i, "embedding": encode_embedding(v, dims, fmt)}
            for i, v in enumerate(vecs)]
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


ROUTES: list[tuple[str, str, Callable[[ServerState, Request], Awaitable]]] = [
    ("GET", "/", playground),
    ("GET", "/playground/config", playground_config),
    ("GET", "/health", health),
    ("GET", "/metrics", prometheus),
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/embeddings", embeddings),
]


def _bind(state: ServerState, route: Callable[[ServerState, Request], Awaitable]):
    async def endpoint(request: Request):
        return await route(state, request)
    endpoint.__name__ = route.__name__
    return endpoint


def register(app: FastAPI, state: ServerState) -> None:
    """Add every route (and the /static files) to `app`, over `state`."""
    for method, path, route in ROUTES:
        app.add_api_route(path, _bind(state, route), methods=[method], include_in_schema=path != "/")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
