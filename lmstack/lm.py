"""LM: a model plus its tokenizer, the object `lmstack.load` returns, whatever the source format."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from .convert.load import load_any, resolve_source
from .errors import LMStackError
from .generate import (PREFILL_BATCH_TOKENS, ContinuousBatcher, ModelDrafter, NgramDrafter, Request,
                       SamplingParams, SpeculativeResult, TextStream, TokenStep, beam_search, check_draft_tokenizer,
                       embed, fit_context, is_ngram_spec, make_generator, score, stop_set, stream_speculative,
                       stream_steps, stream_tokens)
from .generate.constrain import new_matcher

__all__ = ["LM", "load", "resolve_source"]


class LM:
    def __init__(self, model, tokenizer, path: str | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path

    @property
    def config(self):
        return self.model.config

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt as generation and scoring see it (an empty prompt starts from BOS/EOS)."""
        return self.tokenizer.encode_prompt(prompt)

    def _stops(self, stop_ids: Iterable[int] | None) -> set[int]:
        return set(stop_ids) if stop_ids is not None else stop_set(self.tokenizer.eos_id)

    def text_stream(self, params: SamplingParams, stop_ids: Iterable[int] | None = None) -> TextStream:
        """The TextStream that turns this LM's generated tokens into text for `params` (stop token, stop strings)."""
        return TextStream(self.tokenizer, self._stops(stop_ids), params.stop, params.stop_at_eos)

    def generate(self, prompt: str, truncate: str | None = None, num_beams: int = 1, **params) -> str:
        """Generate a continuation of `prompt` (text in, text out). params: SamplingParams fields (temperature,
        top_k, top_p, min_p, penalties, logit_bias, min_new_tokens, stop, seed, ...). num_beams > 1: beam search
        (see `beam_search`), returning the best hypothesis."""
        if num_beams > 1:
            return self.beam_search(prompt, num_beams=num_beams, truncate=truncate, **params)[0][0]
        return "".join(self.stream(prompt, truncate=truncate, **params))

    def stream(self, prompt: str, truncate: str | None = None, stop_ids: Iterable[int] | None = None,
               use_cache: bool = True, **params) -> Iterator[str]:
        """Yield text pieces as they are generated; never splits a multi-byte UTF-8 character. With stop strings
        (`stop=`), text that could be the start of one is held back until it cannot, and the text ends right before
        the first stop string (not included), so the pieces always join to exactly `generate`'s text.
        use_cache=False recomputes the whole sequence every step (for checking the KV cache)."""
        sp = SamplingParams(**params)
        stops = self._stops(stop_ids)
        ids = stream_tokens(self.model, self.prompt_ids(prompt), sp, eos_id=stops, truncate=truncate,
                            use_cache=use_cache, matcher=self.matcher(sp, stops))
        yield from self.text_stream(sp, stops).texts(ids)

    def matcher(self, params: SamplingParams, stop_ids: Iterable[int] | None = None):
        """A fresh structured-output state for one generation with `params` (None without a constraint)."""
        return new_matcher(params, self.tokenizer, self.config.vocab_size, self._stops(stop_ids))

    def stream_steps(self, prompt: str, truncate: str | None = None, top_logprobs: int = 0,
                     stop_ids: Iterable[int] | None = None, **params) -> Iterator[TokenStep]:
        """Token-level stream: TokenStep(token, logprob, top alternatives) per generated token (EOS included).
        Stop strings are a text-level feature: use `stream` for them."""
        sp = SamplingParams(**params)
        yield from stream_steps(self.model, self.prompt_ids(prompt), sp, eos_id=self._stops(stop_ids),
                                truncate=truncate, top_logprobs=top_logprobs, matcher=self.matcher(sp, stop_ids))

    def generate_batch(self, prompts: list[str], truncate: str | None = None, max_batch: int | None = None,
                       **params) -> list[str]:
        """Generate for several prompts with continuous batching (one forward pass per step for all unfinished
        rows; with more prompts than `max_batch`, later ones take the rows earlier ones free). A row ends at EOS, at
        max_new_tokens, or as soon as its text contains a stop string (`stop=`), so stop strings cost no extra
        steps. Greedy: the same text as `generate` on each prompt alone; sampling with seed s: prompt i uses seed
        s + i."""
        sp = SamplingParams(**params)
        eos = self._stops(None)
        batcher = ContinuousBatcher(self.model, max_batch or max(1, len(prompts)),
                                    prefill_tokens=PREFILL_BATCH_TOKENS)
        streams = [self.text_stream(sp, eos) for _ in prompts]
        for i, prompt in enumerate(prompts):
            ids = fit_context(self.prompt_ids(prompt), sp.max_new_tokens, self.config.block_size, truncate)
            req = Request(ids, sp, eos, generator=make_generator(None if sp.seed is None else sp.seed + i),
                          matcher=self.matcher(sp, eos))

            def on_step(step, ts=streams[i], req=req):
                ts.feed(step)
                if ts.hit_stop:
                    req.cancelled = True  # the row leaves the batch at once
            req.on_step = on_step
            batcher.add(req)
        while batcher.has_work():
            batcher.step()
        for ts in streams:
            ts.finish()
        return [ts.text for ts in streams]

    def beam_search(self, prompt: str, num_beams: int = 4, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, num_return_sequences: int = 1, truncate: str | None = None,
                    **params) -> list[tuple[str, float]]:
        """Beam search: [(text, score)] best first; score = sum logprob / generated_length ** length_penalty."""
        sp = SamplingParams(**{"temperature": 0, **params})
        eos = self._stops(None)
        hyps = beam_search(self.model, self.prompt_ids(prompt), num_beams=num_beams,
                           max_new_tokens=sp.max_new_tokens, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=num_return_sequences, eos_id=eos,
                           params=sp, truncate=truncate)
        # a hypothesis ends at its EOS whatever stop_at_eos says (beam search has no text past the end)
        return [(TextStream(self.tokenizer, eos, sp.stop).decode(h.tokens), h.score) for h in hyps]

    def speculative_drafter(self, draft):
        """The Drafter for `draft`: another LM (a smaller model with this LM's tokenizer; a different tokenizer is
        an error that names the first difference), 'ngram' / '[ngram]' (prompt lookup, no draft model), or a
        Drafter as is (e.g. NgramDrafter(ngram_max=5))."""
        if isinstance(draft, str):
            if not is_ngram_spec(draft):
                raise LMStackError(f"draft {draft!r}: give an LM (lmstack.load(path)) or 'ngram' for prompt lookup")
            return NgramDrafter()
        if isinstance(draft, LM):
            check_draft_tokenizer(self.tokenizer, draft.tokenizer, f"the draft model {draft.path or ''}".rstrip())
            drafter = ModelDrafter(draft.model)
            drafter.check(self.model)
            return drafter
        return draft

    def speculative_stream(self, prompt: str, draft, num_draft_tokens: int = 4, truncate: str | None = None,
                           stop_ids: Iterable[int] | None = None, stats=None, **params) -> Iterator[str]:
        """`stream` with speculative decoding: text pieces as each round is verified. draft: see
        `speculative_drafter`; stats: a SpeculativeResult that receives the tokens and acceptance counts (adding to
        what it holds, so one can count a whole chat session)."""
        sp = SamplingParams(**params)
        stops = self._stops(stop_ids)
        ids = stream_speculative(self.model, self.speculative_drafter(draft), self.prompt_ids(prompt), sp,
                                 num_draft_tokens, eos_id=stops, truncate=truncate, stats=stats)
        yield from self.text_stream(sp, stops).texts(ids)

    def speculative_chat_stream(self, messages: list[dict], draft, num_draft_tokens: int = 4, stats=None,
                                **params) -> Iterator[str]:
        """`chat_stream` with speculative decoding (see `speculative_stream`)."""
        yield from self.speculative_stream(self.chat_prompt(messages), draft, num_draft_tokens, truncate="left",
                                           stop_ids=self.tokenizer.end_of_turn_ids, stats=stats, **params)

    def speculative_generate(self, prompt: str, draft, num_draft_tokens: int = 4, truncate: str | None = None,
                             return_stats: bool = False, **params):
        """Generate with speculative decoding: `draft` (a smaller LM over the same tokenizer, or 'ngram' for prompt
        lookup; see `speculative_drafter`) proposes `num_draft_tokens` tokens per round, this model verifies them in
        one pass. Same distribution as `generate` (greedy: the same text). return_stats=True: (text,
        SpeculativeResult) with `.acceptance_rate`."""
        res = SpeculativeResult()
        text = "".join(self.speculative_stream(prompt, draft, num_draft_tokens, truncate=truncate, stats=res,
                                               **params))
        return (text, res) if return_stats else text

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """(log P(continuation | context), is_greedy), tokenizing context and continuation separately; an empty
        context starts from the BOS/EOS token."""
        return score(self.model, self.prompt_ids(context), self.tokenizer.encode(continuation))

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render messages with the model's own chat template, ready for the assistant's reply."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        """Stream the assistant's reply to `messages`, stopping at the end-of-turn token."""
        yield from self.stream(self.chat_prompt(messages), truncate="left",
                               stop_ids=self.tokenizer.end_of_turn_ids, **params)

    def chat(self, messages: list[dict], **params) -> str:
        return "".join(self.chat_stream(messages, **params))

    @property
    def source_tokenizer(self):
        """An encoder-decoder's source-side tokenizer when it has its own vocabulary (<checkpoint>/source/, written
        by `objective: seq2seq` with shared_vocab: false), else None (the one tokenizer serves both sides)."""
        if not hasattr(self, "_source_tok"):
            from .tokenizer import Tokenizer
            d = Path(self.path) / "source" if self.path else None
            self._source_tok = Tokenizer.load(d) if d is not None and (d / "tokenizer.json").exists() else None
        return self._source_tok

    def translate(self, texts: str | list[str], num_beams: int = 5, length_penalty: float = 1.0,
                  max_new_tokens: int | None = None, batch_size: int = 32, truncate: bool = False):
        """Encoder-decoder models: translate one sentence (str -> str) or a list (-> list, batched by length) with
        beam search (num_beams=1: greedy). truncate=True cuts sources longer than the encoder's context (else an
        error names them)."""
        if getattr(self.config, "arch", None) != "encoder-decoder":
            raise LMStackError(f"translate needs an encoder-decoder model (model.arch: encoder-decoder); "
                               f"{self.path or 'this model'} is arch {getattr(self.config, 'arch', '?')!r}")
        from .generate.seq2seq import translate
        one = isinstance(texts, str)
        outs = translate(self.model, self.tokenizer, [texts] if one else list(texts), num_beams=num_beams,
                         length_penalty=length_penalty, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         src_tokenizer=self.source_tokenizer, truncate=truncate)
        return outs[0] if one else outs

    def embed(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Mean-pooled (and L2-normalised) sentence embeddings, the sentence-transformers convention."""
        return embed(self.model, self.tokenizer, texts, normalize=normalize)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None, quantize: str | None = None,
         compile: bool = False, packed: bool | None = None) -> LM:
    """Load an lmstack checkpoint directory (a LoRA run's checkpoint is merged onto its base), a Hugging Face model
    directory, or a GGUF file. dtype: a torch dtype or its name ('bfloat16'); a GGUF file loaded on the CPU without
    a dtype keeps its quantized tensors packed (Q8_0/Q4_0/Q4_1 kernels, lmstack.models.qlinear); dtype='float32'
    dequantizes. quantize='int8' | 'q8_0' | 'q4_0' | 'q4_1': weight-only quantized linears for fast CPU decoding
    (see lmstack.models.quant). compile=True: torch.compile the decode step. packed: keep quantized weights
    (GGUF blocks, quantized checkpoints) packed (True) or dequantize them (False); default: as described above."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LMStackError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if packed is None:
        packed = dtype is None and quantize is None and str(device) == "cpu"
    model, tok = load_any(path, device=device, dtype=dtype, packed=packed)
    if quantize:
        from .models.quant import quantize_model
        quantize_model(model, quantize)
    if compile:
        from .generate.compiled import compile_decode
        compile_decode(model)
    if tok is None:
        raise LMStackError(f"{path} has no tokenizer.json; copy the tokenizer into the model directory")
    return LM(model, tok, str(path))
