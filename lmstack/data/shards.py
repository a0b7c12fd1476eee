"""Token shards: a corpus tokenized once into memory-mapped uint16/uint32 files, with a train/val split.

Layout of a data directory:
    meta.json          dtype, shard list with token counts, split index, corpus spec
    tokens-00000.bin   raw little-endian token ids (np.memmap)
    tokenizer.json     the tokenizer that produced them
The validation split is the last `val_fraction` of the token stream (the end of the corpus).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_dir, recover_dir
from ..errors import LMStackError
from ..tokenizer import Tokenizer
from .corpora import iter_corpus

SHARD_TOKENS = 1 << 28  # 256M tokens per shard file


def prepare_dataset(corpus: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                    data_path: str | None = None, shard_tokens: int = SHARD_TOKENS, progress=None) -> Path:
    """Stream-tokenize `corpus` into shards under out_dir. Documents are separated by the EOS token. Written
    atomically (lmstack.atomic.atomic_dir): a crash leaves the previous data directory, never a half-written one."""
    if not 0.0 < val_fraction < 1.0:
        raise LMStackError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        shards, total = _write_shards(tmp, iter_corpus(corpus, data_path), tokenizer, dtype, shard_tokens, progress)
        if total < 4:
            raise LMStackError(f"corpus {corpus!r} produced only {total} tokens; it is empty or too small to train on")
        meta = {"corpus": corpus, "data_path": data_path, "dtype": np.dtype(dtype).name, "shards": shards,
                "total_tokens": total, "split": int(total * (1.0 - val_fraction)), "val_fraction": val_fraction,
                "vocab_size": tokenizer.vocab_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
    return out


def _write_shards(tmp: Path, docs, tokenizer: Tokenizer, dtype, shard_tokens: int, progress) -> tuple[list, int]:
    """Tokenize (text, starts_a_document) pieces into tokens-NNNNN.bin files under tmp; returns (shards, total)."""
    eos = tokenizer.eos_id
    shards: list[dict] = []
    f, in_shard, total, first = None, 0, 0, True

    def write(ids: np.ndarray) -> None:
        nonlocal f, in_shard, total
        while len(ids):
            if f is None or in_shard >= shard_tokens:
                if f is not None:
                    f.close()
                name = f"tokens-{len(shards):05d}.bin"
                shards.append({"file": name, "tokens": 0})
                f, in_shard = open(tmp / name, "wb"), 0
            take = ids[: shard_tokens - in_shard]
            f.write(take.astype(dtype).tobytes())
            in_shard += len(take)
            shards[-1]["tokens"] += len(take)
            total += len(take)
            ids = ids[len(take):]

    batch: list[str] = []
    starts: list[bool] = []

    def flush() -> None:
        nonlocal first
        for text, new_doc, ids in zip(batch, starts, tokenizer.encode_batch(batch)):
            if new_doc and not first and eos is not None:
                write(np.array([eos], dtype=np.int64))
            write(np.asarray(ids, dtype=np.int64))
            first = False
            if progress:
                progress(len(text))
        batch.clear()
        starts.clear()

    try:
        for text, new_doc in docs:
            batch.append(text)
            starts.append(new_doc)
            if len(batch) >= 16:
                flush()
        flush()
    finally:
        if f is not None:
            f.close()
    return shards, total


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
