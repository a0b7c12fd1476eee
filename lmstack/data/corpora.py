"""Corpora: the built-in `pydocs`, Tiny Shakespeare (download with cache + md5, or a local file), and any local
.txt/.md/.jsonl files or globs. Everything is streamed: a corpus never has to fit in memory."""
from __future__ import annotations

import glob
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Iterator

from ..errors import LMStackError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_NAMES = ("tinyshakespeare.txt", "input.txt", "shakespeare.txt")
BUILTIN = ("pydocs", "shakespeare")
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
    """Local Tiny Shakespeare: --data-path, then $LMSTACK_DATA_DIR, then the cache, then a checked download."""
    if data_path:
        p = Path(data_path)
        if p.is_dir():
            p = next((p / n for n in SHAKESPEARE_NAMES if (p / n).exists()), p / SHAKESPEARE_NAMES[0])
        if not p.exists():
            raise LMStackError(f"data path {p} does not exist; pass the Tiny Shakespeare text file with --data-path")
        return p
    if os.environ.get("LMSTACK_DATA_DIR"):
        d = Path(os.environ["LMSTACK_DATA_DIR"])
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


def resolve_corpus_files(spec: str) -> list[Path]:
    """Expand a file, directory (recursive .txt/.md/.jsonl) or glob into a sorted list of files."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for ext in ("*.txt", "*.md", "*.jsonl") for f in p.rglob(ext)]
    else:
        files = [Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file()]
    if not files:
        raise LMStackError(f"corpus {spec!r} matches no files; use one of the built-in corpora ({', '.join(BUILTIN)}), "
                           "a .txt/.md/.jsonl file, a directory or a glob")
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


def iter_corpus(spec: str, data_path: str | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (text, starts_new_document) pieces of a corpus, streaming."""
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
                for doc in _iter_jsonl(f):
                    yield doc, True
            else:
                for i, piece in enumerate(_iter_text_file(f)):
                    yield piece, i == 0
        except UnicodeDecodeError as e:
            raise LMStackError(f"{f}: not UTF-8 text at byte {e.start}; convert it to UTF-8 first") from None


def iter_texts(spec: str, data_path: str | None = None) -> Iterator[str]:
    for text, _ in iter_corpus(spec, data_path):
        yield text
