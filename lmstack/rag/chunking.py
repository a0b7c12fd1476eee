"""Token-aware, structure-following chunking of one document's text.

    chunks = chunk_text(doc.text, lambda s: len(tok.encode(s)), chunk_tokens=256, overlap=32)
    assert all(doc.text[c.start:c.end] == c.text for c in chunks)

How a text is cut:
1. Sections: a new section starts at every heading — Markdown "# ..." (at column 0), setext / reStructuredText
   underlined titles ("Title" over a line of = - ~ ^ * + # " ' ` : . of 3 or more) and rst over+underlined titles.
   Heading levels: the number of # for ATX headings; for underline styles, the order in which the styles first
   appear (the rst rule; "===" then "---" gives 1 and 2, as in Markdown). Lines inside ``` / ~~~ fences are never
   headings. A chunk never spans two sections, so its `headings` (the path of titles, outermost first) holds for
   all of its text. A section with no text of its own before its first subsection ("# Install" right above
   "## From source") is glued to it, and the chunk's path is that of the last heading: ["Install", "From source"].
2. Blocks: paragraphs (blank-line separated), fenced code blocks (``` or ~~~, blank lines inside included),
   indented code blocks (4+ spaces or a tab after a blank line, or any indentation after a line ending in "::").
   A block that fits the budget stays whole.
3. A block over the budget is split: prose into sentences, code into lines; a piece still over it into words.
   Cuts are only ever at whitespace, never inside a word; a single word over the budget becomes a chunk by itself.
4. Packing: consecutive pieces of a section are packed greedily up to `chunk_tokens`. The estimate is the sum of
   the pieces' own counts (each piece and each distinct whitespace gap counted once, cached); every chunk is then
   measured with `count_tokens` itself and shortened by a piece if it is over, so no chunk is over `chunk_tokens`
   as `count_tokens` measures it (unless it is one over-long word).
5. Overlap: a chunk after the first of its section starts with the last whole words of the previous chunk, as many
   as fit in `overlap` tokens (measured with `count_tokens`; overlap never crosses a heading, since chunks do not).
   When the overlap and the next piece do not both fit, the overlap is shortened, down to none.
Offsets are honest: `text == doc_text[start:end]`; leading/trailing whitespace is left out by moving the offsets,
never by editing the text. No chunk is empty. count_tokens is called about once per paragraph, once per chunk and a
few times per overlap (binary search over the trailing words).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import LMStackError


@dataclass
class Chunk:
    text: str
    start: int          # character offsets into Document.text: text == doc.text[start:end]
    end: int
    headings: list[str] = field(default_factory=list)  # heading path at the chunk's start, e.g. ["Install", "From source"]


ATX_RE = re.compile(r"^(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$|^(#{1,6})[ \t]*$")
UNDERLINE_RE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}[ \t]*$")
FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(\s+)")
WORD_RE = re.compile(r"\S+")
LINE_RE = re.compile(r"[^\n]+")


@dataclass
class _Section:
    headings: list[str]
    blocks: list[tuple[int, int, str]]   # (start, end, kind) with kind in heading | para | code
    has_body: bool = False


def _indent(line: str) -> int:
    n = 0
    for ch in line:
        if ch == " ":
            n += 1
        elif ch == "\t":
            n += 4 - n % 4
        else:
            break
    return n


def parse_sections(text: str) -> list[_Section]:
    """Split `text` into sections (at headings) of blocks, with offsets (content only, whitespace trimmed)."""
    return _SectionParser(text).parse()


class _SectionParser:
    """One pass over the lines: fenced code, indented (or rst literal) code, ATX / underlined / overlined headings,
    paragraphs. Each step returns the next line index."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.starts, pos = [], 0
        for ln in self.lines:
            self.starts.append(pos)
            pos += len(ln) + 1
        self.sections = [_Section([], [])]
        self.stack: list[tuple[int, str]] = []       # (level, title) of the open headings
        self.styles: list[tuple[str, str]] = []      # underline styles in order of first use = their levels
        self.prev_blank = True                       # the previous line was blank (or there was none)
        self.literal_next = False                    # the previous paragraph ended with "::" (rst literal block)

    def span(self, i: int, j: int) -> tuple[int, int]:
        """Trimmed character span of lines i..j-1 (the caller guarantees some content)."""
        lines, starts = self.lines, self.starts
        return (starts[i] + (len(lines[i]) - len(lines[i].lstrip())), starts[j - 1] + len(lines[j - 1].rstrip()))

    def heading(self, level_key, title: str, i: int, j: int) -> int:
        if level_key[0] == "atx":
            level = level_key[1]
        else:
            if level_key not in self.styles:
                self.styles.append(level_key)
            level = self.styles.index(level_key) + 1
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))
        cur = self.sections[-1]
        if cur.has_body:  # else: a section with only headings so far is glued to this one
            cur = _Section([], [])
            self.sections.append(cur)
        cur.blocks.append((*self.span(i, j), "heading"))
        cur.headings = [t for _, t in self.stack]
        self.prev_blank, self.literal_next = True, False
        return j

    def body(self, i: int, j: int, kind: str) -> int:
        self.sections[-1].blocks.append((*self.span(i, j), kind))
        self.sections[-1].has_body = True
        self.prev_blank = False
        self.literal_next = kind == "para" and self.lines[j - 1].rstrip().endswith("::")
        return j

    def fenced(self, i: int, fence: str) -> int:
        lines, n, j = self.lines, len(self.lines), i + 1
        while j < n and not (lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])):
            j += 1
        j = min(j + 1, n)
        while j > i + 1 and not lines[j - 1].strip():  # an unclosed fence runs to the end: not its blank lines
            j -= 1
        return self.body(i, j, "code")

    def indented(self, i: int, ind: int) -> int:
        lines, n = self.lines, len(self.lines)
        j, last, need = i + 1, i, min(ind, 4 if not self.literal_next else 1)
        while j < n and (not lines[j].strip() or _indent(lines[j]) >= need):
            if lines[j].strip():
                last = j
            j += 1
        return self.body(i, last + 1, "code")

    def setext(self, i: int) -> int | None:
        """An underlined (or over- and underlined) heading at line i: the next line index, else None."""
        lines, n, line = self.lines, len(self.lines), self.lines[i]
        um = UNDERLINE_RE.match(line)
        if (um and i + 2 < n and lines[i + 1].strip() and not UNDERLINE_RE.match(lines[i + 1])
                and lines[i + 2].strip() == line.strip()):
            return self.heading(("over", um.group(1)), lines[i + 1].strip(), i, i + 3)
        if not um and i + 1 < n:
            un = UNDERLINE_RE.match(lines[i + 1])
            if un:
                return self.heading(("under", un.group(1)), line.strip(), i, i + 2)
        return None

    def paragraph(self, i: int) -> int:
        """Up to a blank line, a fence or an ATX heading."""
        lines, n, j = self.lines, len(self.lines), i + 1
        while j < n and lines[j].strip() and not FENCE_RE.match(lines[j]) and not ATX_RE.match(lines[j]):
            j += 1
        return self.body(i, j, "para")

    def step(self, i: int) -> int:
        line = self.lines[i]
        if not line.strip():
            self.prev_blank = True
            return i + 1
        m = FENCE_RE.match(line)
        if m:
            return self.fenced(i, m.group(1))
        ind = _indent(line)
        if self.prev_blank and (ind >= 4 or (self.literal_next and ind > 0)):
            return self.indented(i, ind)
        am = ATX_RE.match(line)
        if am:  # an ATX heading (at column 0) may interrupt a paragraph
            return self.heading(("atx", len(am.group(1) or am.group(3))), (am.group(2) or "").strip(), i, i + 1)
        if self.prev_blank and ind == 0:
            j = self.setext(i)
            if j is not None:
                return j
        return self.paragraph(i)

    def parse(self) -> list[_Section]:
        i = 0
        while i < len(self.lines):
            i = self.step(i)
        return [s for s in self.sections if s.blocks]


class _Counter:
    """count_tokens with a cache (by string) and the additive estimate used for packing."""

    def __init__(self, count_tokens: Callable[[str], int]):
        self.fn = count_tokens
        self.cache: dict[str, int] = {}
        self.base = max(0, int(count_tokens("")))  # tokens every call adds (e.g. [CLS] [SEP]); usually 0

    def __call__(self, s: str) -> int:
        n = self.cache.get(s)
        if n is None:
            n = self.cache[s] = int(self.fn(s))
        return n

    def extra(self, s: str) -> int:
        """Tokens `s` adds to a concatenation (its own count less the per-call constant)."""
        return max(0, self(s) - self.base)


def chunk_text(text: str, count_tokens: Callable[[str], int], chunk_tokens: int = 256,
               overlap: int = 32) -> list[Chunk]:
    """Cut `text` into chunks of at most `chunk_tokens` tokens (as `count_tokens` measures), following its headings,
    paragraphs, code blocks, sentences and words, consecutive chunks of a section overlapping by about `overlap`
    tokens of whole words. See the module docstring for the rules."""
    if not isinstance(chunk_tokens, int) or not isinstance(overlap, int) or not chunk_tokens > overlap >= 0:
        raise LMStackError(f"chunk_tokens={chunk_tokens!r}, overlap={overlap!r}: need whole numbers with "
                           "chunk_tokens > overlap >= 0 (e.g. --chunk-tokens 256 --overlap 32)")
    count = _Counter(count_tokens)
    out: list[Chunk] = []
    for sec in parse_sections(text):
        units: list[tuple[int, int]] = []
        for s, e, kind in sec.blocks:
            levels = {"para": (SENTENCE_END_RE, WORD_RE), "code": (LINE_RE, WORD_RE), "heading": (WORD_RE,)}[kind]
            _split(text, s, e, levels, count, chunk_tokens, units)
        _pack(text, units, sec.headings, count, chunk_tokens, overlap, out)
    return out


def _pieces(text: str, s: int, e: int, regex: re.Pattern) -> list[tuple[int, int]]:
    """Sub-spans of text[s:e]: sentences (cut at the whitespace after . ! ?), lines or words, trimmed."""
    seg = text[s:e]
    if regex is SENTENCE_END_RE:
        spans, a = [], 0
        for m in regex.finditer(seg):
            spans.append((a, m.start(1)))
            a = m.end(1)
        spans.append((a, len(seg)))
    else:
        spans = [(m.start(), m.end()) for m in regex.finditer(seg)]
    out = []
    for a, b in spans:
        piece = seg[a:b]
        stripped = piece.strip()
        if stripped:
            a2 = a + (len(piece) - len(piece.lstrip()))
            out.append((s + a2, s + a2 + len(stripped)))
    return out


def _split(text, s, e, levels, count, budget, units) -> None:
    if count(text[s:e]) <= budget or not levels:
        units.append((s, e))
        return
    pieces = _pieces(text, s, e, levels[0])
    if len(pieces) <= 1:
        _split(text, s, e, levels[1:], count, budget, units)
        return
    for a, b in pieces:
        _split(text, a, b, levels[1:], count, budget, units)


def _overlap_start(text: str, prev_s: int, prev_e: int, target: int, count) -> int | None:
    """Start of the longest run of trailing whole words of text[prev_s:prev_e] (not all of it) within `target`
    tokens, or None."""
    if target <= 0:
        return None
    words = [m.start() for m in WORD_RE.finditer(text, prev_s, prev_e)]
    hi = min(len(words) - 1, target)  # every word is at least one token
    lo = 0
    while lo < hi:  # largest k with count(last k words) <= target
        mid = (lo + hi + 1) // 2
        if count(text[words[-mid]:prev_e]) <= target:
            lo = mid
        else:
            hi = mid - 1
    return words[-lo] if lo > 0 else None


def _pack(text, units, headings, count, budget, overlap, out) -> None:
    i, n, prev = 0, len(units), None
    while i < n:
        gap_i = count.extra(text[prev[1]:units[i][0]]) if prev else 0
        first = count.extra(text[units[i][0]:units[i][1]])
        ov = None
        if prev is not None and overlap > 0:
            ov = _overlap_start(text, prev[0], prev[1], min(overlap, budget - count.base - first - gap_i), count)
        est = count.base + (count.extra(text[ov:prev[1]]) + gap_i if ov is not None else 0) + first
        j = i + 1
        while j < n:
            add = count.extra(text[units[j - 1][1]:units[j][0]]) + count.extra(text[units[j][0]:units[j][1]])
            if est + add > budget:
                break
            est += add
            j += 1
        while True:  # measure the real chunk; shorten it by a piece (then drop the overlap) while it is over
            start = ov if ov is not None else units[i][0]
            end = units[j - 1][1]
            if count(text[start:end]) <= budget:
                break
            if j - 1 > i:
                j -= 1
            elif ov is not None:
                ov = None
            else:
                break  # one piece that is over the budget: a single over-long word
        out.append(Chunk(text[start:end], start, end, list(headings)))
        prev = (start, end)
        i = j
