"""The one choice driver of /v1/completions and /v1/chat/completions: plan the choices of a request (n per prompt,
choice i sampling with seed + i), submit them all to the engine at once so they decode together, and turn each
one's token stream into text pieces through the one `TextStream`. Non-streamed, `complete` drains every choice
into its text, pieces and finish state; streamed, `stream` hands the events to a route's chunk shaper over SSE.
Either way every generation is cancelled when the request ends. The routes differ only in parsing and shaping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from fastapi.responses import StreamingResponse

from ..errors import LMStackError
from ..generate import Piece, SamplingParams, TextStream
from .protocol import APIError
from .responses import sse_response

if TYPE_CHECKING:
    from .state import ServerState


def generate_pieces(lm, steps, sp: SamplingParams, stop_ids: set[int], ts: TextStream | None = None):
    """Text pieces (with the TokenSteps behind them) of one choice from `steps`, its engine token stream, through
    the one TextStream (so the joined text equals `LM.generate`'s). Closing `steps` (at a stop string) ends the
    generation; `ts` is left with the token count and finish reason."""
    ts = ts if ts is not None else TextStream(lm.tokenizer, stop_ids, sp.stop, sp.stop_at_eos)
    yield from ts.pieces(steps)


@dataclass
class Choice:
    """One generation of a request: `index` in the response, the `prompt` it continues (its position in the
    request) and what the engine needs (prompt ids, params, stop token ids, top logprobs, truncation side)."""
    index: int
    prompt: int
    ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    top_n: int = 0
    truncate: str | None = None


def fan_out(sampling: dict, n: int) -> list[SamplingParams]:
    """The params of n choices from SamplingParams keywords: choice i samples with seed + i (a seeded request stays
    reproducible, and its choices still differ)."""
    seed = sampling["seed"]
    try:
        return [SamplingParams(**{**sampling, "seed": None if seed is None else seed + i}) for i in range(n)]
    except LMStackError as e:
        raise APIError(400, str(e)) from None


def plan_choices(prompts: list[list[int]], sampling: dict, n: int, stop_ids: set[int], top_n: int = 0,
                 truncate: str | None = None) -> list[Choice]:
    """n choices per prompt (prompt p's choice i has index p * n + i)."""
    out = []
    for p, ids in enumerate(prompts):
        out += [Choice(p * n + i, p, ids, sp, stop_ids, top_n, truncate) for i, sp in enumerate(fan_out(sampling, n))]
    return out


@dataclass
class Event:
    """One step of a choice: its start (no piece, no end), a text piece (`offset`: the length of the choice's text
    before it), or its end (`end`: the TextStream, with the token count and finish reason)."""
    choice: Choice
    piece: Piece | None = None
    offset: int = 0
    end: TextStream | None = None


def run_choices(state: "ServerState", choices: list[Choice], handles: list) -> Iterator[Event]:
    """Submit every choice now (their streams go into `handles`), then the events of each choice in order."""
    streams = state.submit_all(choices, handles)
    tok = state.tokenizer
    for c, steps in zip(choices, streams):
        ts = TextStream(tok, c.stop_ids, c.params.stop, c.params.stop_at_eos)
        yield Event(c)
        offset = 0
        for piece in generate_pieces(state.lm, steps, c.params, c.stop_ids, ts):
            yield Event(c, piece, offset)
            offset += len(piece.text)
        yield Event(c, end=ts)


@dataclass
class Drained:
    """A whole choice: its text, its pieces as (offset, piece), and its end state."""
    choice: Choice
    text: str = ""
    pieces: list[tuple[int, Piece]] = field(default_factory=list)
    end: TextStream | None = None

    @property
    def finish_reason(self) -> str:
        return self.end.finish_reason(self.choice.params.max_new_tokens)


def drain(events: Iterator[Event]) -> list[Drained]:
    out: dict[int, Drained] = {}
    for ev in events:
        d = out.setdefault(ev.choice.index, Drained(ev.choice))
        if ev.piece is not None:
            d.text += ev.piece.text
            d.pieces.append((ev.offset, ev.piece))
        if ev.end is not None:
            d.end = ev.end
    return list(out.values())


async def complete(state: "ServerState", choices: list[Choice]) -> list[Drained]:
    """Generate every choice to its end (admitted as one request) and cancel whatever is left."""
    def work():
        handles: list = []
        try:
            return drain(run_choices(state, choices, handles))
        finally:
            for h in handles:
                h.cancel()

    with state.admit():
        return await state.on_consumer(work)


def stream(state: "ServerState", choices: list[Choice],
           shape: Callable[[Iterator[Event]], Iterator[dict]]) -> StreamingResponse:
    """SSE of the chunks `shape` makes of the choices' events."""
    return sse_response(state, lambda handles: shape(run_choices(state, choices, handles)))
