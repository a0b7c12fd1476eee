"""Parallel text for sequence-to-sequence training: aligned (source, target) pairs, tokenized, and batches of them.

    load_pairs(src, tgt=None)   two line-aligned text files (plain or .gz; line i of one translates line i of the
                                other), or one JSONL file (tgt None) whose records have `src` and `tgt` fields
    ParallelDataset(pairs, src_tok, tgt_tok, max_src, max_tgt)
                                token ids: source = text + EOS; target labels = text + EOS, decoder inputs = the
                                decoder start token + the labels shifted right
    token_batches(lengths, max_tokens, seed, epoch)
                                the batches of one epoch when batching by tokens: sentences bucketed by length
                                (seeded shuffle, then sorted inside pools of 100 batches), cut so that
                                rows * longest row <= max_tokens, and the batches shuffled. A pure function of (seed,
                                epoch), so batch number i of the run (TokenBatcher) never depends on what ran before.
    collate_pairs(...)          right-padded (src, src_mask, tgt_in, labels) int64 tensors, labels -100 at pads
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import LMStackError

IGNORE = -100


def read_lines(path: str | Path) -> list[str]:
    """Lines of a text file (a .gz one is decompressed), without the newline."""
    p = Path(path)
    if not p.is_file():
        raise LMStackError(f"no parallel-text file at {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def load_pairs(src: str | Path, tgt: str | Path | None = None) -> list[tuple[str, str]]:
    """(source, target) pairs from two aligned files, or from one JSONL file of {"src": ..., "tgt": ...} records."""
    p = Path(src)
    if tgt is None:
        if not (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz")):
            raise LMStackError(f"{p}: give the target file too (two aligned files), or a .jsonl file with src/tgt "
                               "fields")
        pairs = []
        for n, line in enumerate(read_lines(p), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pairs.append((str(rec["src"]), str(rec["tgt"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LMStackError(f"{p}:{n}: expected a JSON object with 'src' and 'tgt' fields") from None
        return pairs
    a, b = read_lines(p), read_lines(tgt)
    if len(a) != len(b):
        raise LMStackError(f"{p} has {len(a)} lines but {tgt} has {len(b)}; parallel files must be line-aligned")
    return list(zip(a, b))


class ParallelDataset:
    """Tokenized pairs. src[i]: source ids + EOS (at most max_src); tgt[i]: target ids + EOS (at most max_tgt)."""

    def __init__(self, pairs: list[tuple[str, str]], src_tok, tgt_tok, max_src: int, max_tgt: int):
        if not pairs:
            raise LMStackError("no parallel sentence pairs")
        s_eos, t_eos = src_tok.eos_id, tgt_tok.eos_id
        if s_eos is None or t_eos is None:
            raise LMStackError("seq2seq needs tokenizers with an end-of-sequence token")
        srcs = src_tok.encode_batch([s for s, _ in pairs])
        tgts = tgt_tok.encode_batch([t for _, t in pairs])
        self.src = [np.asarray(s[: max_src - 1] + [s_eos], dtype=np.int64) for s in srcs]
        self.tgt = [np.asarray(t[: max_tgt - 1] + [t_eos], dtype=np.int64) for t in tgts]
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> np.ndarray:
        """Padded cost of each pair: max(source length, target length)."""
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt)], dtype=np.int64)


def collate_pairs(ds: ParallelDataset, idx: Iterable[int], pad_id: int, start_id: int):
    """(src (B,S), src_mask (B,S) bool, tgt_in (B,T), labels (B,T)) for rows `idx`, right-padded."""
    idx = list(idx)
    S = max(len(ds.src[i]) for i in idx)
    T = max(len(ds.tgt[i]) for i in idx)
    src = torch.full((len(idx), S), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    for r, i in enumerate(idx):
        s, t = torch.from_numpy(ds.src[i]), torch.from_numpy(ds.tgt[i])
        src[r, : len(s)] = s
        labels[r, : len(t)] = t
        tgt_in[r, 0] = start_id
        tgt_in[r, 1: len(t)] = t[:-1]
    return src, _mask(ds, idx, S), tgt_in, labels


def _mask(ds: ParallelDataset, idx: list[int], S: int) -> torch.Tensor:
    lens = torch.tensor([len(ds.src[i]) for i in idx])
    return torch.arange(S)[None, :] < lens[:, None]


def token_batches(lengths: np.ndarray, max_tokens: int, seed: int, epoch: int, pool: int = 100) -> list[list[int]]:
    """One epoch of length-bucketed batches of at most max_tokens padded tokens each (see the module docstring)."""
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    avg = max(1, int(max_tokens // max(1.0, float(np.mean(lengths)))))
    chunk = pool * avg
    batches: list[list[int]] = []
    for c in range(0, n, chunk):
        part = sorted(order[c: c + chunk], key=lambda i: int(lengths[i]))
        cur: list[int] = []
        longest = 0
        for i in part:
            L = int(lengths[i])
            if cur and max(longest, L) * (len(cur) + 1) > max_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, L)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


class TokenBatcher:
    """Global batch number `index` -> row indices, walking epochs of `token_batches` (cached a couple at a time)."""

    def __init__(self, lengths: np.ndarray, max_tokens: int, seed: int):
        if max_tokens < int(lengths.max()):
            raise LMStackError(f"max_tokens={max_tokens} is smaller than the longest pair ({int(lengths.max())} "
                               "tokens); raise it")
        self.lengths, self.max_tokens, self.seed = lengths, int(max_tokens), seed
        self._epochs: dict[int, list[list[int]]] = {}
        self._sizes: list[int] = []

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = token_batches(self.lengths, self.max_tokens, self.seed, e)
        return self._epochs[e]

    def size(self, e: int) -> int:
        while len(self._sizes) <= e:
            self._sizes.append(len(token_batches(self.lengths, self.max_tokens, self.seed, len(self._sizes)))
                               if len(self._sizes) not in self._epochs else len(self._epochs[len(self._sizes)]))
        return self._sizes[e]

    def __call__(self, index: int) -> list[int]:
        e = 0
        while index >= self.size(e):
            index -= self.size(e)
            e += 1
        return self.epoch(e)[index]
