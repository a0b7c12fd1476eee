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
from .tools import ToolPlan, check_tool_messages, held_back, parse_reply, parse_tools, render_messages

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
    tools: ToolPlan | None = None

    def body(self, model: str, choices: list, object: str = "chat.completion", **kw) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": model, "choices": choices, **kw}


def parse_chat(state: "ServerState", body: dict) -> ChatRequest:
    plan = parse_tools(body)
    messages = chat_messages(body)
    check_tool_messages(messages)
    messages, template_vars = render_messages(state.tokenizer.chat_template, messages,
                                              plan if plan is not None and plan.choice != "none" else None)
    ids = chat_prompt_ids(state.lm, messages, template_vars)
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
    forced = plan.grammar() if plan is not None else None
    if forced is not None:
        if any(sampling.get(k) for k in ("json_object", "json_schema", "regex", "choices", "grammar")):
            raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                "response_format or a guided_* constraint", param="tool_choice")
        sampling["grammar"] = forced
    stop_ids = set(state.tokenizer.end_of_turn_ids)
    choices = plan_choices([ids], sampling, n, stop_ids, top_n if want_lp else 0, "left")
    return ChatRequest(len(ids), max_tokens, want_lp, top_n, stream_, choices, f"chatcmpl-{uuid.uuid4().hex}",
                       int(time.time()), plan if plan is not None and plan.parse_calls else None)


def reply_message(req: ChatRequest, text: str, finish_reason: str) -> tuple[dict, str]:
    """The assistant message of a finished choice (tool calls parsed out when the request has tools)."""
    if req.tools is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse_reply(text, req.tools)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


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
        message, finish = reply_message(req, d.text, d.finish_reason)
        choices.append({"index": d.choice.index, "message": message,
                        "logprobs": {"content": lps} if req.want_lp else None, "finish_reason": finish})
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    return req.body(state.model_name, choices, usage=usage(req.prompt_tokens, completion_tokens))


def chat_chunks(state: "ServerState", req: ChatRequest, events: Iterator[Event], with_usage: bool) -> Iterator[dict]:
    """The chat.completion.chunk chunks of the choices' events: per choice the role, the content pieces, the end."""
    completion_tokens = 0

    def chunk(i: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return req.body(state.model_name, [{"index": i, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason}], object="chat.completion.chunk")

    texts: dict[int, list] = {}  # with tools: each choice's text so far and how much of it was sent
    for ev in events:
        i = ev.choice.index
        if ev.end is not None:
            completion_tokens += ev.end.tokens
            finish = ev.end.finish_reason(req.max_tokens)
            if req.tools is not None:
                yield from tool_chunks(req, chunk, i, *texts.get(i, ["", 0]), finish)
            else:
                yield chunk(i, {}, None, finish)
        elif ev.piece is not None and req.tools is not None:  # hold back what may be a tool call
            t = texts.setdefault(i, ["", 0])
            t[0] += ev.piece.text
            upto = len(t[0]) - held_back(t[0])
            if upto > t[1]:
                yield chunk(i, {"content": t[0][t[1]:upto]})
                t[1] = upto
        elif ev.piece is not None:
            lp = {"content": chat_logprobs(state.tokenizer, ev.piece.steps, req.top_n)} if req.want_lp else None
            yield chunk(i, {"content": ev.piece.text}, lp)
        else:
            yield chunk(i, {"role": "assistant", "content": ""})
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    if with_usage:
        yield req.body(state.model_name, [], object="chat.completion.chunk",
                       usage=usage(req.prompt_tokens, completion_tokens))



def tool_chunks(req: ChatRequest, chunk, i: int, text: str, sent: int, finish: str) -> Iterator[dict]:
    """The end of a streamed choice with tools: its tool calls as OpenAI streams them (one delta per call with the
    id, name and whole arguments), or the held-back text when there were none; then the finish chunk."""
    _, calls = parse_reply(text, req.tools)
    if not calls:
        if len(text) > sent:
            yield chunk(i, {"content": text[sent:]})
        yield chunk(i, {}, None, finish)
        return
    for k, c in enumerate(calls):
        yield chunk(i, {"tool_calls": [{"index": k, **c}]})
    yield chunk(i, {}, None, "tool_calls")
