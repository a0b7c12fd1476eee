"""OpenAI-compatible HTTP API over an `LM`: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/health and /metrics (Prometheus text), plus a web playground at / (static files in serve/static/).

Generation is continuous batching by the engine (lmstack.generate.batching.BackgroundBatcher): every choice of every
request is submitted to one decode loop on its own thread, joins the running batch as soon as a row is free (up to
--max-batch rows) and leaves it the step it ends. The server only parses, schedules and streams: a request's tokens
arrive on a blocking stream that a small thread pool turns into text pieces and SSE chunks. A client that
disconnects (even before its stream starts) cancels its generations at once, freeing their rows. Other model work
(echo scoring, embeddings, beam search) runs on the engine thread between decode steps, so the model is never
entered from two threads at once. Every bad request gets an OpenAI-style error JSON
({"error": {message, type, param, code}}) with a 4xx status; never a 500.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, LMStackError
from ..generate import (BackgroundBatcher, SamplingParams, TextStream, beam_search, continuation_logprobs_top,
                        parse_logit_bias, token_text)

_DONE = object()
STATIC_DIR = Path(__file__).parent / "static"  # the web playground served at /


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


# ----------------------------------------------------------------------------------------------- request fields
_MISSING = object()


def _field(body: dict, name: str, kind: str, default: Any = None, lo: float | None = None, hi: float | None = None,
           alias: str | None = None) -> Any:
    """Read and type-check one request field; None (JSON null) means the default."""
    v = body.get(name, _MISSING)
    if (v is _MISSING or v is None) and alias is not None:
        v = body.get(alias, _MISSING)
    if v is _MISSING or v is None:
        return default

    def bad(what):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:100]}", param=name)

    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            bad("an integer")
        v = int(v)
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad("a number")
        v = float(v)
    elif kind == "bool":
        if not isinstance(v, bool):
            bad("a boolean")
    elif kind == "str":
        if not isinstance(v, str):
            bad("a string")
    elif kind == "dict":
        if not isinstance(v, dict):
            bad("an object")
    if lo is not None and v < lo:
        bad(f">= {lo}")
    if hi is not None and v > hi:
        bad(f"<= {hi}")
    return v


def _stop_field(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    return [s for s in stop if s] or None


def _sampling(body: dict, max_tokens: int, vocab_size: int) -> dict:
    """SamplingParams keyword arguments from the OpenAI fields (+ the top_k / min_p / repetition_penalty
    extensions); SamplingParams itself validates the ranges."""
    try:
        bias = parse_logit_bias(_field(body, "logit_bias", "dict"), vocab_size, clamp=100.0)
    except LMStackError as e:
        raise APIError(400, str(e), param="logit_bias") from None
    seed = _field(body, "seed", "int")
    return dict(max_new_tokens=max_tokens, temperature=_field(body, "temperature", "float", 1.0),
                top_p=_field(body, "top_p", "float", 1.0), top_k=_field(body, "top_k", "int", 0),
                min_p=_field(body, "min_p", "float", 0.0),
                repetition_penalty=_field(body, "repetition_penalty", "float", 1.0),
                presence_penalty=_field(body, "presence_penalty", "float", 0.0),
                frequency_penalty=_field(body, "frequency_penalty", "float", 0.0),
                logit_bias=bias or None, stop=_stop_field(body),
                seed=None if seed is None else seed % (2 ** 63))


# --------------------------------------------------------------------------------------------------- generation
def generate_pieces(lm, steps, sp: SamplingParams, stop_ids: set[int], ts: TextStream | None = None):
    """Text pieces (with the TokenSteps behind them) of one choice from `steps`, its engine token stream, through
    the one TextStream (so the joined text equals `LM.generate`'s). Closing `steps` (at a stop string) ends the
    generation; `ts` is left with the token count and finish reason."""
    ts = ts if ts is not None else TextStream(lm.tokenizer, stop_ids, sp.stop, sp.stop_at_eos)
    yield from ts.pieces(steps)


class _NoTokens:
    """The token stream of a max_tokens=0 choice."""

    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration

    def cancel(self) -> None:
        pass

    close = cancel


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


# ------------------------------------------------------------------------------------------------------ metrics
class Metrics:
    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.hist = [0] * (len(self.BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_count = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            i = next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
            self.hist[i] += 1
            self.lat_sum += seconds
            self.lat_count += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, active: int, queued: int = 0, batch: int = 0) -> str:
        with self.lock:
            out = ["# HELP lmstack_requests_total HTTP requests by route and status.",
                   "# TYPE lmstack_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'lmstack_requests_total{{route="{route}",status="{status}"}} {n}')
            out += ["# HELP lmstack_prompt_tokens_total Prompt tokens processed.",
                    "# TYPE lmstack_prompt_tokens_total counter", f"lmstack_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP lmstack_completion_tokens_total Tokens generated.",
                    "# TYPE lmstack_completion_tokens_total counter",
                    f"lmstack_completion_tokens_total {self.completion_tokens}",
                    "# HELP lmstack_requests_active Requests admitted and not finished.",
                    "# TYPE lmstack_requests_active gauge", f"lmstack_requests_active {active}",
                    "# HELP lmstack_queue_depth Generations waiting for a free row in the decode batch.",
                    "# TYPE lmstack_queue_depth gauge", f"lmstack_queue_depth {queued}",
                    "# HELP lmstack_batch_rows Generations decoding in the running batch.",
                    "# TYPE lmstack_batch_rows gauge", f"lmstack_batch_rows {batch}",
                    "# HELP lmstack_request_duration_seconds Request latency (to the last byte for streams).",
                    "# TYPE lmstack_request_duration_seconds histogram"]
            cum = 0
            for b, n in zip(self.BUCKETS, self.hist):
                cum += n
                out.append(f'lmstack_request_duration_seconds_bucket{{le="{b}"}} {cum}')
            out.append(f'lmstack_request_duration_seconds_bucket{{le="+Inf"}} {cum + self.hist[-1]}')
            out.append(f"lmstack_request_duration_seconds_sum {self.lat_sum}")
            out.append(f"lmstack_request_duration_seconds_count {self.lat_count}")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------- app
def create_app(lm, model_name: str, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_body_bytes: int = 4 * 1024 * 1024, max_n: int = 16) -> FastAPI:
    """The FastAPI app serving `lm` under the name `model_name`. api_key: required as `Authorization: Bearer KEY`
    on every /v1 route. max_batch + max_queue: requests admitted at once (more get 429); max_batch also caps the
    choices (prompts x n) of one request. max_body_bytes: larger bodies get 413."""
    engine = BackgroundBatcher(lm.model, max_batch=max_batch)
    # threads that wait for tokens and turn them into text/SSE chunks (blocking waits, little CPU)
    consumers = ThreadPoolExecutor(max_workers=max_batch + max_queue + 4, thread_name_prefix="lmstack-stream")

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()
        consumers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmstack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    tok = lm.tokenizer
    block = lm.config.block_size
    vocab = lm.config.vocab_size
    eos = {tok.eos_id} - {None}
    created = int(time.time())
    st = {"active": 0}

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

    class Observe:
        """Pure ASGI middleware (keeps streaming and disconnect detection intact): per-request status and latency,
        to the last body byte, into `metrics`."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["path"] == "/metrics":
                return await self.inner(scope, receive, send)
            t0, status, done = time.perf_counter(), [500], [False]

            async def send_wrap(msg):
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                elif msg["type"] == "http.response.body" and not msg.get("more_body") and not done[0]:
                    done[0] = True
                    metrics.observe(scope["path"], status[0], time.perf_counter() - t0)
                await send(msg)
            try:
                await self.inner(scope, receive, send_wrap)
            finally:
                if not done[0]:
                    metrics.observe(scope["path"], status[0], time.perf_counter() - t0)

    app.add_middleware(Observe)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")

        def no_constants(c):
            raise ValueError(f"{c} is not valid JSON")
        try:
            body = json.loads(bytes(raw), parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"model {json.dumps(model)[:100]} does not exist; this server serves "
                                f"'{model_name}'", param="model", code="model_not_found")
        return body

    class Admit:
        """Count a request as active for its lifetime; 429 when the server is full."""

        def __enter__(self):
            if st["active"] >= max_batch + max_queue:
                raise APIError(429, f"server busy: {st['active']} requests in flight; retry later",
                               "rate_limit_error", code="rate_limit_exceeded")
            st["active"] += 1
            return self

        def __exit__(self, *exc):
            st["active"] -= 1

    async def mapped(fut):
        try:
            return await fut
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except LMStackError as e:
            raise APIError(400, str(e)) from None

    async def on_worker(fn: Callable, *args):
        """Run model work on the engine thread (between decode steps)."""
        return await mapped(asyncio.wrap_future(engine.run(fn, *args)))

    async def on_consumer(fn: Callable, *args):
        """Run a blocking consumer of engine streams on the stream thread pool."""
        return await mapped(asyncio.get_running_loop().run_in_executor(consumers, fn, *args))

    def submit_all(specs, handles: list) -> list:
        """Submit every (ids, params, stop ids, top_n, truncate) generation now, so they decode together; each
        stream is also put in `handles` (for cancelling on disconnect)."""
        out = []
        try:
            for ids, sp, stop_ids, top_n, truncate in specs:
                h = _NoTokens() if sp.max_new_tokens == 0 else engine.submit(ids, sp, stop_ids, truncate, top_n)
                handles.append(h)
                out.append(h)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return out

    def make_params(body: dict, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(**_sampling(body, max_tokens, vocab))
        except LMStackError as e:
            raise APIError(400, str(e)) from None

    async def stream_response(request: Request, make_events: Callable[[list], Iterator[dict]]) -> StreamingResponse:
        """SSE over a sync iterator of chunk dicts (`make_events(handles)`, which submits its generations into
        `handles`), advanced on the stream thread pool. Whatever ends the response (the last chunk, a client
        disconnect, a response that never started) cancels the generations and frees the admission slot once."""
        admit = Admit().__enter__()
        handles: list = []
        events = make_events(handles)
        lock = threading.Lock()  # the generator is advanced and closed from pool threads, never at once
        released = [False]

        def step():
            with lock:
                return next(events, _DONE)

        def close():
            with lock:
                events.close()

        def release():
            if released[0]:
                return
            released[0] = True
            for h in handles:
                h.cancel()  # unblocks a pool thread waiting for this request's next token
            consumers.submit(close)
            admit.__exit__()

        async def body():
            try:
                while True:
                    try:
                        item = await on_consumer(step)
                    except APIError as e:
                        yield "data: " + json.dumps({"error": {"message": e.message, "type": e.type,
                                                               "param": e.param, "code": e.code}}) + "\n\n"
                        break
                    if item is _DONE:
                        break
                    yield "data: " + json.dumps(item) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on a client disconnect: Starlette cancels or closes this generator
                release()

        return GuardedStream(body(), release, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/playground/config")
    async def playground_config():  # what the page needs before its first request; reveals no secret
        return {"model": model_name, "api_key_required": api_key is not None, "context_length": block}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(st["active"], engine.queued, engine.active),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lmstack", "max_model_len": block}]}

    def prompt_list(body: dict) -> list[tuple[list[int], str]]:
        """The `prompt` field as [(token ids, text)]: a string, a list of strings, token ids, or lists of ids."""
        p = body.get("prompt", _MISSING)
        if p is _MISSING or p is None:
            raise APIError(400, "'prompt' is required", param="prompt")

        def ids_ok(x):
            return (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                      and 0 <= t < vocab for t in x))
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            items = p
        elif ids_ok(p):
            items = [p]
        elif isinstance(p, list) and p and all(ids_ok(x) for x in p):
            items = p
        else:
            raise APIError(400, f"'prompt' must be a string, a non-empty list of strings, or token ids in "
                                f"[0, {vocab})", param="prompt")
        out = []
        for x in items:
            if isinstance(x, str):
                try:
                    out.append((lm.prompt_ids(x), x))
                except LMStackError as e:
                    raise APIError(400, str(e), param="prompt") from None
            else:
                out.append((list(x), tok.decode(x)))
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = prompt_list(body)
        max_tokens = _field(body, "max_tokens", "int", 16, lo=0)
        n = _field(body, "n", "int", 1, lo=1, hi=max_n)
        top_n = _field(body, "logprobs", "int", None, lo=0, hi=20)
        echo = _field(body, "echo", "bool", False)
        stream = _field(body, "stream", "bool", False)
        _field(body, "best_of", "int", None, lo=1, hi=n)
        sp_kw = _sampling(body, max_tokens, vocab)
        if len(prompts) * n > max_batch:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is over the server's --max-batch {max_batch}",
                           param="n")
        if max_tokens >= block:
            raise APIError(400, f"max_tokens={max_tokens} must be smaller than the context window ({block} tokens)",
                           param="max_tokens", code="context_length_exceeded")
        for ids, _ in prompts:
            if len(ids) + max_tokens > block and not (echo and max_tokens == 0 and len(ids) <= block + 1):
                raise APIError(400, f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the model's "
                                    f"context window of {block} tokens", param="prompt",
                               code="context_length_exceeded")
        try:
            params = [[SamplingParams(**{**sp_kw, "seed": None if sp_kw["seed"] is None else sp_kw["seed"] + i})
                       for i in range(n)] for _ in prompts]
        except LMStackError as e:
            raise APIError(400, str(e)) from None
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        want_lp = top_n is not None

        def lp_block(steps, offset: int) -> dict:
            lpb = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for s in steps:
                t = token_text(tok, s.token)
                lpb["tokens"].append(t)
                lpb["token_logprobs"].append(s.logprob)
                lpb["top_logprobs"].append({token_text(tok, i): v for i, v in s.top[:top_n]} if top_n else None)
                lpb["text_offset"].append(offset)
                offset += len(t)
            return lpb

        def echo_block(ids: list[int]) -> dict:
            lp, _, top = continuation_logprobs_top(lm.model, ids[:1], ids[1:], top_n or 0)
            lpb = {"tokens": [], "token_logprobs": [None], "top_logprobs": [None], "text_offset": []}
            lpb["token_logprobs"] += lp.tolist()
            lpb["top_logprobs"] += [{token_text(tok, i): v for i, v in row} if top_n else None for row in top]
            off = 0
            for t in ids:
                s = token_text(tok, t)
                lpb["tokens"].append(s)
                lpb["text_offset"].append(off)
                off += len(s)
            return lpb

        def run_choice(ids, text, sp, steps, echo_lp) -> Iterator[tuple[str, dict | None, TextStream | None]]:
            """(text delta, logprobs delta, final state) for one choice (`steps`: its engine stream), echo first."""
            state = TextStream(tok, eos, sp.stop, sp.stop_at_eos)
            if echo:
                yield text, echo_lp, None
            offset = len(text) if echo else 0
            if max_tokens == 0:
                yield "", None, state
                return
            for piece in generate_pieces(lm, steps, sp, eos, state):
                lpb = lp_block(piece.steps, offset) if want_lp else None
                offset += len(piece.text)
                yield piece.text, lpb, None
            yield "", None, state

        def merge(a: dict | None, b: dict | None) -> dict | None:
            if a is None:
                return b
            if b is not None:
                for k in a:
                    a[k] += b[k]
            return a

        prompt_tokens = sum(len(ids) for ids, _ in prompts) * 1
        def completion_body(choices: list, completion_tokens: int) -> dict:
            metrics.tokens(prompt_tokens, completion_tokens)
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                  "completion_tokens": completion_tokens,
                                                  "total_tokens": prompt_tokens + completion_tokens}}

        num_beams = _field(body, "num_beams", "int", 1, lo=1, hi=16)
        if num_beams > 1:
            if stream:
                raise APIError(400, "num_beams > 1 cannot be streamed; set stream to false", param="num_beams")
            if n > num_beams:
                raise APIError(400, f"n={n} must be <= num_beams={num_beams}", param="n")
            if echo or want_lp:
                raise APIError(400, "num_beams > 1 does not return logprobs or echo", param="num_beams")
            length_penalty = _field(body, "length_penalty", "float", 1.0)

            def beams():
                choices, completion_tokens = [], 0
                for pi, (ids, _) in enumerate(prompts):
                    sp = params[pi][0]
                    hyps = beam_search(lm.model, ids, num_beams=num_beams, max_new_tokens=max_tokens,
                                       length_penalty=length_penalty, num_return_sequences=n, eos_id=eos,
                                       params=sp)
                    for i, h in enumerate(hyps):
                        ended = bool(h.tokens) and h.tokens[-1] in eos
                        toks = h.tokens[:-1] if ended else h.tokens
                        text = TextStream(tok, eos, sp.stop).decode(toks)
                        completion_tokens += len(h.tokens)
                        choices.append({"index": pi * n + i, "text": text, "logprobs": None,
                                        "finish_reason": "stop" if ended or len(toks) < max_tokens else "length"})
                return choices, completion_tokens

            with Admit():
                return completion_body(*await on_worker(beams))

        async def echo_lps() -> list:
            if not (echo and want_lp):
                return [None] * len(prompts)
            return await on_worker(lambda: [echo_block(ids) for ids, _ in prompts])

        def specs():
            return [(ids, params[pi][i], eos, top_n or 0, None) for pi, (ids, _) in enumerate(prompts)
                    for i in range(n)]

        if not stream:
            echoes = await echo_lps()

            def work():
                choices, completion_tokens, handles = [], 0, []
                streams = submit_all(specs(), handles)
                try:
                    for pi, (ids, text) in enumerate(prompts):
                        for i in range(n):
                            out, lps, state = "", None, None
                            for delta, lpb, fin in run_choice(ids, text, params[pi][i], streams[pi * n + i],
                                                              echoes[pi]):
                                out += delta
                                lps = merge(lps, lpb)
                                state = fin or state
                            completion_tokens += state.tokens
                            choices.append({"index": pi * n + i, "text": out, "logprobs": lps,
                                            "finish_reason": state.finish_reason(max_tokens)})
                finally:
                    for h in handles:
                        h.cancel()
                return choices, completion_tokens

            with Admit():
                return completion_body(*await on_consumer(work))

        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) \
            if isinstance(body.get("stream_options"), dict) else False

        echoes = await echo_lps()

        def events(handles):
            completion_tokens = 0
            streams = submit_all(specs(), handles)
            for pi, (ids, text) in enumerate(prompts):
                for i in range(n):
                    for delta, lpb, fin in run_choice(ids, text, params[pi][i], streams[pi * n + i], echoes[pi]):
                        if fin is not None:
                            completion_tokens += fin.tokens
                        if delta or lpb or fin:
                            yield {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                   "choices": [{"index": pi * n + i, "text": delta, "logprobs": lpb,
                                                "finish_reason": fin.finish_reason(max_tokens) if fin else None}]}
            metrics.tokens(prompt_tokens, completion_tokens)
            if include_usage:
                yield {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}}

        return await stream_response(request, events)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message must be an object with a string 'role'", param="messages")
            c = m.get("content")
            if isinstance(c, list):  # content parts: keep the text ones
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
            if c is None:
                c = ""
            if not isinstance(c, str):
                raise APIError(400, "message 'content' must be a string or a list of text parts", param="messages")
            clean.append({"role": m["role"], "content": c})
        try:
            prompt = lm.chat_prompt(clean)
        except LMStackError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # jinja template errors on odd input
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        try:
            ids = lm.prompt_ids(prompt)
        except LMStackError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = _field(body, "max_completion_tokens", "int", None, lo=0, alias="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(512, block - len(ids), block - 1))
        if max_tokens >= block:
            raise APIError(400, f"max_tokens={max_tokens} must be smaller than the context window ({block} tokens)",
                           param="max_tokens", code="context_length_exceeded")
        n = _field(body, "n", "int", 1, lo=1, hi=max_n)
        if n > max_batch:
            raise APIError(400, f"n={n} is over the server's --max-batch {max_batch}", param="n")
        want_lp = _field(body, "logprobs", "bool", False)
        top_n = _field(body, "top_logprobs", "int", 0, lo=0, hi=20)
        stream = _field(body, "stream", "bool", False)
        sp_kw = _sampling(body, max_tokens, vocab)
        try:
            params = [SamplingParams(**{**sp_kw, "seed": None if sp_kw["seed"] is None else sp_kw["seed"] + i})
                      for i in range(n)]
        except LMStackError as e:
            raise APIError(400, str(e)) from None
        stop_ids = set(tok.end_of_turn_ids)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def lp_content(steps) -> list[dict]:
            out = []
            for s in steps:
                t = token_text(tok, s.token)
                out.append({"token": t, "logprob": s.logprob, "bytes": list(t.encode()),
                            "top_logprobs": [{"token": token_text(tok, i), "logprob": v,
                                              "bytes": list(token_text(tok, i).encode())} for i, v in s.top[:top_n]]})
            return out

        specs = [(ids, sp, stop_ids, top_n if want_lp else 0, "left") for sp in params]

        def run_choice(sp, steps):
            state = TextStream(tok, stop_ids, sp.stop, sp.stop_at_eos)
            for piece in generate_pieces(lm, steps, sp, stop_ids, state):
                yield piece.text, (lp_content(piece.steps) if want_lp else None), None
            yield "", None, state

        if not stream:
            def work():
                choices, completion_tokens, handles = [], 0, []
                streams = submit_all(specs, handles)
                try:
                    for i, sp in enumerate(params):
                        out, lps, state = "", [], None
                        for delta, lpc, fin in run_choice(sp, streams[i]):
                            out += delta
                            lps += lpc or []
                            state = fin or state
                        completion_tokens += state.tokens
                        choices.append({"index": i, "message": {"role": "assistant", "content": out},
                                        "logprobs": {"content": lps} if want_lp else None,
                                        "finish_reason": state.finish_reason(max_tokens)})
                finally:
                    for h in handles:
                        h.cancel()
                return choices, completion_tokens

            with Admit():
                choices, completion_tokens = await on_consumer(work)
            metrics.tokens(len(ids), completion_tokens)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}

        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))

        def chunk(choices, usage=None):
            d = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                 "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return d

        def events(handles):
            completion_tokens = 0
            streams = submit_all(specs, handles)
            for i, sp in enumerate(params):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
                for delta, lpc, fin in run_choice(sp, streams[i]):
                    if fin is not None:
                        completion_tokens += fin.tokens
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": fin.finish_reason(max_tokens)}])
                    elif delta or lpc:
                        yield chunk([{"index": i, "delta": {"content": delta},
                                      "logprobs": {"content": lpc} if want_lp else None, "finish_reason": None}])
            metrics.tokens(len(ids), completion_tokens)
            if include_usage:
                yield chunk([], {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                                 "total_tokens": len(ids) + completion_tokens})

        return await stream_response(request, events)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_body(request)
        x = body.get("input")
        if isinstance(x, str):
            texts = [x]
        elif isinstance(x, list) and x and all(isinstance(s, str) for s in x):
            texts = x
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in x):
            texts = [tok.decode(x)]
        elif isinstance(x, list) and x and all(isinstance(r, list) and r and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in r) for r in x):
            texts = [tok.decode(r) for r in x]
        else:
            raise APIError(400, "'input' must be a string, a non-empty list of strings, or token ids", param="input")
        if len(texts) > 2048:
            raise APIError(400, "at most 2048 inputs per request", param="input")
        fmt = _field(body, "encoding_format", "str", "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = _field(body, "dimensions", "int", None, lo=1)
        with Admit():
            vecs = await on_worker(lambda: lm.embed(texts).tolist())
        n_tokens = sum(len(tok.encode(t)) for t in texts)
        metrics.tokens(n_tokens, 0)
        data = []
        for i, v in enumerate(vecs):
            if dims is not None and dims < len(v):
                v = v[:dims]
                norm = math.sqrt(sum(a * a for a in v)) or 1.0
                v = [a / norm for a in v]
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if fmt == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    app.state.lm, app.state.model_name, app.state.metrics = lm, model_name, metrics
    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          model_name: str | None = None, threads: int = 0, **load_kw) -> None:
    """Load `model` and serve it with uvicorn until interrupted (`lmstack serve`). threads > 0: torch CPU threads."""
    import torch
    import uvicorn
    if threads:
        torch.set_num_threads(threads)

    from ..lm import load
    lm = load(model, **load_kw)
    name = model_name or model
    app = create_app(lm, name, api_key=api_key, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info")
