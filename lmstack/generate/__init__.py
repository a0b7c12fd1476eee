"""The inference engine: sampling, the KV-cached decode loop, continuous batching, beam search, speculative
decoding, scoring, embeddings, and the one token-ids -> text stream (text.py)."""
from .beam import BeamHypothesis, beam_search
from .engine import TokenStep, fit_context, generate, generate_text, make_generator, stop_set, stream_steps, stream_tokens
from .batching import PREFILL_BATCH_TOKENS, ContinuousBatcher, Request, generate_batch
from .background import BackgroundBatcher, StepStream
from .prefix_cache import PrefixCache, prefix_cache_unsupported
from .embed import embed
from .sampling import SamplingParams, parse_logit_bias, process_logits, sample_next
from .score import continuation_logprobs, continuation_logprobs_top, score
from .ngram import NgramDrafter, is_ngram_spec
from .speculative import (Drafter, ModelDrafter, SpeculativeResult, check_draft_tokenizer, speculative_generate,
                          stream_speculative)
from .stops import apply_stop_strings
from .text import Piece, TextStream, decode_text, token_text

__all__ = ["SamplingParams", "parse_logit_bias", "process_logits", "sample_next", "generate", "generate_text",
           "generate_batch", "stream_tokens", "stream_steps", "TokenStep", "fit_context", "make_generator", "stop_set",
           "beam_search", "BeamHypothesis", "score", "continuation_logprobs", "continuation_logprobs_top", "embed",
           "apply_stop_strings", "TextStream", "Piece", "decode_text", "token_text", "ContinuousBatcher",
           "BackgroundBatcher", "Request", "StepStream", "PREFILL_BATCH_TOKENS", "speculative_generate", "SpeculativeResult",
           "PrefixCache", "prefix_cache_unsupported",
           "stream_speculative", "Drafter", "ModelDrafter", "NgramDrafter", "is_ngram_spec", "check_draft_tokenizer"]
