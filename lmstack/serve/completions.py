"""POST /v1/completions: parse the request, then shape the shared choice driver's output into text_completion
bodies / chunks (echo of the prompt with its logprobs first when asked), or run beam search (num_beams > 1)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from fastapi import Request

from ..generate import TextStream, beam_search
from .choices import Choice, Event, complete, plan_choices, stream
from .protocol import APIError, include_usage, prompt_list, read_field, sampling_fields
from .responses import completion_logprobs, echo_logprobs, merge_logprobs, usage

if TYPE_CHECKING:
    from .state import ServerState


@dataclass
class CompletionRequest:
    prompts: list[tuple[list[int], str]]  # (token ids, text)
    max_tokens: int
    n: int
    top_n: int | None  # `logprobs`: None = no logprobs
    echo: bool
    stream: bool
    choices: list[Choice]
    id: str
    created: int

    @property
    def want_lp(self) -> bool:
        return self.top_n is not None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.prompts)

    def body(self, **kw) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, **kw}


def parse_completion(state: "ServerState", body: dict) -> CompletionRequest:
    prompts = prompt_list(body, state.lm)
    max_tokens = read_field(body, "max_tokens", "int", 16, lo=0)
    n = read_field(body, "n", "int", 1, lo=1, hi=state.max_n)
    top_n = read_field(body, "logprobs", "int", None, lo=0, hi=20)
    echo = read_field(body, "echo", "bool", False)
    stream_ = read_field(body, "stream", "bool", False)
    read_field(body, "best_of", "int", None, lo=1, hi=n)
    sampling = sampling_fields(body, max_tokens, state.vocab)
    block = state.block
    if len(prompts) * n > state.max_batch:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is over the server's --max-batch {state.max_batch}",
                       param="n")
    if max_tokens >= block:
        raise APIError(400, f"max_tokens={max_tokens} must be smaller than the context window ({block} tokens)",
                       param="max_tokens", code="context_length_exceeded")
    for ids, _ in prompts:
        if len(ids) + max_tokens > block and not (echo and max_tokens == 0 and len(ids) <= block + 1):
            raise APIError(400, f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the model's "
                                f"context window of {block} tokens", param="prompt", code="context_length_exceeded")
    choices = plan_choices([ids for ids, _ in prompts], sampling, n, state.eos, top_n or 0)
    return CompletionRequest(prompts, max_tokens, n, top_n, echo, stream_, choices, f"cmpl-{uuid.uuid4().hex}",
                             int(time.time()))


async def completions(state: "ServerState", request: Request):
    body = await state.read_body(request)
    req = parse_completion(state, body)
    num_beams = read_field(body, "num_beams", "int", 1, lo=1, hi=16)
    if num_beams > 1:
        return await beam_completions(state, body, req, num_beams)
    echoes = [None] * len(req.prompts)
    if req.echo and req.want_lp:
        echoes = await state.on_worker(lambda: [echo_logprobs(state.lm.model, state.tokenizer, ids, req.top_n)
                                                for ids, _ in req.prompts])
    if req.stream:
        return stream(state, req.choices, lambda events: completion_chunks(state, req, echoes, events,
                                                                           include_usage(body)))
    choices = []
    completion_tokens = 0
    for d in await complete(state, req.choices):
        p = d.choice.prompt
        base = len(req.prompts[p][1]) if req.echo else 0
        lps = merge_logprobs([echoes[p]] + [completion_logprobs(state.tokenizer, piece.steps, base + off, req.top_n)
                                            for off, piece in d.pieces]) if req.want_lp else None
        completion_tokens += d.end.tokens
        choices.append({"index": d.choice.index, "text": (req.prompts[p][1] if req.echo else "") + d.text,
                        "logprobs": lps, "finish_reason": d.finish_reason})
    return finish_body(state, req, choices, completion_tokens)


def finish_body(state: "ServerState", req: CompletionRequest, choices: list, completion_tokens: int) -> dict:
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    return req.body(model=state.model_name, choices=choices, usage=usage(req.prompt_tokens, completion_tokens))


def completion_chunks(state: "ServerState", req: CompletionRequest, echoes: list, events: Iterator[Event],
                      with_usage: bool) -> Iterator[dict]:
    """The text_completion chunks of the choices' events: per choice the echo (if asked), its pieces, its end."""
    completion_tokens = 0

    def chunk(c: Choice, text: str, logprobs, finish_reason=None) -> dict:
        return req.body(model=state.model_name, choices=[{"index": c.index, "text": text, "logprobs": logprobs,
                                                          "finish_reason": finish_reason}])

    for ev in events:
        c, prompt_text = ev.choice, req.prompts[ev.choice.prompt][1]
        if ev.end is not None:
            completion_tokens += ev.end.tokens
            yield chunk(c, "", None, ev.end.finish_reason(req.max_tokens))
        elif ev.piece is not None:
            base = len(prompt_text) if req.echo else 0
            lpb = completion_logprobs(state.tokenizer, ev.piece.steps, base + ev.offset, req.top_n) \
                if req.want_lp else None
            yield chunk(c, ev.piece.text, lpb)
        elif req.echo and (prompt_text or echoes[c.prompt]):
            yield chunk(c, prompt_text, echoes[c.prompt])
    state.metrics.tokens(req.prompt_tokens, completion_tokens)
    if with_usage:
        yield req.body(model=state.model_name, choices=[], usage=usage(req.prompt_tokens, completion_tokens))


async def beam_completions(state: "ServerState", body: dict, req: CompletionRequest, num_beams: int) -> dict:
    """num_beams > 1 (an extension): the n best beams of each prompt, not streamed, without logprobs."""
    if req.stream:
        raise APIError(400, "num_beams > 1 cannot be streamed; set stream to false", param="num_beams")
    if req.n > num_beams:
        raise APIError(400, f"n={req.n} must be <= num_beams={num_beams}", param="n")
    if req.echo or req.want_lp:
        raise APIError(400, "num_beams > 1 does not return logprobs or echo", param="num_beams")
    length_penalty = read_field(body, "length_penalty", "float", 1.0)
    eos, n, max_tokens = state.eos, req.n, req.max_tokens

    def beams():
        choices, completion_tokens = [], 0
        for pi, (ids, _) in enumerate(req.prompts):
            sp = req.choices[pi * n].params
            hyps = beam_search(state.lm.model, ids, num_beams=num_beams, max_new_tokens=max_tokens,
                               length_penalty=length_penalty, num_return_sequences=n, eos_id=eos, params=sp)
            for i, h in enumerate(hyps):
                ended = bool(h.tokens) and h.tokens[-1] in eos
                toks = h.tokens[:-1] if ended else h.tokens
                text = TextStream(state.tokenizer, eos, sp.stop).decode(toks)
                completion_tokens += len(h.tokens)
                choices.append({"index": pi * n + i, "text": text, "logprobs": None,
                                "finish_reason": "stop" if ended or len(toks) < max_tokens else "length"})
        return choices, completion_tokens

    with state.admit():
        return finish_body(state, req, *await state.on_worker(beams))
