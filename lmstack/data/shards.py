"""Token shards: a corpus tokenized once into memory-mapped uint16/uint32 files, with a train/val split.

Layout of a data directory:
    meta.json          dtype, shard list with token counts, split index, corpus spec
    tokens-00000.bin   raw little-endian token ids (np.memmap)
    tokenizer.json     the tokenizer that produced them
The validation split is the last `val_fraction` of the token stream (the end of the corpus), or, for a corpus with
its own document-level split (`stdlib`), every validation document after every training document.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..atomic import atomic_dir, recover_dir
from ..errors import LMStackError
from ..tokenizer import Tokenizer
from .corpora import has_document_split, iter_corpus

SHARD_TOKENS = 1 << 28  # 256M tokens per shard file
BATCH_PIECES = 64       # a tokenization batch: at most this many pieces ...
BATCH_CHARS = 1 << 20   # ... or about this many characters
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Tokenizer processes prepare_dataset uses by default: $LMSTACK_TOKENIZE_WORKERS, else min(4, usable CPUs).

    Measured on 2 shared CPU cores (12 MB `stdlib` corpus, 3.3M tokens, BPE 4096): workers=1 (the Rust tokenizer's
    own threads in encode_batch) 8.5-10.8 s, workers=2 7.1-8.3 s, workers=3 12.3 s (oversubscribed). Worker
    processes win because the main process only writes while they encode. Each worker is single-threaded."""
    env = os.environ.get("LMSTACK_TOKENIZE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise LMStackError(f"LMSTACK_TOKENIZE_WORKERS={env!r} is not a whole number") from None
    return min(MAX_DEFAULT_WORKERS, available_cpus())


def prepare_dataset(corpus: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                    data_path: str | None = None, shard_tokens: int = SHARD_TOKENS, progress=None,
                    workers: int | None = None, text_column: str | None = None) -> Path:
    """Stream-tokenize `corpus` into shards under out_dir. Documents are separated by the EOS token. Written
    atomically (lmstack.atomic.atomic_dir): a crash leaves the previous data directory, never a half-written one.

    The split: a corpus with its own document-level split (corpora.has_document_split, e.g. `stdlib`) is written as
    all train documents (each followed by EOS), then all val documents, and meta["split"] is the exact number of
    train tokens; val_fraction is then not used. Any other corpus: the last `val_fraction` of the token stream.
    `workers` > 1 tokenizes batches in that many processes; the shards are byte-identical to workers=1."""
    if not 0.0 < val_fraction < 1.0:
        raise LMStackError(f"val_fraction must be in (0, 1), got {val_fraction}")
    workers = default_workers() if workers is None else max(1, int(workers))
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        try:
            if has_document_split(corpus):
                kw = dict(data_path=data_path, text_column=text_column)
                _write_docs(writer, iter_corpus(corpus, split="train", **kw), tokenizer, workers, progress,
                            trailing_eos=True)
                split = writer.total
                _write_docs(writer, iter_corpus(corpus, split="val", **kw), tokenizer, workers, progress)
                split_by = "document"
            else:
                _write_docs(writer, iter_corpus(corpus, data_path, text_column), tokenizer, workers, progress)
                split, split_by = int(writer.total * (1.0 - val_fraction)), "token"
        finally:
            writer.close()
        total = writer.total
        if total < 4:
            raise LMStackError(f"corpus {corpus!r} produced only {total} tokens; it is empty or too small to train on")
        meta = {"corpus": corpus, "data_path": data_path, "dtype": np.dtype(dtype).name, "shards": writer.shards,
                "total_tokens": total, "split": split, "val_fraction": val_fraction,
                "vocab_size": tokenizer.vocab_size}
        if split_by == "document":
            meta["split_by"] = "document"
        if text_column:
            meta["text_column"] = text_column
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
    return out


class _ShardWriter:
    """Appends token ids to tokens-NNNNN.bin files of at most shard_tokens tokens each."""

    def __init__(self, tmp: Path, dtype, shard_tokens: int):
        self.tmp, self.dtype, self.shard_tokens = tmp, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.in_shard = self.total = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.f is None or self.in_shard >= self.shard_tokens:
                if self.f is not None:
                    self.f.close()
                name = f"tokens-{len(self.shards):05d}.bin"
                self.shards.append({"file": name, "tokens": 0})
                self.f, self.in_shard = open(self.tmp / name, "wb"), 0
            take = ids[: self.shard_tokens - self.in_shard]
            self.f.write(take.astype(self.dtype).tobytes())
            self.in_shard += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.total += len(take)
            ids = ids[len(take):]

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _write_docs(writer: _ShardWriter, docs: Iterable[tuple[str, bool]], tokenizer: Tokenizer, workers: int,
                progress, trailing_eos: bool = False) -> None:
    """Tokenize (text, starts_a_document) pieces into the writer: EOS before every new document but the first (and
    after the last one with trailing_eos)."""
    eos = tokenizer.eos_id
    eos_arr = np.array([eos], dtype=np.int64) if eos is not None else None
    first = True
    for n_chars, new_doc, ids in encode_pieces(docs, tokenizer, workers):
        if new_doc and not first and eos_arr is not None:
            writer.write(eos_arr)
        writer.write(ids)
        first = False
        if progress:
            progress(n_chars)
    if trailing_eos and not first and eos_arr is not None:
        writer.write(eos_arr)


def _batches(docs: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in docs:
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) >= BATCH_PIECES or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; never the forked Rust pool
    from tokenizers import Tokenizer as HFTokenizer
    _WORKER_TOKENIZER = HFTokenizer.from_str(tokenizer_json)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.uint32) for e in _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)]


def encode_pieces(docs: Iterable[tuple[str, bool]], tokenizer: Tokenizer,
                  workers: int = 1) -> Iterator[tuple[int, bool, np.ndarray]]:
    """(characters, starts_a_document, token ids) for every piece, in input order. workers > 1: batches are
    tokenized in worker processes (the tokenizer JSON is sent once to each), at most 2*workers batches in flight."""
    batches = _batches(docs)
    if workers > 1:  # a corpus of one batch is not worth starting processes for
        head = list(itertools.islice(batches, 2))
        batches = itertools.chain(head, batches)
        workers = workers if len(head) > 1 else 1
    if workers <= 1:
        for batch in batches:
            for (text, new_doc), ids in zip(batch, tokenizer.encode_batch([t for t, _ in batch])):
                yield len(text), new_doc, np.asarray(ids, dtype=np.int64)
        return
    fork = sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    # with TOKENIZERS_PARALLELISM set while forking, the tokenizers library does not print its fork warning; the
    # workers turn their own parallelism off before they tokenize anything (_worker_init)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(tokenizer.hf.to_str(),))
    ok = False
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_worker_encode, [t for t, _ in batch])))
            if len(pending) >= 2 * workers:
                b, fut = pending.popleft()
                for (text, new_doc), ids in zip(b, fut.result()):
                    yield len(text), new_doc, ids
        while pending:
            b, fut = pending.popleft()
            for (text, new_doc), ids in zip(b, fut.result()):
                yield len(text), new_doc, ids
        ok = True
    finally:
        pool.shutdown(wait=ok, cancel_futures=not ok)
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


class TokenDataset:
    """Memory-mapped token stream with train/val views, random-window batches and sequential eval windows."""

    def __init__(self, data_dir: str | Path):
        d = recover_dir(data_dir)  # a swap a crash interrupted is finished first
        meta_file = d / "meta.json"
        if not meta_file.exists():
            raise LMStackError(f"{d} is not a prepared data directory (no meta.json); run `lmstack prepare` first")
        self.dir = d
        self.meta = json.loads(meta_file.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(d / s["file"], dtype=dtype, mode="r") for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.split = int(self.meta["split"])
        self.total = int(self.offsets[-1])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.dir)

    def split_range(self, split: str) -> tuple[int, int]:
        if split == "train":
            return 0, self.split
        if split == "val":
            return self.split, self.total
        raise ValueError(f"unknown split {split!r}")

    def num_tokens(self, split: str) -> int:
        a, b = self.split_range(split)
        return b - a

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the global stream, across shard boundaries if needed."""
        if len(self.shards) == 1:
            return self.shards[0][start:start + length]
        out, pos, end = [], start, start + length
        while pos < end:
            k = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            lo = pos - self.offsets[k]
            take = min(end - pos, len(self.shards[k]) - lo)
            out.append(self.shards[k][lo:lo + take])
            pos += take
        return np.concatenate(out)

    def _check_len(self, split: str, block: int) -> tuple[int, int]:
        a, b = self.split_range(split)
        if b - a < block + 1:
            raise LMStackError(f"the {split} split has {b - a} tokens, fewer than block_size+1={block + 1}; use a larger "
                               "corpus, a smaller block_size, or a different val_fraction")
        return a, b

    def batch(self, split: str, batch_size: int, block: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x = tokens[i:i+block], y = tokens[i+1:i+1+block]."""
        a, b = self._check_len(split, block)
        starts = rng.integers(a, b - block, size=batch_size)
        arr = np.stack([self.read(int(s), block + 1) for s in starts]).astype(np.int64)
        t = torch.from_numpy(arr)
        return t[:, :-1], t[:, 1:]

    def eval_windows(self, split: str, block: int, max_windows: int | None = None):
        """Consecutive non-overlapping windows covering the split (first `max_windows` of them if given)."""
        a, b = self._check_len(split, block)
        n = (b - a - 1) // block
        if max_windows is not None:
            n = min(n, max_windows)
        for i in range(n):
            arr = self.read(a + i * block, block + 1).astype(np.int64)
            t = torch.from_numpy(arr)
            yield t[:-1], t[1:]
