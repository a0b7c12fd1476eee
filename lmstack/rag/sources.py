"""Documents to index: files, folders, globs, .jsonl records and the built-in `pydocs` corpus -> `Document`s.

    for doc in iter_documents(["notes/", "README.md", "docs/**/*.rst", "faq.jsonl", "pydocs"]): ...

    src = DocumentSource(["notes/"])     # the same, keeping what was skipped
    docs = list(src); src.skipped        # ['notes/logo.png', ...]; src.reasons[path] says why

Supported files: .txt .md .markdown .rst .html .htm .pdf (needs `pip install pypdf`, imported only when a PDF is
read) and .jsonl (one document per line: a string `text` field, optional `title` and `id`).

Rules:
- An explicitly named file must exist and be supported text: a missing path, an unsupported suffix, a binary file
  (NUL bytes, or not UTF-8) is an LMStackError naming the file and the fix.
- Folders are walked recursively in sorted order; hidden files and folders (".git", ".venv", ...) are ignored;
  unsupported and binary files are skipped silently but recorded in `DocumentSource.skipped` (with the reason in
  `DocumentSource.reasons`). A glob's matches are treated like a folder's files; a glob matching nothing is an error.
- Documents whose text is empty (only whitespace) are skipped and recorded the same way.
- A file reached twice (named twice, or by a folder and a glob) is read once.
- `path` is the file path as given or as found under the folder; a .jsonl record's path is `<file>:<id>` when the
  record has an `id` (stable when lines are inserted: good for incremental re-indexing), else `<file>:<line>`;
  a pydocs topic's path is `pydocs:<topic>` and its title the topic name.
- Titles: Markdown/rst first heading, HTML <title> (else first <h1>), PDF metadata title (else first line), .jsonl
  `title` field (else the `id`, else `<stem>:<line>`); otherwise the file stem.
- `text` has "\\r\\n" / "\\r" normalised to "\\n" and a UTF-8 BOM dropped; HTML is reduced to text with headings as
  "# ..." lines (the level as the number of #), <pre> as ``` fenced blocks, list items as "- " lines, and
  script/style dropped. `sha256` is the hex SHA-256 of the UTF-8 `text` (the content hash re-indexing compares).
"""
from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from ..errors import LMStackError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
SUPPORTED = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf", ".jsonl")
SUPPORTED_LIST = " ".join(SUPPORTED)
BUILTIN_SOURCES = ("pydocs",)


@dataclass
class Document:
    path: str      # source path as given/resolved (or "pydocs:<topic>", or "<file>.jsonl:<line or id>")
    title: str     # first heading / <title> / file stem / jsonl "title" field
    text: str      # plain text (HTML reduced to text with headings kept as markdown-style "# ..." lines)
    sha256: str    # hash of the text (content hash for incremental re-indexing)


def make_document(path: str, title: str, text: str) -> Document:
    return Document(path, title, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


class DocumentSource:
    """The documents of `sources`, streamed; iterate it once. After (or during) iteration `skipped` lists the paths
    that were passed over (unsupported or binary files inside folders/globs, empty documents) and `reasons[path]`
    says why. Errors (missing path, bad explicit file, empty `sources`) are raised when iteration reaches them;
    an empty `sources` list is rejected at once."""

    def __init__(self, sources: list[str]):
        if isinstance(sources, (str, Path)):
            sources = [str(sources)]
        self.sources = [str(s) for s in sources]
        if not self.sources:
            raise LMStackError("no sources given; pass one or more files, folders, globs, .jsonl files or 'pydocs'")
        self.skipped: list[str] = []
        self.reasons: dict[str, str] = {}
        self._seen: set[str] = set()

    def __iter__(self) -> Iterator[Document]:
        for spec in self.sources:
            if spec in BUILTIN_SOURCES:
                if spec not in self._seen:
                    self._seen.add(spec)
                    yield from self._keep(pydocs_documents())
                continue
            for path, explicit in self._expand(spec):
                key = str(path.resolve())
                if key in self._seen:
                    continue
                self._seen.add(key)
                yield from self._keep(self._read(path, explicit))

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append(path)
        self.reasons[path] = reason

    def _keep(self, docs: Iterator[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.text.strip():
                yield doc
            else:
                self._skip(doc.path, "empty text")

    def _expand(self, spec: str) -> Iterator[tuple[Path, bool]]:
        """(file, named explicitly) for a file, folder or glob spec."""
        p = Path(spec)
        if p.is_file():
            yield p, True
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") for part in rel):
                    yield f, False
        elif glob.has_magic(spec):
            files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not files:
                raise LMStackError(f"source {spec!r} matches no files; check the pattern (quote it so the shell does "
                                   "not expand it) or pass a file or folder")
            for f in files:
                yield f, False
        else:
            raise LMStackError(f"source {spec!r} does not exist; pass an existing file, folder or glob, a .jsonl file "
                               f"or one of the built-in sources ({', '.join(BUILTIN_SOURCES)})")

    def _read(self, path: Path, explicit: bool) -> Iterator[Document]:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED:
            if explicit:
                raise LMStackError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: "
                                   f"{SUPPORTED_LIST} (convert it to one of them, or rename it if it is plain text)")
            self._skip(str(path), f"unsupported file type {suffix or '(no suffix)'}")
            return
        if suffix == ".pdf":
            yield read_pdf(path)
            return
        text = read_text(path, explicit)
        if text is None:
            self._skip(str(path), "binary (not UTF-8 text)")
            return
        if suffix == ".jsonl":
            yield from jsonl_documents(path)
        elif suffix in HTML_SUFFIXES:
            title, body = html_to_text(text)
            yield make_document(str(path), title or first_heading(body) or path.stem, body)
        else:
            yield make_document(str(path), first_heading(text) or path.stem, text)


def iter_documents(sources: list[str], skipped: list[str] | None = None) -> Iterator[Document]:
    """The documents of `sources` (files, folders, globs, .jsonl, 'pydocs'), streamed, in order. Pass a list as
    `skipped` to collect the paths passed over (or use `DocumentSource` for the reasons too)."""
    src = DocumentSource(sources)
    try:
        yield from src
    finally:
        if skipped is not None:
            skipped.extend(src.skipped)


def read_text(path: Path, explicit: bool = True) -> str | None:
    """The file's text with newlines normalised; a binary file raises (explicit) or gives None (found in a folder)."""
    data = path.read_bytes()
    problem = None
    if b"\x00" in data:
        problem = "contains NUL bytes"
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            problem = f"is not UTF-8 text (bad byte at offset {e.start})"
    if problem:
        if explicit:
            raise LMStackError(f"{path}: binary file ({problem}); pass a UTF-8 text file ({SUPPORTED_LIST}) or "
                               "convert it to UTF-8 first")
        return None
    return normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_documents(path: Path) -> Iterator[Document]:
    from ..data.jsonl import read_jsonl
    ids: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        text = rec.get("text")
        if not isinstance(text, str):
            raise LMStackError(f"{path}:{lineno}: expected an object with a string 'text' field (optional 'title' "
                               "and 'id'); add the field or fix the line")
        rid = rec.get("id")
        if rid is not None:
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise LMStackError(f"{path}:{lineno}: 'id' must be a string or an integer")
            rid = str(rid)
            if rid in ids:
                raise LMStackError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {ids[rid]}); ids must be "
                                   "unique within a file")
            ids[rid] = lineno
        title = rec.get("title")
        if title is not None and not isinstance(title, str):
            raise LMStackError(f"{path}:{lineno}: 'title' must be a string")
        title = title or rid or f"{path.stem}:{lineno}"
        yield make_document(f"{path}:{rid if rid is not None else lineno}", title, normalize_newlines(text))


def pydocs_documents() -> Iterator[Document]:
    """One document per Python documentation topic (the topics the `pydocs` corpus of lmstack.data.corpora
    streams), titled by topic name, path `pydocs:<topic>`."""
    from pydoc_data.topics import topics  # the stdlib module lmstack.data.corpora reads for `pydocs`
    for key in sorted(topics):
        yield make_document(f"pydocs:{key}", key, normalize_newlines(topics[key]))


def read_pdf(path: Path) -> Document:
    try:
        import pypdf
    except ImportError:
        raise LMStackError(f"{path}: reading PDF files needs pypdf; install it with `pip install pypdf`") from None
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as e:  # pypdf raises many kinds of errors for damaged or encrypted files
        raise LMStackError(f"{path}: could not read the PDF ({type(e).__name__}: {e}); check the file is a valid, "
                           "unencrypted PDF or convert it to text first") from None
    text = normalize_newlines("\n\n".join(p.strip("\n") for p in pages))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return make_document(str(path), str(meta_title).strip() or first[:200] or path.stem, text)


# --- titles ------------------------------------------------------------------------------------------------------

ATX_RE = re.compile(r"^(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
UNDERLINE_RE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}[ \t]*$")


def first_heading(text: str) -> str | None:
    """The first Markdown (# / setext) or reStructuredText (underlined) heading, outside fenced code."""
    lines = text.split("\n")
    fence = None
    for i, line in enumerate(lines):
        s = line.strip()
        if fence:
            if s.startswith(fence):
                fence = None
            continue
        if s.startswith("```") or s.startswith("~~~"):
            fence = s[:3]
            continue
        m = ATX_RE.match(line)
        if m and m.group(2).strip():
            return m.group(2).strip()
        if (s and not line[0].isspace() and not UNDERLINE_RE.match(line) and i + 1 < len(lines)
                and UNDERLINE_RE.match(lines[i + 1]) and (i == 0 or not lines[i - 1].strip()
                                                           or UNDERLINE_RE.match(lines[i - 1]))):
            return s
    return None


# --- HTML -> text ------------------------------------------------------------------------------------------------

BLOCK_TAGS = {"p", "div", "section", "article", "header", "footer", "main", "nav", "aside", "blockquote", "table",
              "tr", "ul", "ol", "dl", "dt", "dd", "figure", "figcaption", "form", "hr", "address", "details",
              "summary", "body", "html"}
SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "title"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []      # finished blocks
        self.cur: list[str] = []      # inline text of the current block
        self.title: list[str] = []
        self.h1: str | None = None
        self.heading: int = 0         # level of the heading being read
        self.pre = 0
        self.skip = 0
        self.in_title = False

    def flush(self) -> None:
        s = re.sub(r"[ \t\n\r\f\v]+", " ", "".join(self.cur)).strip()
        self.cur = []
        if s:
            if self.heading:
                self.out.append("#" * self.heading + " " + s)
                if self.heading == 1 and self.h1 is None:
                    self.h1 = s
            else:
                self.out.append(s)

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in SKIP_TAGS:
            self.skip += 1
            return
        if self.skip:
            return
        if self.pre:
            return
        if tag in BLOCK_TAGS:
            self.flush()
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.heading = int(tag[1])
        elif tag == "li":
            self.flush()
            self.cur.append("- ")
        elif tag == "br":
            self.cur.append("\n")  # collapsed to a space; a <br> inside a paragraph is a soft break
        elif tag == "pre":
            self.flush()
            self.pre = 1
        elif tag in ("td", "th"):
            self.cur.append(" ")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.skip and not self.pre:
            if tag == "hr":
                self.flush()
            else:
                self.cur.append(" ")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "pre" and self.pre:
            code = "".join(self.cur).strip("\n")
            self.cur = []
            self.pre = 0
            if code.strip():
                self.out.append("```\n" + code + "\n```")
        elif self.pre:
            return
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.heading = 0
        elif tag in BLOCK_TAGS or tag == "li":
            self.flush()

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        if self.skip:
            return
        self.cur.append(data)


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, text) of an HTML page: <title> (None if absent), and the text with headings as "# ..." lines,
    paragraphs separated by blank lines, <pre> as ``` fenced blocks."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    if p.pre:
        p.handle_endtag("pre")
    p.flush()
    title = re.sub(r"\s+", " ", "".join(p.title)).strip() or p.h1
    return title or None, "\n\n".join(p.out) + ("\n" if p.out else "")
