"""Masked-language-model pretraining (BERT): the masking collator, the loss and the evaluator.

`objective: mlm` in a pretraining recipe (train/pretrain.py) uses the same token shards, the same random windows
and the same Trainer as next-token pretraining; only the batch, the loss and the evaluator change:

  masking   `mlm_probability` (0.15) of the non-special tokens of each window are chosen; of those 80% become the
            mask token, 10% a random non-special token, 10% stay as they are. Labels are the original ids at the
            chosen positions and -100 everywhere else, so the loss is taken on the chosen positions only. Every
            window gets at least one chosen token.
  words     `whole_word_masking: true` chooses words instead of tokens (each word with probability
            mlm_probability, then all its tokens), and the 80/10/10 split is still drawn per token. A token
            continues the previous token's word when
              - WordPiece vocabularies: it starts with the continuing-subword prefix ("##"),
              - any other (byte-level BPE, char, SentencePiece): its first byte and the previous token's last byte
                are both word bytes (ASCII letters/digits, or any byte >= 0x80, so a multi-byte character or a
                non-English word is never split). A byte-level BPE token that starts with its space marker 'Ġ',
                a newline or punctuation therefore starts a new word: "Ġunder|stand|ing|." = [Ġunderstanding] [.]
            Special tokens are words of their own and are never chosen.
  exact     the mask of a window is a pure function of (seed, step, global row) (one numpy generator per row, seeded
  resume    [seed, step, row, tag]), so a resumed run, or one with another number of processes, masks the same way.
  eval      fixed validation windows with fixed masks: val_loss (mean cross-entropy over the chosen positions,
            nats) and val_acc (the fraction of chosen positions whose argmax is the original token).

The tokenizer needs a mask token ([MASK] or <mask>): a BPE or char tokenizer trained by `lmstack train` for
`objective: mlm` gets `[MASK]` as a special token; an existing tokenizer without one is an error.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LMStackError
from ..tokenizer import MASK_TOKENS, Tokenizer
from .losses import IGNORE_INDEX, labelled_logits

MLM_TAG = 0x4D4C4D   # "MLM": keeps the masking streams apart from the window streams of the same seed
EVAL_TAG = 0xE7A1    # the evaluator's windows (the same tag as next-token pretraining's evaluator)


def require_mask_token(tokenizer: Tokenizer) -> int:
    """The tokenizer's mask token id; a clear error when it has none."""
    mid = tokenizer.mask_id
    if mid is None:
        raise LMStackError(
            f"objective: mlm needs a tokenizer with a mask token ({' or '.join(MASK_TOKENS)}), and this one has none; "
            "use tokenizer: bpe or char (lmstack adds [MASK] for mlm runs), or train one with "
            "`lmstack tokenizer train --special-tokens '<|endoftext|>,[MASK]' ...`")
    return mid


def _word_byte(b: int) -> bool:
    return b >= 0x80 or chr(b).isalnum()


class MLMMasker:
    """BERT masking of (B, T) token windows: `masker(ids, keys)` -> (inputs, labels) int64 tensors.

    keys: one seed sequence per row (e.g. (seed, step, row)); the row's mask is a pure function of its key and ids.
    """

    def __init__(self, tokenizer: Tokenizer, probability: float = 0.15, whole_word: bool = False,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1):
        if not 0.0 < probability < 1.0:
            raise LMStackError(f"mlm_probability must be in (0, 1), got {probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise LMStackError("mask_fraction + random_fraction must be within [0, 1]")
        self.mask_id = require_mask_token(tokenizer)
        self.p, self.whole_word = float(probability), bool(whole_word)
        self.mask_fraction, self.random_fraction = float(mask_fraction), float(random_fraction)
        V = tokenizer.vocab_size
        special = np.zeros(V, dtype=bool)
        special[[i for i in tokenizer.special_ids if i < V]] = True
        special[self.mask_id] = True
        self.special = special
        self.random_ids = np.flatnonzero(~special)  # what the 10% "random token" draw picks from
        if len(self.random_ids) == 0:
            raise LMStackError("the tokenizer has only special tokens; nothing to mask")
        if self.whole_word:
            self._word_tables(tokenizer)

    def _word_tables(self, tokenizer: Tokenizer) -> None:
        """Per-id tables for word boundaries (see the module docstring)."""
        V = len(self.special)
        model = tokenizer.hf.model
        self.prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
        if self.prefix:
            self.suffix = np.array([not self.special[i] and (t := tokenizer.hf.id_to_token(i)) is not None
                                    and t.startswith(self.prefix) for i in range(V)], dtype=bool)
        else:
            starts, ends = np.zeros(V, dtype=bool), np.zeros(V, dtype=bool)
            for i in range(V):
                b = b"" if self.special[i] else tokenizer.token_bytes(i)
                if b:
                    starts[i], ends[i] = _word_byte(b[0]), _word_byte(b[-1])
            self.first_is_word, self.last_is_word = starts, ends

    def word_ids(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) word index of every position (0, 1, ... per row); a window's first token starts a word."""
        ids = np.asarray(ids)
        sp = self.special[ids]
        if self.prefix:
            cont = self.suffix[ids[:, 1:]]
        else:
            cont = self.first_is_word[ids[:, 1:]] & self.last_is_word[ids[:, :-1]]
        cont &= ~sp[:, 1:] & ~sp[:, :-1]
        new = np.concatenate([np.ones((ids.shape[0], 1), dtype=bool), ~cont], axis=1)
        return np.cumsum(new, axis=1) - 1

    def mask_row(self, row: np.ndarray, rng: np.random.Generator,
                 words: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one window; `words`: its word ids (whole-word masking)."""
        T = len(row)
        eligible = ~self.special[row]
        if words is None:
            chosen = (rng.random(T) < self.p) & eligible
        else:
            chosen = (rng.random(int(words[-1]) + 1)[words] < self.p) & eligible
        pick = rng.integers(0, 1 << 62)  # drawn every time, so the later draws do not depend on what was chosen
        if not chosen.any() and eligible.any():  # at least one prediction per window
            k = np.flatnonzero(eligible)[pick % int(eligible.sum())]
            chosen = (words == words[k]) & eligible if words is not None else (np.arange(T) == k)
        r = rng.random(T)
        rand = self.random_ids[rng.integers(0, len(self.random_ids), size=T)]
        inputs = row.copy()
        to_mask = chosen & (r < self.mask_fraction)
        to_rand = chosen & (r >= self.mask_fraction) & (r < self.mask_fraction + self.random_fraction)
        inputs[to_mask] = self.mask_id
        inputs[to_rand] = rand[to_rand]
        labels = np.where(chosen, row, IGNORE_INDEX)
        return inputs, labels

    def __call__(self, ids: np.ndarray | torch.Tensor, keys: Sequence[Iterable[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        ids = ids.astype(np.int64, copy=False)
        if len(keys) != len(ids):
            raise ValueError(f"{len(keys)} keys for {len(ids)} rows")
        if ids.size and int(ids.max()) >= len(self.special):
            raise LMStackError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary ({len(self.special)})")
        words = self.word_ids(ids) if self.whole_word else None
        xs, ys = [], []
        for i, key in enumerate(keys):
            x, y = self.mask_row(ids[i], np.random.default_rng([*map(int, key), MLM_TAG]),
                                 None if words is None else words[i])
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def mlm_loss(model, batch) -> torch.Tensor:
    """Trainer loss_fn for masked-LM pretraining: batch = (masked inputs, labels with -100 off the chosen positions)
    -> mean cross-entropy over the chosen positions (the output head runs on those positions only)."""
    x, y = batch
    logits, mask = labelled_logits(model, x, y)
    return F.cross_entropy(logits.float(), y[mask])


def make_mlm_evaluator(ds, block: int, batch_size: int, seed: int, masker: MLMMasker):
    """Returns evaluate(model, iters=20, windows=None) -> {val_loss, val_acc, val_tokens (= predicted tokens)}.

    windows=None: `iters` batches of random validation windows; windows=-1: every non-overlapping window of the
    validation split; windows=N: the first N. The windows and their masks are the same on every call."""
    cache: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def batches(iters: int, windows: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (iters, windows)
        if key not in cache:
            if windows is None:
                rng = np.random.default_rng([seed, EVAL_TAG])
                raw = [ds.batch("val", batch_size, block, rng)[0] for _ in range(iters)]
            else:
                wins = [w[0] for w in ds.eval_windows("val", block, None if windows < 0 else windows)]
                raw = [torch.stack(wins[i:i + batch_size]) for i in range(0, len(wins), batch_size)]
            cache.clear()
            cache[key] = [masker(x, [(seed, EVAL_TAG, b, r) for r in range(len(x))]) for b, x in enumerate(raw)]
        return cache[key]

    @torch.no_grad()
    def evaluate(model, iters: int = 20, windows: int | None = None) -> dict[str, Any]:
        device = next(model.parameters()).device
        nll, correct, n = 0.0, 0, 0
        for x, y in batches(iters, windows):
            x, y = x.to(device), y.to(device)
            logits, mask = labelled_logits(model, x, y)
            target = y[mask]
            nll += float(F.cross_entropy(logits.float(), target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            n += int(target.numel())
        return {"val_loss": nll / max(n, 1), "val_acc": correct / max(n, 1), "val_tokens": n}
    return evaluate
