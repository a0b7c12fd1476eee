"""Token ids -> text: the one place that turns generated tokens into the text a user sees.

A `TextStream` owns, for one generation:
- the end: a stop token (EOS / end-of-turn) ends the text and is not part of it (unless stop_at_eos=False);
- incremental UTF-8: a multi-byte character split over tokens is held back until complete; invalid bytes become
  U+FFFD (Python's errors='replace'); special tokens add no text;
- stop strings: the text ends right before the first one (not included), even when it spans tokens, and text that
  could still become the start of one is held back until it cannot,
so streamed pieces always join to exactly the non-streamed text. `LM`, the CLI, the server, eval and the trainers
all decode through it.

    ts = TextStream(tokenizer, stop_ids={eos}, stop=["\\n\\n"])
    for piece in ts.pieces(token_stream):   # closes token_stream as soon as the text is complete
        print(piece.text, end="")
    ts.finish_reason(max_new_tokens)        # "stop" or "length"

For a generation driven step by step (the continuous batcher's callbacks) use `feed(step)` per token and
`finish()` at the end; `done` says when the text is complete (the caller can then stop generating).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator


@dataclass
class Piece:
    """A text delta and the generated steps (token ids or TokenSteps) whose text is (at least partly) in it."""
    text: str
    steps: list = field(default_factory=list)


def held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


class TextStream:
    """Text of one generation, fed token by token (see the module docstring)."""

    def __init__(self, tokenizer, stop_ids: Iterable[int] = (), stop: list[str] | None = None,
                 stop_at_eos: bool = True):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids) - {None}
        self.stops = [s for s in (stop or []) if s]
        self.stop_at_eos = stop_at_eos
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._pending: list = []
        self.tokens = 0          # steps fed, the ending stop token included (the usage count)
        self.text = ""           # text released so far
        self.hit_end = False     # a stop token ended it
        self.hit_stop = False    # a stop string ended it
        self._finished = False

    @property
    def done(self) -> bool:
        """The text is complete: nothing fed from now on changes it."""
        return self.hit_end or self.hit_stop

    def feed(self, step: Any) -> Piece | None:
        """Add one generated step (a token id or anything with `.token`); returns the text it releases, if any."""
        if self.done or self._finished:
            return None
        self.tokens += 1
        tok = step if isinstance(step, int) else step.token
        if self.stop_at_eos and tok in self.stop_ids:
            self.hit_end = True
            return None
        self._pending.append(step)
        return self._release(self._dec.decode(self.tokenizer.token_bytes(tok)))

    def finish(self) -> Piece | None:
        """The token stream has ended: flush the UTF-8 decoder and the held-back text."""
        if self.hit_stop or self._finished:
            return None
        self._finished = True
        return self._release(self._dec.decode(b"", final=True), final=True)

    def _release(self, text: str, final: bool = False) -> Piece | None:
        self._held += text
        out = self._held
        if self.stops:
            cut = first_stop(self._held, self.stops)
            if cut >= 0:
                self.hit_stop = True
                out, self._held = self._held[:cut], ""
            else:
                keep = 0 if final else held_suffix(self._held, self.stops)
                out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        else:
            self._held = ""
        if not out:
            return None
        self.text += out
        piece, self._pending = Piece(out, self._pending), []
        return piece

    def pieces(self, steps: Iterable) -> Iterator[Piece]:
        """The pieces of a whole token stream. Stops consuming `steps` as soon as the text is complete and closes it
        (so a lazy generator behind it stops generating)."""
        try:
            for st in steps:
                p = self.feed(st)
                if p is not None:
                    yield p
                if self.done:
                    break
            p = self.finish()
            if p is not None:
                yield p
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()

    def texts(self, steps: Iterable) -> Iterator[str]:
        """`pieces` as plain strings."""
        for p in self.pieces(steps):
            yield p.text

    def decode(self, steps: Iterable) -> str:
        """The whole text of `steps`."""
        for _ in self.pieces(steps):
            pass
        return self.text

    def finish_reason(self, max_new_tokens: int) -> str:
        """OpenAI's finish_reason: 'length' when the token budget ran out, else 'stop'."""
        if self.done:
            return "stop"
        return "length" if self.tokens >= max_new_tokens else "stop"


def decode_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] = (), stop: list[str] | None = None,
                stop_at_eos: bool = True) -> str:
    """Generated ids -> text in one call (a `TextStream` over a finished list)."""
    return TextStream(tokenizer, stop_ids, stop, stop_at_eos).decode(ids)


def token_text(tokenizer, token: int) -> str:
    """Display text of one token on its own (logprob listings): its bytes decoded with replacement, or the
    tokenizer's own decoding for tokens without bytes."""
    b = tokenizer.token_bytes(token)
    return b.decode("utf-8", errors="replace") if b else tokenizer.decode([token])
