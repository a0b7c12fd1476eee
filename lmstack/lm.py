"""LM: a model plus its tokenizer, the object `lmstack.load` returns."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import load_model
from .errors import LMStackError
from .generate import SamplingParams, generate, stream_tokens


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
        sp = SamplingParams(**params)
        out = generate(self.model, self._prompt_ids(prompt), sp, eos_id=self.tokenizer.eos_id, truncate=truncate)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def stream(self, prompt: str, truncate: str | None = None, **params) -> Iterator[str]:
        """Yield text pieces as they are generated; never splits a multi-byte UTF-8 character."""
        sp = SamplingParams(**params)
        buf = b""
        for tok in stream_tokens(self.model, self._prompt_ids(prompt), sp, eos_id=self.tokenizer.eos_id,
                                 truncate=truncate):
            buf += self.tokenizer.token_bytes(tok)
            try:
                text = buf.decode("utf-8")
            except UnicodeDecodeError:
                continue
            buf = b""
            if text:
                yield text
        if buf:
            yield buf.decode("utf-8", errors="replace")


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> LM:
    """Load an lmstack checkpoint directory."""
    model, tok = load_model(path, device=device, dtype=dtype)
    if tok is None:
        raise LMStackError(f"{path} has no tokenizer.json; copy the tokenizer into the checkpoint directory")
    return LM(model, tok, str(path))
