"""LM: a model plus its tokenizer, the object `lmstack.load` returns, whatever the source format."""
from __future__ import annotations

import codecs
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .checkpoint import load_model
from .errors import LMStackError
from .generate import (SamplingParams, TokenStep, apply_stop_strings, beam_search, score,
                       stream_steps, stream_tokens)


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

    def generate(self, prompt: str, truncate: str | None = None, num_beams: int = 1, **params) -> str:
        """Generate a continuation of `prompt` (text in, text out). params: SamplingParams fields (temperature,
        top_k, top_p, min_p, penalties, logit_bias, min_new_tokens, stop, seed, ...). num_beams > 1: beam search
        (see `beam_search`), returning the best hypothesis."""
        if num_beams > 1:
            return self.beam_search(prompt, num_beams=num_beams, truncate=truncate, **params)[0][0]
        return "".join(self.stream(prompt, truncate=truncate, **params))

    def stream(self, prompt: str, truncate: str | None = None, stop_ids: Iterable[int] | None = None,
               **params) -> Iterator[str]:
        """Yield text pieces as they are generated; never splits a multi-byte UTF-8 character. With stop strings
        (`stop=`), text that could be the start of one is held back until it cannot, and the text ends right before
        the first stop string (not included), so the pieces always join to exactly `generate`'s text."""
        sp = SamplingParams(**params)
        stops = set(stop_ids) if stop_ids is not None else {self.tokenizer.eos_id} - {None}
        ids = stream_tokens(self.model, self._prompt_ids(prompt), sp, eos_id=stops, truncate=truncate)
        if sp.stop_at_eos:  # the stop token ends the text and is not part of it
            ids = itertools.takewhile(lambda t: t not in stops, ids)
        yield from apply_stop_strings(decode_stream(self.tokenizer, ids), sp.stop)

    def stream_steps(self, prompt: str, truncate: str | None = None, top_logprobs: int = 0,
                     stop_ids: Iterable[int] | None = None, **params) -> Iterator[TokenStep]:
        """Token-level stream: TokenStep(token, logprob, top alternatives) per generated token (EOS included).
        Stop strings are a text-level feature: use `stream` for them."""
        sp = SamplingParams(**params)
        stops = set(stop_ids) if stop_ids is not None else {self.tokenizer.eos_id} - {None}
        yield from stream_steps(self.model, self._prompt_ids(prompt), sp, eos_id=stops, truncate=truncate,
                                top_logprobs=top_logprobs)

    def generate_batch(self, prompts: list[str], truncate: str | None = None, max_batch: int | None = None,
                       **params) -> list[str]:
        """Generate for several prompts with continuous batching (one forward pass per step for all unfinished
        rows; with more prompts than `max_batch`, later ones take the rows earlier ones free). A row ends at EOS, at
        max_new_tokens, or as soon as its text contains a stop string (`stop=`), so stop strings cost no extra
        steps. Greedy: the same text as `generate` on each prompt alone; sampling with seed s: prompt i uses seed
        s + i."""
        from .generate.batching import PREFILL_BATCH_TOKENS, ContinuousBatcher, Request
        from .generate.engine import _generator, fit_context
        sp = SamplingParams(**params)
        eos = {self.tokenizer.eos_id} - {None}
        block = self.config.block_size
        batcher = ContinuousBatcher(self.model, max_batch or max(1, len(prompts)),
                                    prefill_tokens=PREFILL_BATCH_TOKENS)
        texts, ended = [""] * len(prompts), [False] * len(prompts)
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
        for i, prompt in enumerate(prompts):
            ids = fit_context(self._prompt_ids(prompt), sp.max_new_tokens, block, truncate)
            req = Request(ids, sp, eos, generator=_generator(None if sp.seed is None else sp.seed + i))

            def on_step(step, i=i, req=req):
                if ended[i] or (sp.stop_at_eos and step.token in eos):
                    ended[i] = True
                    return
                texts[i] += decoders[i].decode(self.tokenizer.token_bytes(step.token))
                if sp.stop and any(s in texts[i] for s in sp.stop):
                    ended[i] = req.cancelled = True  # the row leaves the batch at once
            req.on_step = on_step
            batcher.add(req)
        while batcher.has_work():
            batcher.step()
        return ["".join(apply_stop_strings([t + d.decode(b"", final=True)], sp.stop))
                for t, d in zip(texts, decoders)]

    def beam_search(self, prompt: str, num_beams: int = 4, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, num_return_sequences: int = 1, truncate: str | None = None,
                    **params) -> list[tuple[str, float]]:
        """Beam search: [(text, score)] best first; score = sum logprob / generated_length ** length_penalty."""
        sp = SamplingParams(**{"temperature": 0, **params})
        eos = {self.tokenizer.eos_id} - {None}
        hyps = beam_search(self.model, self._prompt_ids(prompt), num_beams=num_beams,
                           max_new_tokens=sp.max_new_tokens, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=num_return_sequences, eos_id=eos,
                           params=sp, truncate=truncate)
        out = []
        for h in hyps:
            ids = list(itertools.takewhile(lambda t: t not in eos, h.tokens))
            out.append(("".join(apply_stop_strings(decode_stream(self.tokenizer, ids), sp.stop)), h.score))
        return out

    def speculative_generate(self, prompt: str, draft: "LM", num_draft_tokens: int = 4, truncate: str | None = None,
                             return_stats: bool = False, **params):
        """Generate with speculative decoding: `draft` (a smaller LM over the same tokenizer) proposes
        `num_draft_tokens` tokens per round, this model verifies them in one pass. Same distribution as `generate`
        (greedy: the same text). return_stats=True: (text, SpeculativeResult) with `.acceptance_rate`."""
        from .generate.speculative import speculative_generate
        sp = SamplingParams(**params)
        eos = {self.tokenizer.eos_id} - {None}
        res = speculative_generate(self.model, draft.model, self._prompt_ids(prompt), sp, num_draft_tokens,
                                   eos_id=eos, truncate=truncate)
        ids = list(itertools.takewhile(lambda t: t not in eos, res.tokens)) if sp.stop_at_eos else res.tokens
        text = "".join(apply_stop_strings(decode_stream(self.tokenizer, ids), sp.stop))
        return (text, res) if return_stats else text

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """(log P(continuation | context), is_greedy), tokenizing context and continuation separately; an empty
        context starts from the BOS/EOS token."""
        return score(self.model, self._prompt_ids(context), self.tokenizer.encode(continuation))

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render messages with the model's own chat template, ready for the assistant's reply."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        """Stream the assistant's reply to `messages`, stopping at the end-of-turn token."""
        yield from self.stream(self.chat_prompt(messages), truncate="left",
                               stop_ids=self.tokenizer.end_of_turn_ids, **params)

    def chat(self, messages: list[dict], **params) -> str:
        return "".join(self.chat_stream(messages, **params))

    def embed(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Mean-pooled (and L2-normalised) sentence embeddings, the sentence-transformers convention."""
        from .convert.hf import embed
        return embed(self.model, self.tokenizer, texts, normalize=normalize)


def resolve_source(path: str | Path) -> str:
    """What kind of model lives at `path`: 'lmstack' checkpoint dir, 'hf' directory, or 'gguf' file."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LMStackError(f"{p} is a file but not GGUF; pass a GGUF file, a Hugging Face model directory or an "
                           "lmstack checkpoint directory")
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.exists():
            try:
                data = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise LMStackError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno})") from None
            return "hf" if "model_type" in data else "lmstack"
        if p.name in ("last", "best") or any(p.parent.glob(f".{p.name}.old-*")):
            return "lmstack"
        raise LMStackError(f"{p} has no config.json: not an lmstack checkpoint or a Hugging Face model directory")
    if not p.exists() and list(p.parent.glob(f".{p.name}.old-*")):
        return "lmstack"  # a checkpoint swap interrupted by a crash; load_model recovers it
    hint = "; to fetch a Hugging Face model run `lmstack download REPO_ID`" if "/" in str(path) and not p.is_absolute() else ""
    raise LMStackError(f"no model at {path} (expected an lmstack checkpoint directory, a Hugging Face model "
                       f"directory or a GGUF file){hint}")


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, quantize: str | None = None) -> LM:
    """Load an lmstack checkpoint directory, a Hugging Face model directory, or a GGUF file.
    quantize="int8": weight-only int8 linears for fast CPU decoding (see lmstack.models.quant)."""
    kind = resolve_source(path)
    if kind == "gguf":
        from .convert.gguf import load_gguf
        model, tok = load_gguf(path, dtype=dtype)
    elif kind == "hf":
        from .convert.hf import load_hf
        model, tok = load_hf(path, dtype=dtype)
    else:
        model, tok = load_model(path, device=device, dtype=dtype)
    model = model.to(device).eval()
    if quantize:
        from .models.quant import quantize_model
        quantize_model(model, quantize)
    if tok is None:
        raise LMStackError(f"{path} has no tokenizer.json; copy the tokenizer into the model directory")
    return LM(model, tok, str(path))
