"""Per-example metrics and their aggregation, defined as lm-evaluation-harness defines them."""
from __future__ import annotations

import math
import re
from typing import Sequence


def argmax(xs: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy.argmax)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mc_metrics(lls: Sequence[float], choices: Sequence[str], gold: int, bytes: bool = False
               ) -> dict[str, float]:
    """acc: argmax of the summed log-likelihoods; acc_norm: argmax of log-likelihood / len(choice) in characters
    (the choice string without the target delimiter, lm-eval's `completion_len`); with bytes=True also acc_bytes
    (/ UTF-8 bytes, lm-eval's optional metric)."""
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
    out = {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(norm) == gold)}
    if bytes:
        byt = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, choices)]
        out["acc_bytes"] = float(argmax(byt) == gold)
    return out


def mc2_metric(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass on the true answers, normalised over all answers."""
    m = max(lls)
    p = [math.exp(ll - m) for ll in lls]
    z = sum(p)
    return sum(pi for pi, lab in zip(p, labels) if lab) / z


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs: Sequence[float]) -> float:
    """Sample standard error of the mean: stdev (n-1) / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


# ---- generation answers ---------------------------------------------------------------------------------------
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_answer(s: str) -> str:
    """gsm8k's exact-match normalisation: drop ',', '$', everything up to '#### ', a final '.'; lowercase."""
    s = re.sub(r"(?s).*#### ", "", s)
    s = s.replace(",", "").replace("$", "")
    s = re.sub(r"\.$", "", s.strip())
    return s.strip().lower()


def extract_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return m.group(1) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text (lm-eval's gsm8k 'flexible-extract')."""
    found = _FLEX.findall(text)
    if not found:
        return None
    last = found[-1]
    return next((g for g in last if g), None)


def exact_match(pred: str | None, answers: Sequence[str]) -> float:
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))
