"""Re-rankers: `score(query, passages) -> list[float]`, higher = more relevant; Index.search(rerank=...) orders its
candidates by them.

- LMReranker: any LM lmstack loads scores a passage by log P(" yes" | relevance prompt), one forward pass each (no
  generation). A chat model gets the prompt through its chat template and the continuation "yes". A passage longer
  than the window allows is cut (at a token boundary) so the prompt fits, as cross-encoders truncate theirs.
- CrossEncoderReranker: a Hugging Face sequence-classification model (AutoModelForSequenceClassification, e.g.
  cross-encoder/ms-marco-MiniLM-L-6-v2) over (query, passage) pairs: the logit (one label) or the log-probability
  of the last label (several), as sentence-transformers' CrossEncoder scores them.

    r = load_reranker("cross-encoder/ms-marco-MiniLM-L-6-v2")   # a directory, a hub id, or any LM path
    hits = idx.search("how do I ...", top_k=5, rerank=r)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LMStackError

RELEVANCE_PROMPT = ("Query: {query}\nPassage: {passage}\nIs the passage relevant to the query? Answer yes or no.")


class LMReranker:
    def __init__(self, lm):
        self.lm = lm
        self.chat = bool(lm.tokenizer.chat_template)
        self.continuation = "yes" if self.chat else " yes"
        self.name = str(getattr(lm, "path", None) or "lm")

    def _render(self, query: str, passage: str) -> str:
        msg = RELEVANCE_PROMPT.format(query=query, passage=passage)
        return self.lm.chat_prompt([{"role": "user", "content": msg}]) if self.chat else msg + "\nAnswer:"

    def _fits(self, prompt: str) -> bool:
        n = len(self.lm.prompt_ids(prompt)) + len(self.lm.tokenizer.encode(self.continuation)) - 1
        return n <= self.lm.config.block_size

    def prompt(self, query: str, passage: str) -> str:
        """The relevance prompt for (query, passage), the passage cut at a token boundary until it fits the window."""
        p = self._render(query, passage)
        if self._fits(p):
            return p
        tok = self.lm.tokenizer
        ids = tok.encode(passage)
        lo, hi = 0, len(ids)  # the longest passage prefix (in tokens) that fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(self._render(query, tok.decode(ids[:mid]))):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise LMStackError(f"the re-ranking model's context window ({self.lm.config.block_size} tokens) cannot "
                               "hold the relevance prompt and the query; use a model with a larger window or a "
                               "shorter query")
        return self._render(query, tok.decode(ids[:lo]))

    def score(self, query: str, passages: list[str]) -> list[float]:
        return [self.lm.score(self.prompt(query, p), self.continuation)[0] for p in passages]


class CrossEncoderReranker:
    def __init__(self, path: str, batch_size: int = 16, max_length: int = 512, device: str = "cpu"):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise LMStackError("cross-encoder re-ranking needs `transformers`; pip install transformers") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as e:
            raise LMStackError(f"could not load the cross-encoder {path!r}: {e}; pass a sequence-classification "
                               "model directory (or a hub id when online)") from None
        self.batch_size, self.max_length, self.device, self.name = batch_size, max_length, device, str(path)

    def score(self, query: str, passages: list[str]) -> list[float]:
        import torch
        out: list[float] = []
        for i in range(0, len(passages), self.batch_size):
            part = passages[i:i + self.batch_size]
            enc = self.tokenizer([query] * len(part), part, padding=True, truncation="only_second",
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            s = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
            out.extend(s.cpu().tolist())
        return out


def is_cross_encoder(spec: str) -> bool:
    """A directory whose config.json names a *ForSequenceClassification architecture, or a hub id under
    cross-encoder/."""
    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or []
        except ValueError:
            return False
        return any(a.endswith("ForSequenceClassification") for a in archs)
    return spec.startswith("cross-encoder/")


def load_reranker(spec):
    """A re-ranker from `spec`: an object with .score is returned as it is; a sequence-classification model (dir or
    hub id) becomes a CrossEncoderReranker; anything else lmstack.load takes becomes an LMReranker."""
    if not isinstance(spec, (str, Path)):
        if hasattr(spec, "prompt_ids") and hasattr(spec, "tokenizer"):  # an lmstack LM
            return LMReranker(spec)
        if hasattr(spec, "score"):
            return spec
        raise LMStackError(f"rerank= takes a model path, an LM or an object with .score(query, passages), got "
                           f"{type(spec).__name__}")
    spec = str(spec)
    if is_cross_encoder(spec):
        return CrossEncoderReranker(spec)
    from ..lm import load
    return LMReranker(load(spec))
