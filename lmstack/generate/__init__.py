from .engine import generate, generate_text, stream_tokens
from .sampling import SamplingParams, process_logits, sample_next

__all__ = ["SamplingParams", "process_logits", "sample_next", "generate", "generate_text", "stream_tokens"]
