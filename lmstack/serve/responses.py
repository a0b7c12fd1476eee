"""The response side of the OpenAI protocol: usage blocks, the logprob blocks of /v1/completions (incl. echo) and
/v1/chat/completions, embedding encodings, and the SSE stream driver (GuardedStream + sse_response)."""
from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import threading
from typing import TYPE_CHECKING, Callable, Iterator

from fastapi.responses import StreamingResponse

from ..generate import continuation_logprobs_top, token_text
from .protocol import APIError

if TYPE_CHECKING:
    from .state import ServerState

_DONE = object()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------------------------------- logprobs
def completion_logprobs(tokenizer, steps, offset: int, top_n: int | None) -> dict:
    """The /v1/completions logprobs block of generated `steps` (TokenSteps) whose text starts at `offset`."""
    lpb = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for s in steps:
        t = token_text(tokenizer, s.token)
        lpb["tokens"].append(t)
        lpb["token_logprobs"].append(s.logprob)
        lpb["top_logprobs"].append({token_text(tokenizer, i): v for i, v in s.top[:top_n]} if top_n else None)
        lpb["text_offset"].append(offset)
        offset += len(t)
    return lpb


def echo_logprobs(model, tokenizer, ids: list[int], top_n: int | None) -> dict:
    """The logprobs block of the prompt itself (echo=true): its first token has none. Model work: run it on the
    engine thread."""
    lp, _, top = continuation_logprobs_top(model, ids[:1], ids[1:], top_n or 0)
    lpb = {"tokens": [], "token_logprobs": [None], "top_logprobs": [None], "text_offset": []}
    lpb["token_logprobs"] += lp.tolist()
    lpb["top_logprobs"] += [{token_text(tokenizer, i): v for i, v in row} if top_n else None for row in top]
    off = 0
    for t in ids:
        s = token_text(tokenizer, t)
        lpb["tokens"].append(s)
        lpb["text_offset"].append(off)
        off += len(s)
    return lpb


def merge_logprobs(blocks: list[dict | None]) -> dict | None:
    """Consecutive completion logprobs blocks joined into a new one (None when there are none)."""
    blocks = [b for b in blocks if b is not None]
    if not blocks:
        return None
    return {k: [v for b in blocks for v in b[k]] for k in blocks[0]}


def chat_logprobs(tokenizer, steps, top_n: int) -> list[dict]:
    """The /v1/chat/completions `logprobs.content` entries of generated `steps`."""
    out = []
    for s in steps:
        t = token_text(tokenizer, s.token)
        out.append({"token": t, "logprob": s.logprob, "bytes": list(t.encode()),
                    "top_logprobs": [{"token": token_text(tokenizer, i), "logprob": v,
                                      "bytes": list(token_text(tokenizer, i).encode())} for i, v in s.top[:top_n]]})
    return out


# --------------------------------------------------------------------------------------------------- embeddings
def encode_embedding(v: list[float], dimensions: int | None, encoding_format: str) -> list[float] | str:
    """One embedding as sent: cut to `dimensions` and renormalised to unit length, then a list of floats or
    (encoding_format='base64') little-endian float32 bytes in base64."""
    if dimensions is not None and dimensions < len(v):
        v = v[:dimensions]
        norm = math.sqrt(sum(a * a for a in v)) or 1.0
        v = [a / norm for a in v]
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if encoding_format == "base64" else v


# ---------------------------------------------------------------------------------------------------------- SSE
class GuardedStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` when the response ends however it ends, including a client gone
    before the body started (then the body generator never runs, so its own `finally` cannot release anything)."""

    def __init__(self, content, on_close: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse_response(state: "ServerState", make_events: Callable[[list], Iterator[dict]]) -> StreamingResponse:
    """SSE over a sync iterator of chunk dicts (`make_events(handles)`, which submits its generations into
    `handles`). One stream-pool thread runs the iterator for the whole response and hands each chunk, already
    framed, to the event loop: one thread wake-up per token instead of a pool round trip, and the chunks that
    queued up while the loop was busy go out in one write. Whatever ends the response (the last chunk, a client
    disconnect, a response that never started) cancels the generations and frees the admission slot once."""
    admit = state.admit().__enter__()
    handles: list = []
    events = make_events(handles)
    lock = threading.Lock()  # guards `flags`: the iterator is closed by the pump, or by release if it never ran
    flags = {"started": False, "released": False}
    out: asyncio.Queue = asyncio.Queue()

    def pump(loop: asyncio.AbstractEventLoop) -> None:
        with lock:
            if flags["released"]:
                return
            flags["started"] = True
        try:
            for item in events:
                loop.call_soon_threadsafe(out.put_nowait, "data: " + json.dumps(item) + "\n\n")
                if flags["released"]:
                    break
        finally:
            events.close()
            try:
                loop.call_soon_threadsafe(out.put_nowait, _DONE)
            except RuntimeError:  # the loop is gone (server shutdown): nobody is reading
                pass

    def release():
        with lock:
            if flags["released"]:
                return
            flags["released"] = True
            never_ran = not flags["started"]
        for h in handles:
            h.cancel()  # unblocks the pump waiting for this request's next token
        if never_ran:
            events.close()
        admit.__exit__()

    async def body():
        task = asyncio.ensure_future(state.on_consumer(pump, asyncio.get_running_loop()))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved here or below, never lost
        try:
            done = False
            while not done:
                parts = [await out.get()]
                while not out.empty():
                    parts.append(out.get_nowait())
                if parts[-1] is _DONE:
                    parts.pop()
                    done = True
                if parts:
                    yield "".join(parts)
            try:
                await task
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also on a client disconnect: Starlette cancels or closes this generator
            release()

    return GuardedStream(body(), release, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
