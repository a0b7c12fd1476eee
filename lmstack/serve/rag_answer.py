"""POST /v1/rag/answer: retrieve (on the rag thread), then synthesise with lmstack.rag.answer.iter_answer over an
`EngineLM` — the served LM whose text generation goes through the server's one engine (continuous batching, the
same TextStream as the completion routes), so RAG answers decode alongside every other request and the model is
never entered from two threads. JSON, or SSE: a `rag.retrieval` event (the retrieved chunks), `rag.answer.delta`
events (text pieces), a final `rag.answer` event (answer, citations, numbered sources), then `data: [DONE]`."""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Iterable, Iterator

from fastapi import Request

from ..generate import SamplingParams
from ..rag.answer import SYNTHESIS_MODES, iter_answer
from ..rag.index import MODES, Hit
from .choices import generate_pieces
from .protocol import APIError, read_field
from .rag_state import RagState, VectorStore, attributes, file_id
from .responses import sse_response

if TYPE_CHECKING:
    from .state import ServerState

SYNTHESIS = SYNTHESIS_MODES


class EngineLM:
    """The served LM as `iter_answer` sees it: everything is the LM's own (tokenizer, config, chat template)
    except text generation, which is submitted to the server's engine. Each generation's stream is put in
    `handles`, so whoever owns them can cancel it (a client gone, a request ended)."""

    def __init__(self, state: "ServerState", handles: list):
        self._state, self._lm, self.handles = state, state.lm, handles

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def stream(self, prompt: str, truncate: str | None = None, stop_ids: Iterable[int] | None = None,
               **params) -> Iterator[str]:
        sp = SamplingParams(**params)
        stops = set(stop_ids) if stop_ids is not None else self._state.eos
        h = self._state.engine.submit(self._lm.prompt_ids(prompt), sp, stops, truncate, 0)
        self.handles.append(h)
        try:
            for piece in generate_pieces(self._lm, h, sp, stops):
                if piece.text:
                    yield piece.text
        finally:
            h.cancel()

    def generate(self, prompt: str, truncate: str | None = None, **params) -> str:
        return "".join(self.stream(prompt, truncate=truncate, **params))

    def generate_batch(self, prompts: list[str], truncate: str | None = None, max_batch: int | None = None,
                       **params) -> list[str]:
        return [self.generate(p, truncate=truncate, **params) for p in prompts]

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        yield from self.stream(self._lm.chat_prompt(messages), truncate="left",
                               stop_ids=self._lm.tokenizer.end_of_turn_ids, **params)

    def chat(self, messages: list[dict], **params) -> str:
        return "".join(self.chat_stream(messages, **params))


def hit_json(h: Hit, n: int | None = None) -> dict:
    c = h.chunk
    return {"n": n, "rank": h.rank, "score": h.score, "chunk_id": c.id, "file_id": file_id(c.path), "path": c.path,
            "title": c.title, "headings": c.headings, "text": c.text, "attributes": attributes(c)}


class AnswerRequest:
    """The checked fields of a /v1/rag/answer body."""

    def __init__(self, state: "ServerState", rag: RagState, body: dict):
        q = body.get("question")
        if not isinstance(q, str) or not q.strip():
            raise APIError(400, "'question' must be a non-empty string", param="question")
        self.question = q
        self.store: VectorStore = rag.get(read_field(body, "vector_store_id", "str"))
        self.top_k = read_field(body, "top_k", "int", 5, lo=1, hi=50)
        self.mode = read_field(body, "mode", "str", "hybrid")
        if self.mode not in MODES:
            raise APIError(400, f"'mode' (retrieval) must be one of {', '.join(MODES)}", param="mode")
        self.synthesis = read_field(body, "synthesis", "str", "compact")
        if self.synthesis not in SYNTHESIS:
            raise APIError(400, f"'synthesis' must be one of {', '.join(SYNTHESIS)}", param="synthesis")
        self.max_tokens = read_field(body, "max_tokens", "int", 256, lo=1, hi=state.block - 1)
        self.stream = read_field(body, "stream", "bool", False)
        seed = read_field(body, "seed", "int")
        self.sampling = {"temperature": read_field(body, "temperature", "float", 0.0, lo=0.0, hi=2.0),
                         "top_p": read_field(body, "top_p", "float", 1.0, lo=0.0, hi=1.0),
                         "seed": None if seed is None else seed % (2 ** 63)}
        self.id, self.created = f"rag-{uuid.uuid4().hex}", int(time.time())

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "vector_store_id": self.store.id, "mode": self.mode,
                "synthesis": self.synthesis}

    def answers(self, lm: EngineLM, hits: list[Hit]) -> Iterator:
        return iter_answer(lm, self.question, hits, self.max_tokens, self.synthesis, **self.sampling)

    def final(self, state: "ServerState", ans, hits: list[Hit]) -> dict:
        used = {h.chunk.id: n for n, h in enumerate(ans.sources, 1)}
        return {**self.head(), "object": "rag.answer", "model": state.model_name, "answer": ans.text,
                "citations": list(ans.cited), "sources": [hit_json(h, n) for n, h in enumerate(ans.sources, 1)],
                "retrieved": [hit_json(h, used.get(h.chunk.id)) for h in hits],
                "usage": {"context_tokens": ans.context_tokens, "calls": getattr(ans, "steps", 1)},
                "invalid_citations": list(getattr(ans, "invalid", []))}


async def rag_answer(state: "ServerState", rag: RagState, request: Request):
    body = await state.read_body(request)
    req = AnswerRequest(state, rag, body)
    req.store.touch()
    hits = await rag.run(req.store.search, req.question, req.top_k, req.mode, None)
    if not hits:
        raise APIError(400, "retrieval found no chunk for this question (try another 'mode')", param="question")
    if not req.stream:
        def work():
            handles: list = []
            try:
                *_, ans = req.answers(EngineLM(state, handles), hits)
                return ans
            finally:
                for h in handles:
                    h.cancel()
        with state.admit():
            ans = await state.on_consumer(work)
        return req.final(state, ans, hits)
    return await stream_answer(state, req, hits)


async def stream_answer(state: "ServerState", req: AnswerRequest, hits: list[Hit]):
    """SSE of one answer. Its first item is produced before the response starts, so a request that cannot be
    answered (no room in the context window, ...) still gets a 400 rather than an error event."""
    handles: list = []
    lm = EngineLM(state, handles)
    items = req.answers(lm, hits)
    sentinel = object()
    try:
        with state.admit():
            first = await state.on_consumer(next, items, sentinel)
    except BaseException:
        for h in handles:
            h.cancel()
        items.close()
        raise

    def events(sse_handles: list) -> Iterator[dict]:
        sse_handles.extend(handles)
        lm.handles = sse_handles  # later generations are cancelled by the SSE driver too
        head = req.head()
        yield {**head, "object": "rag.retrieval", "retrieved": [hit_json(h) for h in hits]}
        item = first
        try:
            while item is not sentinel:
                if isinstance(item, str):
                    yield {**head, "object": "rag.answer.delta", "delta": item}
                else:
                    yield req.final(state, item, hits)
                item = next(items, sentinel)
        finally:
            items.close()

    return sse_response(state, events)
