"""POST /v1/chat/completions: parse the messages through the chat template, then shape the shared choice driver's
output into chat.completion bodies / chat.completion.chunk chunks."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from fastapi import Request

from .choices import Choice, Event, complete, plan_choices, stream
from .protocol import APIError, chat_messages, chat_prompt_ids, include_usage, read_field, sampling_fields
from .responses import chat_logprobs, usage

if TYPE_CHECKING:
    from .state import ServerState


@dataclass
class ChatRequest:
    prompt_tokens: int
    max_tokens: int
    want_lp: bool
    top_n: int
    stream: bool
    choices: list[Choice]
    id: str
    created: int

    def body(self, model: str, choices: list, object: str = "chat.completion", **kw) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": model, "choices": choices, **kw}


def parse_chat(state: "ServerState", body: dict) -> ChatRequest:
    ids = chat_prompt_ids(state.lm, chat_messages(body))
    block = state.block
    max_tokens = read_field(body, "max_completion_tokens", "int", None, lo=0, alias="max_tokens")
    if max_tokens is None:
        max_tokens = max(1, min(512, block - len(ids), block - 1))
    if max_tokens >= block:
        raise APIError(400, f"max_tokens={max_tokens} must be smaller than the context window ({block} tokens)",
                       param="max_tokens", code="context_length_exceeded")
    n = read_field(body, "n", "int", 1, lo=1, hi=state.max_n)
    if n > state.max_batch:
        raise APIError(400, f"n={n} is over the server's --max-batch {state.max_batch}", param="n")
    want_lp = read_field(body, "logprobs", "bool", False)
    top_n = read_field(body, "top_logprobs", "int", 0, lo=0, hi=20)
    stream_ = read_field(body, "stream", "bool", False)
    sampling = sampling_fields(body, max_tokens, state.vocab)
    stop_ids = set(state.tokenizer.end_of_turn_ids)
    choices = plan_choices([ids], sampling, n, stop_ids, top_n if want_lp else 0, "left")
    return ChatRequest(len(ids), max_tokens, want_lp, top_n, stream_, choices, f"chatcmpl-{uuid.uuid4().hex}",
                       int(time.time()))


async def chat_completions(state: "ServerState", request: Request):
    body = await state.read_body(request)
    req = parse_chat(state, body)
    if req.stream:
        return stream(state, req.choices, lambda events: chat_chunks(state, req, events, include_usage(body)))
    choices, completion_tokens = [], 0
    for d in await complete(state, req.choices):
        lps = [e for _, piece in d.pieces for e in chat_logprobs(state.tokenizer, piece.steps, req.top_n)] \
            if req.want_lp else None
        completion_tokens += d.end.tokens
        choices.append({"index": d.choice.index, "message": {"role": "assistant", "content": d.text},
                        "logprobs": {"content": lps} if req.want_lp else None, "finish_reason": d.finish_reason})
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    return req.body(state.model_name, choices, usage=usage(req.prompt_tokens, completion_tokens))


def chat_chunks(state: "ServerState", req: ChatRequest, events: Iterator[Event], with_usage: bool) -> Iterator[dict]:
    """The chat.completion.chunk chunks of the choices' events: per choice the role, the content pieces, the end."""
    completion_tokens = 0

    def chunk(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return req.body(state.model_name, [{"index": i, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason}], object="chat.completion.chunk")

    for ev in events:
        i = ev.choice.index
        if ev.end is not None:
            completion_tokens += ev.end.tokens
            yield chunk(i, {}, None, ev.end.finish_reason(req.max_tokens))
        elif ev.piece is not None:
            lp = {"content": chat_logprobs(state.tokenizer, ev.piece.steps, req.top_n)} if req.want_lp else None
            yield chunk(i, {"content": ev.piece.text}, lp)
        else:
            yield chunk(i, {"role": "assistant", "content": ""})
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    if with_usage:
        yield req.body(state.model_name, [], object="chat.completion.chunk",
                       usage=usage(req.prompt_tokens, completion_tokens))

