from .beam import BeamHypothesis, beam_search
from .engine import TokenStep, generate, generate_text, stream_steps, stream_tokens
from .batching import BackgroundBatcher, ContinuousBatcher, StepStream, generate_batch
from .sampling import SamplingParams, process_logits, sample_next
from .score import score, token_logprobs, token_logprobs_top
from .speculative import SpeculativeResult, speculative_generate
from .stops import apply_stop_strings

__all__ = ["SamplingParams", "process_logits", "sample_next", "generate", "generate_text", "generate_batch",
           "stream_tokens", "stream_steps", "TokenStep", "beam_search", "BeamHypothesis", "score", "token_logprobs", "token_logprobs_top",
           "apply_stop_strings", "ContinuousBatcher", "BackgroundBatcher", "StepStream", "speculative_generate", "SpeculativeResult"]
