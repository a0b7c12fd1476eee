"""Prompt lookup ("n-gram") drafting for speculative decoding: no draft model, the history is the draft.

When an output copies its input (summaries that quote, code edits, extraction, chat that repeats a name), the
tokens after the last few generated ones have usually appeared before. `NgramDrafter` finds the most recent
earlier occurrence of the last n tokens (n from `ngram_max` down to `ngram_min`) and proposes the k tokens that
followed it. When that continuation runs into the end of the history (a repeating loop) it is extended with the
same period: the suffix matched at distance d means "the sequence repeats with period d". No match: no proposal,
and the round is one ordinary decode step.

The proposal is deterministic (a one-hot draft distribution), which `stream_speculative` verifies exactly: greedy
output is the target's own, sampled output has the target's distribution. The lookup is an index of every n-gram's
latest end position, updated as tokens are confirmed: O(ngram_max) per token, however long the history.
Same idea as Hugging Face's `prompt_lookup_num_tokens` and vLLM's `[ngram]` speculative method.

ngram_min defaults to 2: a single-token match rarely predicts what follows (on SmolLM2 summarising a paragraph,
19 of 23 one-token-match proposals had their first token rejected), and on a CPU verifying costs roughly one
decode step per 2 extra tokens, so proposals that are mostly rejected make generation slower.
(benchmarks/speculative.py --ngram-min 1 shows it.)
"""
from __future__ import annotations

import torch

from ..errors import LMStackError

NGRAM_NAMES = ("ngram", "[ngram]")  # --draft-model spellings (vLLM writes "[ngram]")


def is_ngram_spec(name: str | None) -> bool:
    """Whether a --draft-model value asks for prompt lookup rather than a draft model."""
    return isinstance(name, str) and name.strip().lower() in NGRAM_NAMES


class NgramDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the history's last n tokens."""

    block_size = None  # no model, no context limit of its own
    models = ()

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise LMStackError(f"prompt lookup needs 1 <= ngram_min <= ngram_max, got ngram_min={ngram_min}, "
                               f"ngram_max={ngram_max} (e.g. --ngram-max 3)")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.begin([], 0, 0)

    def check(self, target) -> None:
        """Any target will do: the proposals are the history's own tokens."""

    def begin(self, history: list[int], max_len: int, rewind: int) -> None:
        # last[n][ngram] = j: the latest position j such that history[j - n:j] == ngram (history[j] follows it)
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.ngram_min, self.ngram_max + 1)}
        self.seen: list[int] = []

    def _index(self, history: list[int]) -> None:
        """Add the n-grams that end before each newly confirmed token (so the history's own suffix is never its
        own match)."""
        if history[:len(self.seen)] != self.seen:  # a different history than the one indexed: start over
            self.begin([], 0, 0)
        for j in range(max(len(self.seen), 1), len(history)):
            for n, table in self.last.items():
                if j >= n:
                    table[tuple(history[j - n:j])] = j
        self.seen = list(history)

    def lookup(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens continuing `history` by prompt lookup ([] when its last n-gram never appeared before)."""
        self._index(history)
        L = len(history)
        for n in range(min(self.ngram_max, L), self.ngram_min - 1, -1):
            j = self.last[n].get(tuple(history[L - n:]))
            if j is not None:
                period = L - j  # history[j - n:j] == history[L - n:L]
                return [history[j + i % period] for i in range(k)]
        return []

    def propose(self, history: list[int], k: int, probs, gen: torch.Generator) -> tuple[list[int], None]:
        """The Drafter interface (generate/speculative.py): a deterministic proposal, so no draft distributions."""
        return self.lookup(history, k), None

    def rollback(self, n: int) -> None:
        """Nothing to undo: only confirmed tokens are ever indexed."""
