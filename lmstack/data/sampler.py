"""The one epoch sampler every objective draws its batches from (SFT rows, preference pairs).

    epoch_batch(n, batch_size, seed, index)  ->  the example indices of global batch number `index`

Epochs are independent seeded permutations of range(n) walked in order, so every example is seen once per epoch,
and a batch is a pure function of (seed, index): a resumed run (index = step * grad_accum + micro) sees exactly the
batches an uninterrupted run sees.
"""
from __future__ import annotations

import random

_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(n) seeded by (seed, epoch) (cached, a few at a time)."""
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _PERM_CACHE[key] = order
    return _PERM_CACHE[key]


def epoch_batch(n: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Indices of global batch number `index` (batch_size of them; a batch may straddle two epochs)."""
    if n <= 0:
        raise ValueError("epoch_batch needs at least one example")
    out = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, j = divmod(k, n)
        out.append(epoch_permutation(n, seed, epoch)[j])
    return out
