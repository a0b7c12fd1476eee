"""Response synthesis, `compact` mode: the best chunks packed into the model's context window up to a token budget
(never over), numbered [1], [2], ...; the model answers citing them; the citations are checked against the chunks
that were actually in the context, and the answer comes with the numbered source list."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LMStackError
from .index import Hit

INSTRUCTION = ("Answer the question using only the numbered sources below. Cite the sources you use as [1], [2], "
               "... right after the statement they support. If the sources do not contain the answer, say so.")


@dataclass
class Answer:
    text: str
    sources: list[Hit]                                # the chunks in the context, numbered from 1
    cited: list[int] = field(default_factory=list)    # source numbers the answer cites (all within `sources`)
    context_tokens: int = 0

    def sources_block(self) -> str:
        return "\n".join(f"[{i}] {h.chunk.path}" + (f" — {' > '.join(h.chunk.headings)}" if h.chunk.headings else "")
                         for i, h in enumerate(self.sources, 1))


def pack_context(hits: list[Hit], count_tokens, budget: int) -> tuple[list[Hit], str, int]:
    """The leading hits whose numbered blocks fit in `budget` tokens together: (used hits, context text, tokens)."""
    used, blocks, total = [], [], 0
    for h in hits:
        block = f"[{len(used) + 1}] ({h.chunk.title})\n{h.chunk.text.strip()}\n"
        n = count_tokens(block)
        if total + n > budget:
            continue  # a later, shorter chunk may still fit
        used.append(h)
        blocks.append(block)
        total += n
    return used, "\n".join(blocks), total


def citations(text: str, n_sources: int) -> list[int]:
    """The distinct source numbers [k] cited in `text` that exist (1..n_sources), in order of first citation."""
    out = []
    for m in re.finditer(r"\[(\d+)\]", text):
        k = int(m.group(1))
        if 1 <= k <= n_sources and k not in out:
            out.append(k)
    return out


def iter_answer(lm, question: str, hits: list[Hit], max_new_tokens: int = 256, mode: str = "compact", **sampling):
    """Stream an answer: yields the text as it is generated (str pieces), then, last, the finished `Answer`."""
    if mode != "compact":
        raise LMStackError(f"synthesis mode must be compact, got {mode!r}")
    tok = lm.tokenizer
    def render(context: str) -> str:
        msg = f"{INSTRUCTION}\n\nSources:\n{context}\nQuestion: {question}"
        if tok.chat_template:
            return lm.chat_prompt([{"role": "user", "content": msg}])
        return msg + "\nAnswer:"
    overhead = len(tok.encode(render("")))
    budget = lm.config.block_size - max_new_tokens - overhead
    if budget <= 0:
        raise LMStackError(f"the model's context window ({lm.config.block_size} tokens) leaves no room for sources "
                           f"after the question and max_new_tokens={max_new_tokens}; lower max_new_tokens")
    count = lambda s: len(tok.encode(s))  # noqa: E731
    used, context, n = pack_context(hits, count, budget)
    prompt = render(context)
    while used and count(prompt) + max_new_tokens > lm.config.block_size:  # tokens can merge across block joins
        used, context, n = pack_context(used[:-1], count, budget)
        prompt = render(context)
    if not used:
        raise LMStackError("no retrieved chunk fits the context window; lower --chunk-tokens or max_new_tokens")
    stop_ids = tok.end_of_turn_ids if tok.chat_template else None
    parts = []
    for piece in lm.stream(prompt, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                           **{"temperature": 0.0, **sampling}):
        parts.append(piece)
        yield piece
    text = "".join(parts)
    yield Answer(text.strip(), used, citations(text, len(used)), n)


def answer(lm, question: str, hits: list[Hit], max_new_tokens: int = 256, mode: str = "compact",
           **sampling) -> Answer:
    """Answer `question` from `hits` with `lm` (its chat template when it has one)."""
    *_, final = iter_answer(lm, question, hits, max_new_tokens, mode, **sampling)
    return final
