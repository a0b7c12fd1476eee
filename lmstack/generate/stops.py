"""Stop strings over a stream of text pieces: stop exactly at the string even when it spans token boundaries, never
return it, and hold back text that could still become the start of one, so the streamed concatenation always
equals the non-streamed text."""
from __future__ import annotations

from typing import Iterable, Iterator


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def apply_stop_strings(pieces: Iterable[str], stops: list[str] | None) -> Iterator[str]:
    """Yield the text of `pieces` up to (not including) the first occurrence of any stop string, then stop
    consuming `pieces` (so a lazy generator behind them stops generating)."""
    if not stops:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut:
                yield held[:cut]
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # end generation now rather than when the generator is garbage-collected
            return
        keep = _held_suffix(held, stops)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
