"""LM: a model plus its tokenizer, the object `lmstack.load` returns."""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import load_model
from .errors import LMStackError
from .generate import SamplingParams, stream_tokens


def decode_stream(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Token ids -> text deltas through one incremental UTF-8 decoder: a multi-byte character is held back until
    complete, invalid bytes become U+FFFD (Python's errors='replace'), special tokens are skipped. The one text
    decoding of generated tokens, so streamed and non-streamed output are always identical."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tok in ids:
        text = dec.decode(tokenizer.token_bytes(tok))
        if text:
            yield text
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


class LM:
    def __init__(self, model, tokenizer, path: str | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @property
    def config(self):
        return self.model.config

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            fallback = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
            if fallback is None:
                raise LMStackError("the prompt is empty and the tokenizer has no BOS/EOS token to start from")
            ids = [fallback]
        return ids

    def generate(self, prompt: str, truncate: str | None = None, **params) -> str:
        """Generate a continuation of `prompt` (text in, text out). params: SamplingParams fields."""
        return "".join(self.stream(prompt, truncate=truncate, **params))

    def stream(self, prompt: str, truncate: str | None = None, **params) -> Iterator[str]:
        """Yield text pieces as they are generated; never splits a multi-byte UTF-8 character."""
        sp = SamplingParams(**params)
        ids = stream_tokens(self.model, self._prompt_ids(prompt), sp, eos_id=self.tokenizer.eos_id, truncate=truncate)
        yield from decode_stream(self.tokenizer, ids)


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> LM:
    """Load an lmstack checkpoint directory."""
    model, tok = load_model(path, device=device, dtype=dtype)
    if tok is None:
        raise LMStackError(f"{path} has no tokenizer.json; copy the tokenizer into the checkpoint directory")
    return LM(model, tok, str(path))
