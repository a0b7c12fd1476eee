"""LM-written summaries to index beside the chunks (`lmstack index build ... --summaries`), for `summary` retrieval
(rank the summaries, route to their documents, rank those documents' chunks).

What is summarised, per document:
- the whole document (heading path []);
- every long section: consecutive chunks under one heading path, more than SECTION_MIN_CHUNKS (3) of them, unless
  the section is the whole document (its summary would repeat the document's).

A summarizer is any callable text -> summary wrapped in `Summarizer`, which also knows how much input one call
takes (`fits`). Text that does not fit is summarised hierarchically, never truncated: it is cut into parts that fit
(the chunker's clean cuts: headings, paragraphs, sentences), each part is summarised, the summaries are joined and
summarised again, until one call covers it all.

    s = lm_summarizer(lmstack.load("SmolLM2-135M-Instruct.Q4_1.gguf"))   # or remote_summarizer(url, model)
    build_index(["docs/"], "runs/idx", summarizer=s)

A document that does not fit one call is summarised from its text with each long section replaced by that section's
summary (so no text is read twice). Calls are batched: build_index summarises SUMMARY_GROUP documents at a time,
every call of one level in one batch (a local LM decodes them together with continuous batching, several times the
throughput of one at a time on a CPU).

What is embedded for a summary is its document title and heading path followed by the summary (the stored text is
the summary alone)."""
from __future__ import annotations

from typing import Callable

from ..errors import LMStackError
from .chat import ChatClient, as_writer
from .chunking import Chunk, chunk_text

SECTION_MIN_CHUNKS = 3       # a section with more chunks than this gets its own summary
SUMMARY_MAX_NEW_TOKENS = 96
SUMMARY_INPUT_TOKENS = 1536  # default input per call: small models summarise shorter inputs better, and faster
SUMMARY_BATCH = 16           # rows a local LM decodes at once
SUMMARY_GROUP = 8            # documents build_index summarises together (and writes when all are done)
INSTRUCTION = ("Summarise the following text in two or three sentences. Name its main topic and the key terms, "
               "functions or commands it describes.\n\nText:\n")


class Summarizer:
    """fn(text) -> summary; fn_batch(texts) -> summaries, when the model can do several at once. fits(text): whether
    one call takes `text` (default: count_tokens(text) <= max_input_tokens). `calls` counts the texts summarised;
    `name` is recorded in the index (meta summary_model); batch_size: documents build_index summarises together."""

    def __init__(self, name: str, fn: Callable[[str], str], count_tokens: Callable[[str], int] | None = None,
                 max_input_tokens: int = SUMMARY_INPUT_TOKENS, fits: Callable[[str], bool] | None = None,
                 fn_batch: Callable[[list[str]], list[str]] | None = None, batch_size: int = 1):
        if max_input_tokens < 16:
            raise LMStackError(f"a summarizer needs at least 16 input tokens per call, got {max_input_tokens}; use a "
                               "model with a larger context window or lower the summary length")
        self.name, self.fn, self.max_input_tokens = name, fn, int(max_input_tokens)
        self.count_tokens = count_tokens or (lambda s: max(1, len(s) // 4))
        self._fits, self.fn_batch, self.batch_size = fits, fn_batch, max(1, int(batch_size))
        self.calls = 0

    def fits(self, text: str) -> bool:
        return self._fits(text) if self._fits else self.count_tokens(text) <= self.max_input_tokens

    def __call__(self, text: str) -> str:
        return self.many([text])[0]

    def many(self, texts: list[str]) -> list[str]:
        self.calls += len(texts)
        if self.fn_batch is not None and len(texts) > 1:
            return [t.strip() for t in self.fn_batch(list(texts))]
        return [self.fn(t).strip() for t in texts]


def as_summarizer(obj) -> Summarizer | None:
    """A Summarizer as it is; a plain callable text -> summary wrapped in one (named after the function)."""
    if obj is None or isinstance(obj, Summarizer):
        return obj
    if not callable(obj):
        raise LMStackError(f"summarizer= takes a Summarizer or a function text -> summary, got {type(obj).__name__}")
    return Summarizer(getattr(obj, "__name__", type(obj).__name__), obj)


def writer_summarizer(writer, max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
                      max_input_tokens: int | None = SUMMARY_INPUT_TOKENS, name: str | None = None) -> Summarizer:
    """A Summarizer over a writer (chat.py: a local LM or a ChatClient): INSTRUCTION + text, greedy, at most
    max_new_tokens; one call's prompt plus max_new_tokens always fits the context window."""
    w = as_writer(writer)
    room = w.context_window - max_new_tokens - w.count(w.render(INSTRUCTION)) - 8  # 8: tokens merging at the join
    if room < 16:
        raise LMStackError(f"the summary model's context window ({w.context_window} tokens) leaves no room for text "
                           f"after the instruction and {max_new_tokens} summary tokens; use a larger model")
    limit = min(room, max_input_tokens or room)

    def fits(text: str) -> bool:
        return (w.count_text(text) <= limit
                and w.count(w.render(INSTRUCTION + text)) + max_new_tokens <= w.context_window)

    def fn(text: str) -> str:
        return "".join(w.stream(w.render(INSTRUCTION + text), max_new_tokens=max_new_tokens))
    fn_batch = None
    lm = getattr(w, "lm", None)
    if lm is not None and hasattr(lm, "generate_batch"):
        def fn_batch(texts: list[str]) -> list[str]:
            return lm.generate_batch([w.render(INSTRUCTION + t) for t in texts], max_batch=SUMMARY_BATCH,
                                     max_new_tokens=max_new_tokens, temperature=0.0)
    return Summarizer(name or w.name.rsplit("/", 1)[-1], fn, w.count_text, limit, fits, fn_batch,
                      SUMMARY_GROUP if fn_batch else 1)


def lm_summarizer(lm_or_path, max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
                  max_input_tokens: int | None = SUMMARY_INPUT_TOKENS) -> Summarizer:
    """A Summarizer over a local model: an LM, or a path lmstack.load takes (checkpoint, HF dir, GGUF)."""
    lm = lm_or_path
    if isinstance(lm_or_path, (str, bytes)) or hasattr(lm_or_path, "__fspath__"):
        from ..lm import load
        lm = load(lm_or_path)
    return writer_summarizer(lm, max_new_tokens, max_input_tokens)


def remote_summarizer(base_url: str, model: str, api_key: str | None = None, context_window: int = 4096,
                      max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
                      max_input_tokens: int | None = SUMMARY_INPUT_TOKENS) -> Summarizer:
    """A Summarizer over an OpenAI-compatible /v1/chat/completions endpoint."""
    return writer_summarizer(ChatClient(base_url, model, api_key, context_window), max_new_tokens, max_input_tokens,
                             name=model)


def split_for_summary(text: str, summarizer: Summarizer, header: str = "") -> list[str]:
    """`text` cut into two or more parts that each fit one call beside `header` (the chunker's clean cuts)."""
    budget = summarizer.max_input_tokens - summarizer.count_tokens(header)
    while budget >= 8:
        pieces = chunk_text(text, summarizer.count_tokens, budget, 0)
        parts, first = [], 0  # consecutive pieces merged up to the budget (chunks stop at headings; parts need not)
        for j in range(1, len(pieces) + 1):
            if j == len(pieces) or summarizer.count_tokens(text[pieces[first].start:pieces[j].end]) > budget:
                parts.append(text[pieces[first].start:pieces[j - 1].end])
                first = j
        if len(parts) > 1 and all(summarizer.fits(header + p) for p in parts):
            return parts
        budget //= 2  # the parts' counts ran short of the real prompts' (or one part was all of it)
    raise LMStackError(f"a piece of text does not fit one summary call even alone ({text[:60]!r}...); use a model "
                       "with a larger context window")


def summarize_many(items: list[tuple[str, str]], summarizer: Summarizer) -> list[str]:
    """One summary per (header, text), hierarchically where a text does not fit one call: its parts are summarised,
    joined, and the join summarised again. All calls of one level go to the summarizer together (one batch)."""
    results = [""] * len(items)
    todo = {i: t.strip() for i, (_, t) in enumerate(items) if t.strip()}
    while todo:
        calls, plan = [], {}
        for i, text in todo.items():
            header = items[i][0]
            parts = [text] if summarizer.fits(header + text) else split_for_summary(text, summarizer, header)
            plan[i] = (len(parts) == 1, range(len(calls), len(calls) + len(parts)))
            calls += [header + p for p in parts]
        outs = summarizer.many(calls)
        nxt = {}
        for i, (final, span) in plan.items():
            if final:
                results[i] = outs[span[0]]
                continue
            joined = "\n\n".join(outs[j] for j in span if outs[j])
            if summarizer.count_tokens(joined) >= summarizer.count_tokens(todo[i]):
                raise LMStackError("the summaries are not shorter than the text they summarise; lower the summary "
                                   "length (--summary-tokens) or raise the input per call")
            nxt[i] = joined
        todo = nxt
    return results


def summarize_text(text: str, summarizer: Summarizer, header: str = "") -> str:
    """One summary of `text` (prefixed by `header`, e.g. the title, in every call); see summarize_many."""
    return summarize_many([(header, text)], summarizer)[0]


def sections(chunks: list[Chunk], min_chunks: int = SECTION_MIN_CHUNKS) -> list[tuple[list[str], int, int]]:
    """(heading path, start, end) of every run of consecutive chunks under one heading path that has more than
    `min_chunks` chunks and is not the whole document."""
    out, i = [], 0
    while i < len(chunks):
        j = i
        while j + 1 < len(chunks) and chunks[j + 1].headings == chunks[i].headings:
            j += 1
        if j - i + 1 > min_chunks and not (i == 0 and j == len(chunks) - 1):
            out.append((list(chunks[i].headings), chunks[i].start, chunks[j].end))
        i = j + 1
    return out


def summarize_documents(docs: list[tuple[str, str, list[Chunk]]], summarizer: Summarizer,
                        min_chunks: int = SECTION_MIN_CHUNKS) -> list[list[tuple[str, list[str]]]]:
    """For each (title, text, chunks): [(summary, heading path)], the document's own ([]) first, then one per long
    section in document order. Sections first (all documents' in one batch); then the documents, where one does
    not fit a call with its long sections replaced by their summaries."""
    secs = [(d, h, a, b) for d, (_, _, chunks) in enumerate(docs) for h, a, b in sections(chunks, min_chunks)]
    sec_out = summarize_many([(f"{docs[d][0]} — {' > '.join(h)}\n\n", docs[d][1][a:b]) for d, h, a, b in secs],
                             summarizer)
    items = []
    for d, (title, text, _) in enumerate(docs):
        header = f"{title}\n\n"
        if not summarizer.fits(header + text.strip()):
            pieces, pos = [], 0
            for (dd, h, a, b), s in zip(secs, sec_out):
                if dd == d:
                    pieces += [text[pos:a], f"(Section {' > '.join(h)}, in summary:) {s}\n\n"]
                    pos = b
            text = "".join(pieces) + text[pos:]
        items.append((header, text))
    doc_out = summarize_many(items, summarizer)
    out = [[(s, [])] if s else [] for s in doc_out]
    for (d, h, _, _), s in zip(secs, sec_out):
        if s:
            out[d].append((s, h))
    return out


def document_summaries(title: str, text: str, chunks: list[Chunk], summarizer: Summarizer,
                       min_chunks: int = SECTION_MIN_CHUNKS) -> list[tuple[str, list[str]]]:
    """[(summary, heading path)] of one document (see summarize_documents)."""
    return summarize_documents([(title, text, chunks)], summarizer, min_chunks)[0]


def embed_text(title: str, summary: str, headings: list[str]) -> str:
    """The text embedded for a summary: title, heading path, summary."""
    return f"{title}" + (f" — {' > '.join(headings)}" if headings else "") + f"\n{summary}"


def check_summary_settings(meta: dict, has_documents: bool, summarizer: Summarizer | None, out) -> dict:
    """The meta keys to record for this build; raises when the build would mix summarised and unsummarised documents
    or two summary models."""
    built = meta.get("summaries") == "1" and has_documents
    if summarizer is None:
        if built:
            raise LMStackError(f"{out} has summaries (by {meta.get('summary_model')}); pass --summaries with the same "
                               "--summary-model to update it, or build into a new --out directory")
        return {}
    if built and meta.get("summary_model") != summarizer.name:
        raise LMStackError(f"{out} was built with summary_model={meta.get('summary_model')}, not {summarizer.name}; "
                           "pass the same --summary-model or build into a new --out directory")
    return {"summaries": "1", "summary_model": summarizer.name}
