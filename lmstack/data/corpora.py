"""Corpora: the built-in `pydocs` and `stdlib`, Tiny Shakespeare (download with cache + md5, or a local file), any
local .txt/.md/.jsonl/.parquet/.arrow/.feather/.csv files, directories or globs, and Hugging Face datasets
(`hf:NAME[:CONFIG][:SPLIT]`, streamed). Everything is streamed: a corpus never has to fit in memory.

A corpus spec may carry options after `#`, comma-separated: `data/*.parquet#text_column=content`,
`stdlib#val_percent=5,tokenizer_sample_bytes=4000000`. Options:
    text_column             the column/field holding the text (tables, hf:, .jsonl; default "text")
    val_percent             stdlib: percent of modules in the fixed validation split (default 10)
    tokenizer_sample_bytes  iter_texts (tokenizer training) stops after about this many bytes of text
Spec strings are what recipes, `--corpus` and the data cache keys hold, so options work everywhere unchanged.

Corpora with their own document-level split (`has_document_split`: today `stdlib`) give prepare_dataset their
train and val documents separately (`iter_corpus(spec, split=...)`); the others are split by token position."""
from __future__ import annotations

import glob
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Iterator

from ..errors import LMStackError
from .tabular import TABLE_SUFFIXES, iter_hf, iter_table_file

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_NAMES = ("tinyshakespeare.txt", "input.txt", "shakespeare.txt")
BUILTIN = ("pydocs", "stdlib", "shakespeare")
OPTIONS = ("text_column", "val_percent", "tokenizer_sample_bytes")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CHUNK_CHARS = 1 << 18  # stream files in ~256 KB pieces, cut at line ends (bounds tokenizer memory)


def cache_dir() -> Path:
    return Path(os.environ.get("LMSTACK_CACHE", Path.home() / ".cache" / "lmstack"))


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shakespeare_path(data_path: str | None = None, download: bool = True) -> Path:
    """Local Tiny Shakespeare: --data-path, then $LMSTACK_DATA_DIR, then a `shared/data` folder beside this checkout
    (../shared/data of a source clone), then the cache, then a checked download."""
    if data_path:
        p = Path(data_path)
        if p.is_dir():
            p = next((p / n for n in SHAKESPEARE_NAMES if (p / n).exists()), p / SHAKESPEARE_NAMES[0])
        if not p.exists():
            raise LMStackError(f"data path {p} does not exist; pass the Tiny Shakespeare text file with --data-path")
        return p
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    env = os.environ.get("LMSTACK_DATA_DIR")
    for d in ([Path(env)] if env else []) + [beside]:
        for n in SHAKESPEARE_NAMES:
            if (d / n).exists():
                return d / n
    cached = cache_dir() / "data" / "tinyshakespeare.txt"
    if cached.exists() and md5_file(cached) == SHAKESPEARE_MD5:
        return cached
    if not download:
        raise LMStackError("Tiny Shakespeare is not available locally; pass --data-path FILE or set LMSTACK_DATA_DIR")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".part")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except OSError as e:
        raise LMStackError(f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}); you seem to be "
                           "offline: pass a local copy with --data-path FILE or set LMSTACK_DATA_DIR") from e
    got = md5_file(tmp)
    if got != SHAKESPEARE_MD5:
        tmp.unlink(missing_ok=True)
        raise LMStackError(f"downloaded Tiny Shakespeare has md5 {got}, expected {SHAKESPEARE_MD5}; try again later")
    os.replace(tmp, cached)
    return cached


def parse_corpus_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'SPEC#key=value,key=value' -> (SPEC, options). A spec that names an existing path is taken whole."""
    if "#" not in spec or Path(spec).exists():
        return spec, {}
    base, _, tail = spec.partition("#")
    opts: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in tail.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in OPTIONS:
            raise LMStackError(f"corpus {spec!r}: bad option {item!r}; options are key=value pairs after '#', "
                               f"comma-separated, with keys {', '.join(OPTIONS)}")
        opts[key] = value.strip()
    return base, opts


def _int_option(opts: dict[str, str], key: str, default: int | None) -> int | None:
    if key not in opts:
        return default
    v = opts[key].upper().rstrip("B")
    mult = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}.get(v[-1:], 1)
    try:
        return int(float(v[:-1] if mult > 1 else v) * mult)
    except ValueError:
        raise LMStackError(f"corpus option {key}={opts[key]!r} is not a number") from None


def has_document_split(spec: str) -> bool:
    """True when the corpus fixes its own train/val documents (prepare_dataset then ignores val_fraction)."""
    return parse_corpus_spec(spec)[0] == "stdlib"


def resolve_corpus_files(spec: str) -> list[Path]:
    """Expand a file, directory (recursive .txt/.md/.jsonl/.parquet/.arrow/.feather/.csv) or glob into a sorted list
    of files."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for ext in TEXT_SUFFIXES + TABLE_SUFFIXES for f in p.rglob("*" + ext)]
    else:
        files = [Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()]
    if not files:
        raise LMStackError(f"corpus {spec!r} matches no files; use one of the built-in corpora ({', '.join(BUILTIN)}), "
                           "hf:NAME, a .txt/.md/.jsonl/.parquet/.arrow/.csv file, a directory or a glob")
    return sorted(files)


def _iter_text_file(path: Path) -> Iterator[str]:
    with open(path, "r", encoding="utf-8", errors="strict", newline="") as f:
        buf = ""
        while True:
            block = f.read(CHUNK_CHARS)
            if not block:
                break
            buf += block
            cut = buf.rfind("\n") + 1
            if cut > 0:
                yield buf[:cut]
                buf = buf[cut:]
        if buf:
            yield buf


def _iter_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    from .jsonl import read_jsonl
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec.get(field), str):
            raise LMStackError(f"{path}:{lineno}: expected an object with a string {field!r} field")
        yield rec[field]


def iter_corpus(spec: str, data_path: str | None = None, text_column: str | None = None,
                split: str | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (text, starts_new_document) pieces of a corpus, streaming. `text_column` (else the spec's option, else
    "text") names the text field of table/hf/.jsonl rows. `split` ("train" | "val") selects the documents of a corpus
    with its own document-level split (has_document_split); None yields every document."""
    spec, opts = parse_corpus_spec(spec)
    column = text_column or opts.get("text_column") or "text"
    if split is not None and spec != "stdlib":
        raise LMStackError(f"corpus {spec!r} has no document-level split; it is split by token position "
                           "(val_fraction)")
    if split not in (None, "train", "val"):
        raise LMStackError(f"unknown split {split!r}; use train or val")
    if spec == "stdlib":
        from .stdlib import VAL_PERCENT, iter_stdlib
        for doc in iter_stdlib(_int_option(opts, "val_percent", VAL_PERCENT)):
            if split is None or doc.split == split:
                yield doc.text, True
        return
    if spec.startswith("hf:"):
        for doc in iter_hf(spec, column):
            yield doc, True
        return
    if spec == "pydocs":
        from pydoc_data.topics import topics
        for key in sorted(topics):
            yield topics[key], True
        return
    if spec == "shakespeare":
        files = [shakespeare_path(data_path)]
    else:
        files = resolve_corpus_files(data_path or spec)
    for f in files:
        try:
            if f.suffix == ".jsonl":
                for doc in _iter_jsonl(f, column):
                    yield doc, True
            elif f.suffix.lower() in TABLE_SUFFIXES:
                for doc in iter_table_file(f, column):
                    yield doc, True
            else:
                for i, piece in enumerate(_iter_text_file(f)):
                    yield piece, i == 0
        except UnicodeDecodeError as e:
            raise LMStackError(f"{f}: not UTF-8 text at byte {e.start}; convert it to UTF-8 first") from None


def iter_texts(spec: str, data_path: str | None = None, text_column: str | None = None) -> Iterator[str]:
    """The text a tokenizer is trained on: the whole corpus, or only its train documents when the corpus has a
    document-level split (no validation text leaks into the vocabulary); with the spec option
    tokenizer_sample_bytes=N, only about the first N bytes (UTF-8 characters, counted cheaply) of it."""
    limit = _int_option(parse_corpus_spec(spec)[1], "tokenizer_sample_bytes", None)
    split = "train" if has_document_split(spec) else None
    n = 0
    for text, _ in iter_corpus(spec, data_path, text_column, split=split):
        if limit is not None and n >= limit:
            return
        yield text
        n += len(text)
