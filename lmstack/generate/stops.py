"""Stop strings over a stream of text pieces (text that did not come from our own tokens, e.g. a remote server's
reply): the same rules as `TextStream` (generate/text.py), which applies them to generated tokens."""
from __future__ import annotations

from typing import Iterable, Iterator

from .text import first_stop, held_suffix


def apply_stop_strings(pieces: Iterable[str], stops: list[str] | None) -> Iterator[str]:
    """Yield the text of `pieces` up to (not including) the first occurrence of any stop string, then stop
    consuming `pieces` (so a lazy generator behind them stops generating)."""
    stops = [s for s in (stops or []) if s]
    if not stops:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        cut = first_stop(held, stops)
        if cut >= 0:
            if cut:
                yield held[:cut]
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # end generation now rather than when the generator is garbage-collected
            return
        keep = held_suffix(held, stops)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
