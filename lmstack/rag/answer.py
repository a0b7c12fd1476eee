"""Response synthesis: answer a question from retrieved chunks with an LM (a local one, or an OpenAI-compatible chat
endpoint through chat.ChatClient), citing them as [1], [2], ...

Modes (SYNTHESIS_MODES):
- compact: the best chunks packed into one prompt, up to what the window holds (a chunk that does not fit is left
  out and a later, shorter one may still go in); one call.
- refine: walk the chunks in order; the first call answers from the leading chunks that fit, each next call gets
  the current answer and the next chunks that fit and is asked to improve it. Citation numbers are global (a chunk
  keeps its number across calls), so the final answer's [k] means the same chunk whichever call wrote it.
- tree_summarize: answer from each group of consecutive chunks that fits, then combine the partial answers, as many
  per call as fit, level by level until one remains.

Every prompt is measured with the writer's own count (the exact tokens generation sees, for a local LM) and
prompt + max_new_tokens never exceeds the context window; a chunk that cannot fit even alone is left out (and is not
among the sources). Citations: the sources are exactly the chunks given to the LM in some call, numbered from 1;
intermediate answers lose any [k] that names no chunk given so far, and the final answer's citations are checked:
`Answer.cited` lists the valid ones, `Answer.invalid` the numbers that name no given chunk. iter_answer streams the
final call's text (the earlier calls run silently)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LMStackError
from .chat import as_writer
from .index import Hit

SYNTHESIS_MODES = ("compact", "refine", "tree_summarize")
INSTRUCTION = ("Answer the question using only the numbered sources below. Cite the sources you use as [1], [2], "
               "... right after the statement they support. If the sources do not contain the answer, say so.")
REFINE_INSTRUCTION = ("Improve the existing answer to the question with the new numbered sources below: keep what is "
                      "still right, add or correct what the new sources say, and cite sources as [n] right after the "
                      "statement they support (keep the existing answer's citations). If the new sources do not "
                      "help, repeat the existing answer.")
COMBINE_INSTRUCTION = ("Combine the partial answers below into one answer to the question. Keep their source "
                       "citations [n] exactly as they are, and drop statements the partial answers contradict.")
CITATION_RE = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    text: str
    sources: list[Hit]                                # the chunks given to the LM, numbered from 1
    cited: list[int] = field(default_factory=list)    # source numbers the answer cites (all within `sources`)
    context_tokens: int = 0                           # tokens of the numbered source blocks given, all calls
    invalid: list[int] = field(default_factory=list)  # numbers the answer cites that name no given source
    steps: int = 1                                    # LM calls
    mode: str = "compact"

    def sources_block(self) -> str:
        return "\n".join(f"[{i}] {h.chunk.path}" + (f" — {' > '.join(h.chunk.headings)}" if h.chunk.headings else "")
                         for i, h in enumerate(self.sources, 1))


def pack_context(hits: list[Hit], count_tokens, budget: int) -> tuple[list[Hit], str, int]:
    """The leading hits whose numbered blocks fit in `budget` tokens together: (used hits, context text, tokens)."""
    used, blocks, total = [], [], 0
    for h in hits:
        block = source_block(len(used) + 1, h)
        n = count_tokens(block)
        if total + n > budget:
            continue  # a later, shorter chunk may still fit
        used.append(h)
        blocks.append(block)
        total += n
    return used, "\n".join(blocks), total


def source_block(number: int, h: Hit) -> str:
    return f"[{number}] ({h.chunk.title})\n{h.chunk.text.strip()}\n"


def citations(text: str, n_sources: int) -> list[int]:
    """The distinct source numbers [k] cited in `text` that exist (1..n_sources), in order of first citation."""
    out = []
    for m in CITATION_RE.finditer(text):
        k = int(m.group(1))
        if 1 <= k <= n_sources and k not in out:
            out.append(k)
    return out


def invalid_citations(text: str, n_sources: int) -> list[int]:
    """The distinct numbers [k] cited in `text` that name no source (outside 1..n_sources), in order."""
    out = []
    for m in CITATION_RE.finditer(text):
        k = int(m.group(1))
        if not 1 <= k <= n_sources and k not in out:
            out.append(k)
    return out


def scrub_citations(text: str, n_sources: int) -> str:
    """`text` without the [k] that name no source (so a later call cannot take them for real ones)."""
    return CITATION_RE.sub(lambda m: m.group(0) if 1 <= int(m.group(1)) <= n_sources else "", text)


class _Pack:
    """One call's numbered blocks: which items went in, the prompt, its token count, the blocks' own tokens."""

    def __init__(self, chosen, prompt, tokens, block_tokens):
        self.chosen, self.prompt, self.tokens, self.block_tokens = chosen, prompt, tokens, block_tokens


def _pack(w, message, items, make_block, first: int, max_new: int, consecutive: bool) -> _Pack:
    """Greedily add items (as make_block(number, item), numbered from `first`) to message(blocks) while the rendered
    prompt + max_new fits the window, measured exactly. consecutive: stop at the first item that does not fit once
    one is in (refine / tree groups); else skip it and try the next (compact). An item that does not fit alone is
    skipped either way."""
    chosen, blocks, block_tokens = [], [], 0
    tokens = w.count(w.render(message("")))
    for j, item in enumerate(items):
        b = make_block(first + len(chosen), item)
        nb = w.count_text(b)
        if tokens + nb + max_new <= w.context_window + len(blocks) + 1:  # cheap estimate (joins may merge tokens)
            prompt = w.render(message("\n".join(blocks + [b])))
            n = w.count(prompt)
            if n + max_new <= w.context_window:
                chosen.append(j)
                blocks.append(b)
                tokens, block_tokens = n, block_tokens + nb
                continue
        if consecutive and chosen:
            break
    return _Pack(chosen, w.render(message("\n".join(blocks))), tokens, block_tokens)


def _check_room(w, message, max_new: int) -> None:
    if w.count(w.render(message(""))) + max_new >= w.context_window:
        raise LMStackError(f"the model's context window ({w.context_window} tokens) leaves no room for sources after "
                           f"the question and max_new_tokens={max_new}; lower max_new_tokens")


def _generate(w, prompt: str, max_new: int, sampling: dict) -> str:
    return "".join(w.stream(prompt, max_new_tokens=max_new, **sampling)).strip()


def _answer_msg(question: str):
    return lambda ctx: f"{INSTRUCTION}\n\nSources:\n{ctx}\nQuestion: {question}"


def _refine_msg(question: str, current: str):
    return lambda ctx: (f"{REFINE_INSTRUCTION}\n\nQuestion: {question}\n\nExisting answer:\n{current}\n\n"
                        f"New sources:\n{ctx}")


def _combine_msg(question: str):
    return lambda ctx: f"{COMBINE_INSTRUCTION}\n\nQuestion: {question}\n\nPartial answers:\n{ctx}"


def _partial_block(number: int, text: str) -> str:
    return f"Partial answer {number}:\n{text}\n"


def _no_chunk_fits() -> LMStackError:
    return LMStackError("no retrieved chunk fits the context window; lower --chunk-tokens or max_new_tokens")


def _compact(w, question, hits, max_new, sampling):
    msg = _answer_msg(question)
    _check_room(w, msg, max_new)
    p = _pack(w, msg, hits, source_block, 1, max_new, consecutive=False)
    if not p.chosen:
        raise _no_chunk_fits()
    used = [hits[j] for j in p.chosen]
    parts = []
    for piece in w.stream(p.prompt, max_new_tokens=max_new, **sampling):
        parts.append(piece)
        yield piece
    yield _finish("".join(parts), used, p.block_tokens, 1, "compact")


def _refine(w, question, hits, max_new, sampling):
    _check_room(w, _answer_msg(question), max_new)
    sources, current, pos, steps, ctx_tokens = [], None, 0, 0, 0
    while pos < len(hits):
        msg = _answer_msg(question) if current is None else _refine_msg(question, current)
        p = _pack(w, msg, hits[pos:], source_block, len(sources) + 1, max_new, consecutive=True)
        if not p.chosen:
            if current is None:
                raise _no_chunk_fits()
            break  # the chunks left do not fit beside the current answer, even alone
        sources += [hits[pos + j] for j in p.chosen]
        pos += p.chosen[-1] + 1
        steps, ctx_tokens = steps + 1, ctx_tokens + p.block_tokens
        if pos >= len(hits):  # the last call: stream it
            parts = []
            for piece in w.stream(p.prompt, max_new_tokens=max_new, **sampling):
                parts.append(piece)
                yield piece
            yield _finish("".join(parts), sources, ctx_tokens, steps, "refine")
            return
        current = scrub_citations(_generate(w, p.prompt, max_new, sampling), len(sources)) or "(no answer yet)"
    yield current
    yield _finish(current, sources, ctx_tokens, steps, "refine")


def _tree(w, question, hits, max_new, sampling):
    msg = _answer_msg(question)
    _check_room(w, msg, max_new)
    groups, sources, pos, ctx_tokens = [], [], 0, 0
    while pos < len(hits):
        p = _pack(w, msg, hits[pos:], source_block, len(sources) + 1, max_new, consecutive=True)
        if not p.chosen:
            break  # none of the rest fits even alone
        sources += [hits[pos + j] for j in p.chosen]
        pos += p.chosen[-1] + 1
        groups.append(p)
        ctx_tokens += p.block_tokens
    if not groups:
        raise _no_chunk_fits()
    if len(groups) == 1:
        prompts, texts, steps = [groups[0].prompt], [], 0
    else:
        texts = [scrub_citations(_generate(w, g.prompt, max_new, sampling), len(sources)) for g in groups]
        prompts, steps = [], len(groups)
        cmsg = _combine_msg(question)
        while len(texts) > 1:
            level, i = [], 0  # each entry: a combining prompt, or (a lone last answer) the text going up as it is
            while i < len(texts):
                if len(texts) - i == 1:
                    level.append(("keep", texts[i]))
                    break
                p = _pack(w, cmsg, texts[i:], _partial_block, 1, max_new, consecutive=True)
                if len(p.chosen) < 2 or p.chosen[0] != 0:
                    raise LMStackError(f"two partial answers do not fit one combining prompt in the context window "
                                       f"({w.context_window} tokens); lower max_new_tokens")
                level.append(("call", p.prompt))
                i += p.chosen[-1] + 1
            if len(level) == 1:
                prompts = [level[0][1]]
                break
            texts = [v if kind == "keep" else scrub_citations(_generate(w, v, max_new, sampling), len(sources))
                     for kind, v in level]
            steps += sum(kind == "call" for kind, _ in level)
    parts = []
    for piece in w.stream(prompts[0], max_new_tokens=max_new, **sampling):
        parts.append(piece)
        yield piece
    yield _finish("".join(parts), sources, ctx_tokens, steps + 1, "tree_summarize")


def _finish(text: str, sources: list[Hit], ctx_tokens: int, steps: int, mode: str) -> Answer:
    text = text.strip()
    return Answer(text, sources, citations(text, len(sources)), ctx_tokens, invalid_citations(text, len(sources)),
                  steps, mode)


def iter_answer(lm, question: str, hits: list[Hit], max_new_tokens: int = 256, mode: str = "compact", **sampling):
    """Stream an answer: yields the final call's text as it is generated (str pieces), then, last, the finished
    `Answer`. lm: an lmstack LM (its chat template when it has one; greedy unless sampling says otherwise) or a
    chat.ChatClient. mode: one of SYNTHESIS_MODES."""
    if mode not in SYNTHESIS_MODES:
        raise LMStackError(f"synthesis mode must be one of {', '.join(SYNTHESIS_MODES)}, got {mode!r}")
    if not hits:
        raise LMStackError("nothing was retrieved to answer from; check the index and the query")
    w = as_writer(lm)
    run = {"compact": _compact, "refine": _refine, "tree_summarize": _tree}[mode]
    yield from run(w, question, list(hits), max_new_tokens, sampling)


def answer(lm, question: str, hits: list[Hit], max_new_tokens: int = 256, mode: str = "compact",
           **sampling) -> Answer:
    """Answer `question` from `hits` with `lm` (see iter_answer)."""
    *_, final = iter_answer(lm, question, hits, max_new_tokens, mode, **sampling)
    return final
